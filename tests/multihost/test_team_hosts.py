"""A shared hub on one host, two developers' CLIs on two others, over TLS (issue 16).

``hub`` serves its store on its network address with a self-signed certificate; ``alice`` and
``bob`` each log in with an invite code and the certificate's fingerprint (pinned), run on the
hub's shared environment, and get their results home into their own stores. Neither sees or
controls the other's run; a developer without the right fingerprint is refused before any
credential is sent; plain ``ws://`` off loopback is refused.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Host, Network

PORT = 3443


def narrative(
    host: Host, *args: str, cwd: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[bytes]:
    return host.run(
        [host.narrative(), *args], env=host.checkout_env(), cwd=cwd, check=check, timeout=timeout
    )


@pytest.fixture
def team() -> Iterator[tuple[Host, Host, Host, str]]:
    """The hub host serving over TLS, and two developers' hosts; the certificate's
    fingerprint as ``serve`` printed it."""
    require_namespaces()
    with Network("team") as network:
        hub = network.add_host("hub", sees_checkout=True)
        alice = network.add_host("alice", sees_checkout=True)
        bob = network.add_host("bob", sees_checkout=True)
        store = f"{hub.home}/shared"
        hub.write_file(f"{store}/README.md", "# shared\n")
        narrative(hub, "init", cwd=store)
        narrative(hub, "env", "create", "box", "--provider", "worktree", cwd=store)
        plain = narrative(hub, "serve", "--host", hub.address, cwd=store, check=False, timeout=30)
        assert plain.returncode == 1 and b"--tls-self-signed" in plain.stderr, plain.stderr
        server = hub.popen(
            [hub.narrative(), "serve", "--host", hub.address, "--port", str(PORT),
             "--tls-self-signed", "--json"],
            env=hub.checkout_env(), cwd=store, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        assert ready["url"] == f"wss://{hub.address}:{PORT}", ready
        try:
            yield hub, alice, bob, str(ready["fingerprint"])
        finally:
            server.terminate()
            server.wait(20)


def _login(hub: Host, dev: Host, fingerprint: str) -> str:
    code = narrative(hub, "hub", "invite", dev.name, cwd=f"{hub.home}/shared").stdout.decode()
    work = f"{dev.home}/work"
    dev.write_file(f"{work}/notes.txt", f"{dev.name}'s draft\n")
    narrative(dev, "init", cwd=work)
    url = f"wss://hub:{PORT}"
    narrative(dev, "hub", "login", url, code.strip(), "--name", "team",
              "--fingerprint", fingerprint, cwd=work)  # fmt: skip
    return work


def test_two_developers_share_a_hub_over_tls(team: tuple[Host, Host, Host, str]) -> None:
    hub, alice, bob, fingerprint = team
    alice_work = _login(hub, alice, fingerprint)
    bob_work = _login(hub, bob, fingerprint)
    runs = {}
    for dev, work in ((alice, alice_work), (bob, bob_work)):
        script = f"echo reviewed by the hub for {dev.name} >> notes.txt"
        done = narrative(dev, "-q", "run", "start", "--hub", "team", "--env", "box", "--",
                         "sh", "-c", script, cwd=work)  # fmt: skip
        runs[dev.name] = done.stdout.decode().split()[-1]
        narrative(dev, "merge", runs[dev.name], cwd=work)
        notes = dev.read_file(f"{work}/notes.txt").decode()
        assert notes == f"{dev.name}'s draft\nreviewed by the hub for {dev.name}\n", notes
        store = json.loads(narrative(dev, "info", "--json", cwd=work).stdout)["store"]
        fsck = dev.run(["git", "--git-dir", str(store), "fsck", "--strict"], check=False)
        assert fsck.returncode == 0, fsck.stderr.decode()
    listed = json.loads(
        narrative(bob, "run", "list", "--hub", "team", "--json", cwd=bob_work).stdout
    )
    assert [r["id"] for r in listed["items"]] == [runs["bob"]], listed
    refused = narrative(bob, "run", "kill", "--hub", "team", runs["alice"], cwd=bob_work,
                        check=False)  # fmt: skip
    assert refused.returncode == 1 and b"Traceback" not in refused.stderr, refused.stderr
    # a wrong pin: refused in the TLS handshake, before the invite code is sent
    code = narrative(hub, "hub", "invite", "mallory", cwd=f"{hub.home}/shared").stdout.decode()
    wrong = "sha256:" + "0" * 64
    refused = narrative(bob, "hub", "login", f"wss://hub:{PORT}", code.strip(), "--name", "x",
                        "--fingerprint", wrong, cwd=bob_work, check=False)  # fmt: skip
    assert refused.returncode == 1 and b"fingerprint" in refused.stderr.lower(), refused.stderr
    audit = narrative(hub, "hub", "audit", "--json", cwd=f"{hub.home}/shared").stdout.decode()
    assert "alice" in audit and "bob" in audit
