"""Fixtures for the e2b provider tests: the envd stand-in on a free loopback port, and the
control-plane stand-in in front of it.

The servers live for the test module. With ``envd`` a test gets a fresh debug sandbox and an
environment where the e2b SDK is in debug mode and pointed at the stand-in; with ``control``
the SDK is out of debug mode, its API at the control-plane stand-in (with that stand-in's test
key) and its sandboxes at the envd stand-in. Both are monkeypatched, so nothing leaks into
other tests, and never a real key or a non-loopback URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from narrative.ids import new_id
from narrative.store import Store
from providers.base import ProviderContext
from providers.e2b_provider import E2BConfig, E2BProvider
from tests.providers.e2b_control_standin import API_KEY, ControlPlaneStandIn
from tests.providers.envd_standin import HOME, EnvdStandIn

WORKDIR = f"{HOME}/workspace"


@pytest.fixture(scope="module", name="envd_server")
def envd_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvdStandIn]:
    server = EnvdStandIn(tmp_path_factory.mktemp("envd")).start()
    yield server
    server.stop()


@pytest.fixture(name="envd")
def envd_fixture(envd_server: EnvdStandIn, monkeypatch: pytest.MonkeyPatch) -> EnvdStandIn:
    """The stand-in with a fresh ``debug_sandbox_id`` sandbox and the SDK aimed at it."""
    for var in ("E2B_API_KEY", "E2B_API_URL", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", envd_server.url)
    envd_server.add_sandbox()
    return envd_server


@pytest.fixture(scope="module", name="control_server")
def control_server_fixture(envd_server: EnvdStandIn) -> Iterator[ControlPlaneStandIn]:
    server = ControlPlaneStandIn(envd_server).start()
    yield server
    server.stop()


@pytest.fixture(name="control")
def control_fixture(
    control_server: ControlPlaneStandIn, envd_server: EnvdStandIn, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ControlPlaneStandIn]:
    """The control-plane stand-in, emptied, with the SDK out of debug mode and aimed at it (its
    sandboxes served by the envd stand-in) and its key in ``E2B_API_KEY``."""
    for var in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("E2B_API_KEY", API_KEY)
    monkeypatch.setenv("E2B_API_URL", control_server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", envd_server.url)
    yield control_server
    for sandbox_id in list(control_server.sandboxes):
        envd_server.kill(sandbox_id)
    control_server.sandboxes.clear()
    control_server.requests.clear()
    control_server.page_size = 100
    control_server.skew = 0.0


def make_provider(store: Store, **config: Any) -> E2BProvider:
    context = ProviderContext(
        store=store, owner="owner-test", env_id=new_id("environment"), env_name="e2b"
    )
    return E2BProvider(context, E2BConfig(**config))


def on_disk(envd: EnvdStandIn, sandbox_path: str, sandbox_id: str = "debug_sandbox_id") -> Path:
    """Where the stand-in keeps a sandbox path on the host (to check what really arrived)."""
    return envd.sandboxes[sandbox_id].host_path(sandbox_path)
