"""Hypothesis settings for the whole suite, chosen once, here (``tests/conftest.py`` loads the
profile): whichever test modules a run collects, every property test runs the same way.

* ``ci`` (the default): examples derandomized, so a commit's run is the same on every machine
  and a red CI points at the code, not at the draw; no example database.
* ``soak`` (``make soak``): random examples, :func:`examples` times more of them, the database
  kept so that a failure found replays.

Model-based machines with their own step counts (the store model, the watcher model) keep
their own profiles, set on their test case.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("NARRATIVE_HYPOTHESIS_PROFILE", "ci")
SOAK = PROFILE == "soak"
SOAK_FACTOR = 20

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("soak", **_COMMON)  # type: ignore[arg-type]


def examples(count: int) -> int:
    """``count`` examples in CI, :data:`SOAK_FACTOR` times as many under ``make soak``."""
    return count * SOAK_FACTOR if SOAK else count
