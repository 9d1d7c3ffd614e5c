"""The fsspec-free local publishing path (transfer.storage_base): a plain local path resolves
as fsspec resolves it, and a local export neither imports fsspec nor publishes differently."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import call_in_own_process, git
from transfer.storage_base import plain_local_path

# No module-level fsspec or transfer.verified import here: export_in_own_process imports this
# module into a fresh interpreter and checks that fsspec stays out of it.

_PLAIN = [
    "out.bundle",
    "./out.bundle",
    "sub/dir/out.bundle",
    "./sub/../out.bundle",
    "/abs/path/out.bundle",
    "/abs//double/out.bundle",
    "~/out.bundle",
    "~",
    ".",
    "dir/",
    "/",
    "with space/and-ünïcode.bundle",
    "..",
]
_NOT_PLAIN = [
    "file:///abs/out.bundle",
    "file:out.bundle",
    "memory://x/out.bundle",
    "s3://bucket/out.bundle",
    "simplecache::s3://bucket/out.bundle",
    "data:text/plain,abc",
    "C:\\out.bundle",
    "c://out.bundle",
    "odd:name.bundle",
    "",
    "   ",
]


@pytest.mark.parametrize("url", _PLAIN)
def test_a_plain_path_resolves_as_fsspec_resolves_it(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec.core
    from fsspec.implementations.local import LocalFileSystem

    monkeypatch.chdir(tmp_path)
    fs, path = fsspec.core.url_to_fs(url)
    assert isinstance(fs, LocalFileSystem)
    assert plain_local_path(url, None) == path
    assert plain_local_path(url, {}) == path


@pytest.mark.parametrize("url", _NOT_PLAIN)
def test_anything_else_is_left_to_fsspec(url: str) -> None:
    assert plain_local_path(url, None) is None


def test_storage_options_are_left_to_fsspec() -> None:
    assert plain_local_path("out.bundle", {"auto_mkdir": True}) is None


def export_in_own_process(workspace: str, out: str) -> dict[str, object]:
    """Export the workspace's store to ``out`` (a plain path) in this fresh interpreter; which
    heavy modules the export imported."""
    from transfer.exporter import export

    result = export(Store.open(workspace=workspace), out)
    return {"sha256": result.sha256, "size": result.size, "fsspec": "fsspec" in sys.modules}


def test_a_local_export_does_not_import_fsspec_and_publishes_alike(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """The fast path's artifact is complete, verifies through the fsspec reader (the other
    implementation of the sidecar protocol) and clones with stock git."""
    from transfer import verified

    take_snapshot(store)
    out = tmp_path / "out" / "all.bundle"
    got = call_in_own_process(
        "tests.transfer.test_storage_base:export_in_own_process", str(workspace), str(out)
    )
    assert got["fsspec"] is False
    data = out.read_bytes()
    assert got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
    assert verified.verify(str(out)) == got["sha256"]
    assert sorted(os.listdir(out.parent)) == ["all.bundle", "all.bundle.sha256"]
    git("clone", "-q", "--mirror", str(out), str(tmp_path / "clone.git"))
    git("--git-dir", str(tmp_path / "clone.git"), "fsck", "--strict", "--no-dangling")


def test_a_full_disk_fails_a_local_export_cleanly(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """ENOSPC met by the artifact's writer thread surfaces as one StorageError, and neither the
    artifact, its sidecar nor the temporary file is left behind."""
    import random
    import subprocess

    from transfer.errors import StorageError
    from transfer.exporter import export

    disk = tmp_path / "small-disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    proc = subprocess.run(mount, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        rng = random.Random(3)
        for i in range(12):
            (workspace / f"big{i}.bin").write_bytes(rng.randbytes(500_000))
        take_snapshot(store)
        with pytest.raises(StorageError, match="No space left"):
            export(store, str(disk / "all.bundle"))
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
