"""Temporary files a restore writes next to its targets never get into a snapshot, and a
killed restore's leftovers are removed by the next command (issue 12, reliability faults)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from narrative.fsutil import WORKSPACE_TMP_PREFIX
from tests.conftest import Cli, kill_after


def _tmp_files(ws: Path) -> list[Path]:
    """Temporary files of ours (today's prefix, and the one older versions used)."""
    return [p for p in ws.rglob(".narrative-*") if p.is_file()]


def test_a_stale_temp_file_is_never_snapshotted_and_is_removed(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    leftover = workspace / "src" / f"{WORKSPACE_TMP_PREFIX}{os.urandom(8).hex()}"
    leftover.write_text("half-written content of a killed restore\n")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    snap = cli.json("snapshot")
    shown = cli.run("diff", snap["id"], "--name-status").stdout
    assert leftover.name not in shown
    assert not leftover.exists()
    files = cli.run("show", snap["id"], "--json").stdout
    assert WORKSPACE_TMP_PREFIX not in files


def test_restores_killed_mid_write_leave_nothing_that_gets_snapshotted(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    big = workspace / "big"
    big.mkdir()
    for i in range(60):
        (big / f"f{i}.bin").write_bytes(os.urandom(200_000))
    first = cli.json("snapshot")
    for i in range(60):
        (big / f"f{i}.bin").write_bytes(os.urandom(200_000))
    second = cli.json("snapshot")
    rng = random.Random(12)
    landed = 0
    for attempt in range(12):
        target = first if attempt % 2 == 0 else second
        if (
            kill_after(["restore", target["id"]], workspace, rng.uniform(0.05, 0.6))
            == -signal.SIGKILL
        ):
            landed += 1
        if _tmp_files(workspace):
            break
    # whatever the kills left, the next snapshot captures none of it
    for path in _tmp_files(workspace):
        os.utime(path, (time.time() - 3600,) * 2)
    snap = cli.json("snapshot", "--allow-empty")
    names = cli.run("diff", first["id"], snap["id"], "--name-status").stdout
    assert ".narrative-" not in names
    assert _tmp_files(workspace) == []
    assert landed > 0, "no kill landed while a restore was running"
