"""A full disk (ENOSPC) under the store: the operation fails in one line, the store stays valid.

The store lives on a 2 MiB tmpfs; a snapshot and an import each need more than that.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NARRATIVE, git


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _run(workspace: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NARRATIVE, "--store", str(store), *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )


def _fill(workspace: Path) -> None:
    for i in range(4):  # incompressible, each under the default size limit, 3.6 MB in all
        (workspace / f"big{i}.bin").write_bytes(os.urandom(900_000))


def _assert_refused_cleanly(proc: subprocess.CompletedProcess[str], store: Path) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0], proc.stderr
    git("--git-dir", str(store), "fsck", "--strict", "--no-dangling")
    assert os.listdir(store / "narrative" / "tmp") == []  # nothing half-written left behind


def test_snapshot_and_import_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    store = small_disk / "store"
    assert _run(workspace, store, "init").returncode == 0
    (workspace / "small.txt").write_text("before the disk filled up\n")
    first = _run(workspace, store, "snapshot", "-m", "small")
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.strip().split()[-1]

    _fill(workspace)
    _assert_refused_cleanly(_run(workspace, store, "snapshot", "-m", "too big"), store)

    # an import that does not fit either
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    other_store = tmp_path / "other-store"
    _fill(other_ws)
    assert _run(other_ws, other_store, "init").returncode == 0
    assert _run(other_ws, other_store, "snapshot").returncode == 0
    bundle = tmp_path / "big.bundle"
    exported = _run(other_ws, other_store, "export", str(bundle))
    assert exported.returncode == 0, exported.stderr
    _assert_refused_cleanly(_run(workspace, store, "import", str(bundle)), store)

    # what was captured before still restores, byte for byte
    out = tmp_path / "restored"
    restored = _run(workspace, store, "restore", first_id, "--to", str(out))
    assert restored.returncode == 0, restored.stderr
    assert (out / "small.txt").read_text() == "before the disk filled up\n"
