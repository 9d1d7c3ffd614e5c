"""Restores never lose work: safety snapshots, ignored and skipped files kept, git as oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from narrative.errors import RestoreError
from narrative.history import resolve_snapshot
from narrative.restore import materialize, restore_workspace
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git, tree_bytes


def _populate(ws: Path) -> None:
    (ws / "lib").mkdir()
    (ws / "lib" / "util.py").write_text("def f():\n    return 1\n")
    (ws / "tool.sh").write_text("#!/bin/sh\n")
    (ws / "tool.sh").chmod(0o755)
    (ws / "alias").symlink_to("tool.sh")


def test_restore_to_matches_git_checkout(store: Store, workspace: Path, tmp_path: Path) -> None:
    _populate(workspace)
    snap = take_snapshot(store).snapshot
    ours = tmp_path / "ours"
    result = materialize(store, snap, str(ours))
    assert result.written == 5
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    git(
        "--git-dir",
        store.git_dir,
        "--work-tree",
        str(oracle),
        "checkout",
        "-f",
        snap.commit,
        "--",
        ".",
        env={"GIT_INDEX_FILE": str(tmp_path / "idx")},
    )
    assert tree_bytes(ours) == tree_bytes(oracle)
    assert os.readlink(ours / "alias") == "tool.sh"
    assert os.stat(ours / "tool.sh").st_mode & 0o111


def test_restore_to_refuses_a_non_empty_directory(store: Store, tmp_path: Path) -> None:
    snap = take_snapshot(store).snapshot
    target = tmp_path / "busy"
    target.mkdir()
    (target / "precious").write_text("keep me")
    with pytest.raises(RestoreError):
        materialize(store, snap, str(target))
    assert (target / "precious").read_text() == "keep me"


def test_restore_workspace_round_trip_and_undo(store: Store, workspace: Path) -> None:
    _populate(workspace)
    old = take_snapshot(store, message="old").snapshot
    before = tree_bytes(workspace)
    (workspace / "lib" / "util.py").write_text("changed\n")
    (workspace / "new_dir").mkdir()
    (workspace / "new_dir" / "new.txt").write_text("new\n")
    os.unlink(workspace / "alias")
    (workspace / "alias").write_text("now a file")
    os.chmod(workspace / "tool.sh", 0o644)
    result = restore_workspace(store, old)
    after = tree_bytes(workspace)
    assert {k: v for k, v in after.items() if not k.startswith(".narrative")} == {
        k: v for k, v in before.items() if not k.startswith(".narrative")
    }
    assert not (workspace / "new_dir").exists()  # emptied by the restore, so removed
    # the safety snapshot holds the state the restore replaced: undo brings it back
    assert result.safety_snapshot is not None
    safety = resolve_snapshot(store, result.safety_snapshot)
    restore_workspace(store, safety)
    assert (workspace / "new_dir" / "new.txt").read_text() == "new\n"
    assert (workspace / "lib" / "util.py").read_text() == "changed\n"
    assert (workspace / "alias").read_text() == "now a file"


def test_restore_never_deletes_ignored_or_skipped_files(store: Store, workspace: Path) -> None:
    store.config.max_file_size = 100
    store.save_config()
    old = take_snapshot(store).snapshot
    (workspace / ".gitignore").write_text("*.log\nbuild/\n")
    (workspace / "debug.log").write_text("ignored, never snapshotted")
    (workspace / "build").mkdir()
    (workspace / "build" / "artifact").write_text("ignored dir")
    (workspace / "huge.bin").write_bytes(b"z" * 500)
    (workspace / "src" / "extra.log").write_text("ignored inside a tracked dir")
    restore_workspace(store, old)
    assert (workspace / "debug.log").read_text() == "ignored, never snapshotted"
    assert (workspace / "build" / "artifact").exists()
    assert (workspace / "huge.bin").stat().st_size == 500
    assert (workspace / "src" / "extra.log").exists()
    assert not (workspace / ".gitignore").exists()  # it was snapshotted, so it may go


def test_restore_refuses_to_replace_a_directory_holding_unsnapshotted_files(
    store: Store, workspace: Path
) -> None:
    (workspace / "thing").write_text("a file in the old snapshot\n")
    old = take_snapshot(store).snapshot
    os.unlink(workspace / "thing")
    (workspace / "thing").mkdir()
    (workspace / "thing" / ".gitignore").write_text("*.secret\n")
    (workspace / "thing" / "key.secret").write_text("ignored, so never snapshotted")
    with pytest.raises(RestoreError, match="not snapshotted"):
        restore_workspace(store, old)
    assert (workspace / "thing" / "key.secret").read_text() == "ignored, so never snapshotted"


def test_restore_refuses_to_write_through_an_ignored_symlink(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    (workspace / "out").mkdir()
    (workspace / "out" / "report.txt").write_text("report\n")
    old = take_snapshot(store).snapshot
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "out" / "report.txt").unlink()
    (workspace / "out").rmdir()
    (workspace / "out").symlink_to(outside)
    (workspace / ".gitignore").write_text("/out\n")
    with pytest.raises(RestoreError, match="in the way"):
        restore_workspace(store, old)
    assert list(outside.iterdir()) == []
