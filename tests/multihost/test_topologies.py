"""The seeds' topologies across hosts, with ``ssh`` environments (issue 16).

Fan-out: one command on the developer's machine starts the same run on three boxes and gathers
the three results; each comes home on its own thread and names the host it ran on. Linear: a
chain of hubs A → B → C, each treating the next as an environment (``remote``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Host, Network, make_ssh_key
from tests.multihost.ssh_hosts import Lab, make_lab

CHAIN_PORT = 3443


@pytest.fixture
def lab3(tmp_path: Path, wheelhouse: Path) -> Iterator[Lab]:
    require_namespaces()
    key = make_ssh_key(tmp_path / "id_ed25519")
    with Network("topologies") as network:
        yield make_lab(network, key, wheelhouse, boxes=3)


def test_fan_out_to_three_hosts(lab3: Lab) -> None:
    """A → [B, C, D]: one ``run start`` with three ``--env`` runs on three hosts at once;
    every result comes home, each from its own host, and the developer's store is sound."""
    ws = lab3.init_workspace({"task.txt": "count\n"})
    names = ["b", "c", "d"]
    for name, box in zip(names, lab3.boxes, strict=True):
        lab3.narrative("env", "create", name, "--provider", "ssh", *lab3.config(box), cwd=ws)
    envs = [part for name in names for part in ("--env", name)]
    done = lab3.narrative(
        "-q", "run", "start", *envs, "--", "sh", "-c", "hostname > host.txt", cwd=ws
    )
    run_ids = done.stdout.decode().split()
    assert len(run_ids) == 3, done.stdout
    hosts = set()
    for run_id in run_ids:
        shown = lab3.json("run", "show", run_id, cwd=ws)
        assert shown["status"] == "succeeded", shown
        diff = lab3.narrative("diff", run_id, cwd=ws).stdout.decode()
        hosts.update(line[1:] for line in diff.splitlines() if line.startswith("+box"))
    assert hosts == {"box1", "box2", "box3"}, hosts
    lab3.assert_store_sound(ws)


def _narrative(host: Host, *args: str, cwd: str, timeout: float = 240) -> bytes:
    done = host.run([host.narrative(), *args], env=host.checkout_env(), cwd=cwd, timeout=timeout)
    return done.stdout


def _serve_tls(host: Host, store: str) -> tuple[subprocess.Popen[bytes], str]:
    """``narrative serve`` of ``store`` on the host's address over TLS; the process and the
    certificate's fingerprint."""
    server = host.popen(
        [host.narrative(), "serve", "--host", host.address, "--port", str(CHAIN_PORT),
         "--tls-self-signed", "--json"],
        env=host.checkout_env(), cwd=store, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert server.stdout is not None
    ready = json.loads(server.stdout.readline())
    return server, str(ready["fingerprint"])


def _log_in(hub: Host, hub_store: str, dev: Host, dev_store: str, fingerprint: str) -> None:
    code = _narrative(hub, "hub", "invite", dev.name, cwd=hub_store).decode().strip()
    url = f"wss://{hub.name}:{CHAIN_PORT}"
    _narrative(dev, "hub", "login", url, code, "--name", hub.name,
               "--fingerprint", fingerprint, cwd=dev_store)  # fmt: skip


def test_linear_chain_across_three_hosts() -> None:
    """A → B → C: the developer on ``a`` runs in an environment of ``b``'s hub that is itself
    an environment of ``c``'s hub (each ``remote``, over TLS with pinned certificates). The
    command runs on ``c``; its result comes home through ``b`` to ``a``, where it merges; ``a``
    never talks to ``c``, and every store on the way stays sound."""
    require_namespaces()
    with Network("chain") as network:
        a, b, c = (network.add_host(name, sees_checkout=True) for name in ("a", "b", "c"))
        stores = {host.name: f"{host.home}/work" for host in (a, b, c)}
        c.write_file(f"{stores['c']}/README.md", "# c\n")
        b.write_file(f"{stores['b']}/README.md", "# b\n")
        a.write_file(f"{stores['a']}/notes.txt", "draft\n")
        for host in (a, b, c):
            _narrative(host, "init", cwd=stores[host.name])
        _narrative(c, "env", "create", "box", "--provider", "worktree", cwd=stores["c"])
        servers = []
        try:
            server_c, print_c = _serve_tls(c, stores["c"])
            servers.append(server_c)
            _log_in(c, stores["c"], b, stores["b"], print_c)
            remote_of = ("env", "create", "--provider", "remote", "--config")
            _narrative(b, *remote_of, "hub=c", "--config", "environment=box", "to-c",
                       cwd=stores["b"])  # fmt: skip
            server_b, print_b = _serve_tls(b, stores["b"])
            servers.append(server_b)
            _log_in(b, stores["b"], a, stores["a"], print_b)
            _narrative(a, *remote_of, "hub=b", "--config", "environment=to-c", "far",
                       cwd=stores["a"])  # fmt: skip
            script = "hostname; cat notes.txt; echo made on $(hostname) >> notes.txt"
            done = a.run([a.narrative(), "-q", "run", "start", "--env", "far", "--", "sh", "-c",
                          script], env=a.checkout_env(), cwd=stores["a"], timeout=300)  # fmt: skip
            run_id = done.stdout.decode().split()[-1]
            assert done.stderr.decode().splitlines()[:2] == ["c", "draft"], done.stderr
            _narrative(a, "merge", run_id, cwd=stores["a"])
            notes = a.read_file(f"{stores['a']}/notes.txt").decode()
            assert notes == "draft\nmade on c\n", notes
            for host in (a, b, c):
                info = json.loads(_narrative(host, "info", "--json", cwd=stores[host.name]))
                fsck = host.run(["git", "--git-dir", info["store"], "fsck", "--strict"],
                                check=False)  # fmt: skip
                assert fsck.returncode == 0, (host.name, fsck.stderr.decode())
            # a delegated to b, b to c: each hub ran one run and holds the record of the run one
            # hop down that made its result (the provenance that came home with it)
            for host, count in ((a, 2), (b, 2), (c, 1)):
                runs = json.loads(_narrative(host, "run", "list", "--json", cwd=stores[host.name]))
                statuses = [r["status"] for r in runs["items"]]
                assert statuses == ["succeeded"] * count, (host.name, runs)
        finally:
            for server in servers:
                server.terminate()
                server.wait(20)
