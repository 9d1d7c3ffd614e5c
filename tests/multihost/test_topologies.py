"""The seeds' topologies across hosts, with ``ssh`` environments (issue 16).

Fan-out: one command on the developer's machine starts the same run on three boxes and gathers
the three results; each comes home on its own thread and names the host it ran on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Network, make_ssh_key
from tests.multihost.ssh_hosts import Lab, make_lab


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
