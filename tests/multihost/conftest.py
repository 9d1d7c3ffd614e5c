"""Fixtures for tests on the multi-host network (tests/multihost/README.md).

Every test collected under this directory carries the ``hosts`` marker, so ``make test``
leaves them out and ``make test-hosts`` (and CI) runs them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.hosts import REQUIRE_ENV, Network, SshKey, make_ssh_key, unavailable_reason

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.hosts)


def require_namespaces() -> None:
    """Skip the test when hosts cannot be built here; fail it when CI requires them."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but namespaces are unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture
def network(request: pytest.FixtureRequest) -> Iterator[Network]:
    """A fresh network for one test, torn down afterwards whatever happened."""
    require_namespaces()
    with Network(request.node.name) as net:
        yield net


@pytest.fixture
def ssh_key(tmp_path: Path) -> SshKey:
    """An ed25519 client key pair on the machine (copy it into a host with write_file)."""
    return make_ssh_key(tmp_path / "id_ed25519")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels ssh hosts install narrative from, built once per test session on the machine
    (the hosts have no route to a package index)."""
    from tests.multihost.ssh_hosts import build_wheelhouse

    return build_wheelhouse(str(tmp_path_factory.mktemp("wheelhouse")))
