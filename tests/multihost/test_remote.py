"""The ``remote`` provider between hosts: the contract suite on the developer's machine
against a private clone of an environment on another host's hub, over TLS with the pinned
certificate. (The chain A → B → C is in test_topologies.py.)"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from providers.contract import CHECKS
from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Host, Network

PORT = 3444


@dataclass
class RemoteLab:
    hub: Host
    dev: Host
    hub_store: str
    dev_store: str


def _narrative(host: Host, *args: str, cwd: str) -> bytes:
    done = host.run([host.narrative(), *args], env=host.checkout_env(), cwd=cwd, timeout=180)
    return done.stdout


@pytest.fixture(scope="module")
def lab() -> Iterator[RemoteLab]:
    """A hub host serving a worktree environment ``box`` over TLS, and a developer host
    logged in to it as ``hub``."""
    require_namespaces()
    with Network("remote") as network:
        hub = network.add_host("hub", sees_checkout=True)
        dev = network.add_host("dev", sees_checkout=True)
        hub_store, dev_store = f"{hub.home}/work", f"{dev.home}/work"
        hub.write_file(f"{hub_store}/README.md", "# hub\n")
        dev.write_file(f"{dev_store}/notes.txt", "draft\n")
        _narrative(hub, "init", cwd=hub_store)
        _narrative(dev, "init", cwd=dev_store)
        _narrative(hub, "env", "create", "box", "--provider", "worktree", cwd=hub_store)
        server = hub.popen(
            [hub.narrative(), "serve", "--host", hub.address, "--port", str(PORT),
             "--tls-self-signed", "--json"],
            env=hub.checkout_env(), cwd=hub_store, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            fingerprint = json.loads(server.stdout.readline())["fingerprint"]
            code = _narrative(hub, "hub", "invite", "dev", cwd=hub_store).decode().strip()
            _narrative(dev, "hub", "login", f"wss://hub:{PORT}", code, "--name", "hub",
                       "--fingerprint", fingerprint, cwd=dev_store)  # fmt: skip
            yield RemoteLab(hub, dev, hub_store, dev_store)
        finally:
            server.terminate()
            server.wait(20)


@pytest.mark.parametrize("check", list(CHECKS))
def test_contract_against_another_hosts_hub(lab: RemoteLab, check: str) -> None:
    script = (
        "import tempfile, pathlib\n"
        "from providers.contract import CHECKS, ContractTarget\n"
        "target = ContractTarget('remote', {'hub': 'hub', 'environment': 'box'})\n"
        "with tempfile.TemporaryDirectory() as scratch:\n"
        f"    CHECKS[{check!r}](target, pathlib.Path(scratch))\n"
        "print('contract-ok')\n"
    )
    done = lab.dev.run(
        [lab.dev.python(), "-c", script], env=lab.dev.checkout_env(), check=False, timeout=240
    )
    assert done.returncode == 0 and b"contract-ok" in done.stdout, done.stderr.decode()[-3000:]
    # the clones it made ran on the hub's host, and are gone with their environments
    listed = json.loads(_narrative(lab.hub, "env", "list", "--json", cwd=lab.hub_store))
    assert [e["name"] for e in listed["items"]] == ["box"], listed
