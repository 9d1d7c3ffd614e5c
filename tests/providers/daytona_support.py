"""Fixtures for the daytona provider tests: the Daytona stand-in on a free loopback port.

The server lives for the test module (its sandboxes are containers on the test engine); each
test gets the SDK's variables cleared and the stand-in's key in ``DAYTONA_API_KEY``
(monkeypatched, so nothing leaks into other tests, and never a real key or a non-loopback URL).
Without a Docker engine the tests skip, unless ``NARRATIVE_REQUIRE_DAYTONA=1`` (CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from narrative.ids import new_id
from narrative.store import Store
from providers.base import ProviderContext
from providers.daytona_provider import DaytonaConfig, DaytonaProvider

REQUIRE_DAYTONA = os.environ.get("NARRATIVE_REQUIRE_DAYTONA") == "1"
SDK_VARIABLES = (
    "DAYTONA_API_KEY",
    "DAYTONA_API_URL",
    "DAYTONA_SERVER_URL",
    "DAYTONA_TARGET",
    "DAYTONA_JWT_TOKEN",
    "DAYTONA_ORGANIZATION_ID",
)


def _stand_in() -> Any:
    """The stand-in, or skip (fail where ``NARRATIVE_REQUIRE_DAYTONA=1``) when the SDK or the
    Docker engine behind it is missing."""
    try:
        import daytona  # noqa: F401

        from tests.providers.daytona_standin import DaytonaStandIn

        return DaytonaStandIn()
    except (ImportError, pytest.skip.Exception) as exc:
        reason = f"the Daytona stand-in cannot run: {exc}"
        if REQUIRE_DAYTONA:
            pytest.fail(f"{reason} (NARRATIVE_REQUIRE_DAYTONA=1 demands the Daytona tests run)")
        pytest.skip(reason)


@pytest.fixture(scope="module", name="daytona_server")
def daytona_server_fixture() -> Iterator[Any]:
    server = _stand_in().start()
    yield server
    server.stop()


@pytest.fixture(name="daytona")
def daytona_fixture(daytona_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stand-in, with the SDK's variables cleared and its key in ``DAYTONA_API_KEY``."""
    from tests.providers.daytona_standin import API_KEY

    for var in SDK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAYTONA_API_KEY", API_KEY)
    # a config without api_url (a sweep's default one) reaches the stand-in, never the cloud
    monkeypatch.setenv("DAYTONA_API_URL", daytona_server.api_url)
    daytona_server.minute = 60.0
    return daytona_server


def standin_config(server: Any, **config: Any) -> dict[str, Any]:
    """The config of an environment on the stand-in (this checkout as the runtime)."""
    return {"api_url": server.api_url, "target": "local", "runtime": server.runtime, **config}


def make_provider(store: Store, server: Any, **config: Any) -> DaytonaProvider:
    context = ProviderContext(
        store=store, owner="owner-test", env_id=new_id("environment"), env_name="dt"
    )
    return DaytonaProvider(context, DaytonaConfig(**standin_config(server, **config)))
