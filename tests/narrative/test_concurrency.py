"""Many writers at once, and kill -9 at any moment: nothing lost, the store always consistent."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NARRATIVE, Cli, Killer, git, git_tree_of


def _fsck(store: str) -> None:
    git("--git-dir", store, "fsck", "--strict", "--no-dangling", "--connectivity-only")
    git("--git-dir", store, "fsck", "--strict", "--no-dangling")


def _chain(store: str, ref: str) -> list[str]:
    out = git("--git-dir", store, "log", "--format=%H", "--first-parent", ref)
    return out.split()


@pytest.mark.slow
def test_eight_concurrent_processes_lose_nothing(workspace: Path) -> None:
    cli = Cli(workspace)
    info = cli.json("init")
    store = info["store"]
    main = info["default_thread"]
    others = [cli.json("thread", "create", f"t{i}")["id"] for i in range(4)]
    threads = [main] * 4 + others
    script = (
        "import json, subprocess, sys, pathlib\n"
        "ws, n, thread = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
        "for i in range(3):\n"
        "    (ws / f'w{n}.txt').write_text(f'{n}-{i}\\n')\n"
        f"    out = subprocess.run([{NARRATIVE!r}, 'snapshot', '--thread', thread, '--json'],\n"
        "                         cwd=ws, capture_output=True, text=True, check=True).stdout\n"
        "    print(out.replace('\\n', ' '))\n"
    )
    procs = [
        subprocess.Popen(
            ["python3", "-c", script, str(workspace), str(n), t],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, t in enumerate(threads)
    ]
    created: dict[str, list[str]] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        for line in out.strip().splitlines():
            snap = json.loads(line)
            if snap["created"]:
                created.setdefault(snap["thread"], []).append(snap["commit"])
    _fsck(store)
    for thread, commits in created.items():
        chain = _chain(store, f"refs/narrative/threads/{thread}")
        assert set(commits) <= set(chain), "a created snapshot is missing from its thread"
        assert len(chain) == len(commits), "every commit on the thread was reported by a writer"
    # Each same-thread writer's last write is in some snapshot of the thread: its own, or one a
    # concurrent writer took after the write (then its own snapshot was a no-op).
    chain = _chain(store, f"refs/narrative/threads/{main}")
    for n in range(4):
        seen = {git("--git-dir", store, "show", f"{c}:w{n}.txt", check=False) for c in chain}
        assert f"{n}-2\n" in seen, f"writer {n}'s last state was lost"
    # the final state is exactly what git sees
    final = cli.json("snapshot", "--allow-empty")
    assert final["tree"] == git_tree_of(workspace, workspace.parent)


def _populate(ws: Path, files: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(files):
        d = ws / f"d{i % 37}" / f"e{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(rng.randbytes(rng.randint(100, 20000)))


@pytest.mark.long  # several seconds: make test stays under ten minutes
@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_consistent_store(workspace: Path) -> None:
    cli = Cli(workspace)
    store = cli.json("init")["store"]
    _populate(workspace, 3000, 1)
    rng = random.Random(7)
    killed = 0
    killer = Killer(rng, guess=1.0)
    for round_no in range(8):
        for i in rng.sample(range(3000), 200):
            path = workspace / f"d{i % 37}" / f"e{i % 5}" / f"f{i}.txt"
            path.write_bytes(os.urandom(rng.randint(100, 20000)))
        (workspace / f"round{round_no}.txt").write_text(str(round_no))
        args = ["gc", "--keep-last", "2"] if round_no % 3 == 2 else ["snapshot", "-m", "r"]
        if killer.kill(args, workspace) == -signal.SIGKILL:
            killed += 1
        _fsck(store)
        for line in git("--git-dir", store, "for-each-ref", "--format=%(objectname)").split():
            assert git("--git-dir", store, "cat-file", "-t", line).strip() == "commit"
    assert killed >= 3, "the kills must actually interrupt work for this test to mean anything"
    # the store keeps working and is exact afterwards
    snap = cli.json("snapshot")
    assert snap["tree"] == git_tree_of(workspace, workspace.parent)
    _fsck(store)
