"""The control plane: the hub that coordinates environments over the gateway.

The hub (:mod:`.server`) leases environments (:mod:`.leases`, :mod:`.selection`), drives runs
through them (:mod:`.run_request`; :mod:`.runs` with :mod:`.runtime_process`, :mod:`.run_tokens`,
:mod:`.runtime_events` and :mod:`.run_result`; :mod:`.adoption` after a restart; without a hub,
:mod:`.direct`), ships narratives both ways as git bundles (:mod:`.narratives`), records each run's
events and usage (:mod:`.events`, :mod:`.usage_records`) and issues run-scoped tokens
(:mod:`.token_policy`); the runtime inside an environment (:mod:`.runtime`, with
:mod:`.agent_process` and :mod:`.agent_output`) dials it back; :mod:`.client` starts runs through a
running hub or an embedded one. This is the only part of the gateway that knows about providers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from narrative.lazy import lazy_exports

if TYPE_CHECKING:
    from .client import run_through_hub
    from .direct import IsolatedRun, pick_base, run_isolated
    from .events import RunEventLog
    from .run_request import RunRequest
    from .server import Hub

__all__ = [
    "Hub",
    "IsolatedRun",
    "RunEventLog",
    "RunRequest",
    "pick_base",
    "run_isolated",
    "run_through_hub",
]

_HOMES = {
    "Hub": "server",
    "IsolatedRun": "direct",
    "RunEventLog": "events",
    "RunRequest": "run_request",
    "pick_base": "direct",
    "run_isolated": "direct",
    "run_through_hub": "client",
}


__getattr__ = lazy_exports(__name__, _HOMES)
