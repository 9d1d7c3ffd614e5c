"""The workspace HEAD: restore never moves a thread, and the next snapshot after restoring an
older snapshot starts a new thread instead of dropping later work (issue 12 bug 3)."""

from __future__ import annotations

from pathlib import Path

from narrative.store import Store
from tests.conftest import Cli, git, two_machines


def _head(cli: Cli, thread: str) -> str:
    return str(cli.json("show", thread)["id"])


def _fsck(workspace: Path) -> None:
    git("--git-dir", Store.open(workspace=str(workspace)).git_dir, "fsck", "--strict")


def test_restore_of_an_older_snapshot_never_moves_its_thread(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    (workspace / "notes.txt").write_text("v1\n")
    first = cli.json("snapshot", "-m", "v1")
    (workspace / "notes.txt").write_text("v2\n")
    second = cli.json("snapshot", "-m", "v2")
    thread = second["thread"]
    cli.run("restore", first["id"])
    assert (workspace / "notes.txt").read_text() == "v1\n"
    assert _head(cli, thread) == second["id"]  # the thread did not move
    info = cli.json("info")
    assert info["workspace_head"] == first["id"]
    assert "new thread" in info["next_snapshot"]
    (workspace / "notes.txt").write_text("v1 edited\n")
    proc = cli.run("snapshot", "-m", "edit of v1", "--json")
    third = __import__("json").loads(proc.stdout)
    assert third["new_thread"] is True and third["thread"] != thread
    assert third["parent"] == first["id"]
    assert "starts thread main-2" in proc.stderr
    assert _head(cli, thread) == second["id"]
    # v2 is intact and restores byte-identically
    out = tmp_path / "v2"
    cli.run("restore", second["id"], "--to", str(out))
    assert (out / "notes.txt").read_text() == "v2\n"
    # the workspace now continues the new thread
    (workspace / "notes.txt").write_text("v1 edited twice\n")
    fourth = cli.json("snapshot")
    assert fourth["thread"] == third["thread"] and fourth["new_thread"] is False
    _fsck(workspace)


def test_restore_keeps_unsnapshotted_work_on_the_restore_backup_thread(
    cli: Cli, workspace: Path
) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("one\n")
    first = cli.json("snapshot")
    (workspace / "a.txt").write_text("two\n")
    second = cli.json("snapshot")
    (workspace / "a.txt").write_text("never snapshotted\n")
    restored = cli.json("restore", first["id"])
    backup = restored["safety_snapshot"]
    assert backup not in (first["id"], second["id"])
    assert _head(cli, second["thread"]) == second["id"]
    listed = {s["id"]: s for s in cli.items("log", "--all")}
    assert backup in listed
    threads = {t["id"]: t["name"] for t in cli.items("thread", "list")}
    assert threads[listed[backup]["thread"]] == "restore-backup"
    # a restore of a workspace that equals its HEAD needs no backup
    again = cli.json("restore", second["id"])
    assert again["safety_snapshot"] == first["id"]
    cli.run("restore", backup)
    assert (workspace / "a.txt").read_text() == "never snapshotted\n"
    _fsck(workspace)


def test_after_a_pull_a_restore_and_snapshot_never_drop_the_other_sides_work(
    tmp_path: Path,
) -> None:
    """The issue's scenario: A and B share a thread through a remote; B's work arrives at A by
    pull; A restores an older snapshot and snapshots. The thread still ends in B's work."""
    remote, a, b = two_machines(tmp_path, ("a", "b"))
    a_ws, b_ws = a.cwd, b.cwd
    a.run("init")
    (a_ws / "shared.txt").write_text("zero\n")
    zero = a.json("snapshot", "-m", "zero")
    (a_ws / "shared.txt").write_text("one\n")
    one = a.json("snapshot", "-m", "one")
    thread = one["thread"]
    a.run("remote", "add", "origin", str(remote))
    a.run("push", "origin")
    b.run("init")
    b.run("remote", "add", "origin", str(remote))
    b.run("pull", "origin")
    b.run("restore", thread)
    (b_ws / "from-b.txt").write_text("B's work\n")
    b_snap = b.json("snapshot", "--thread", thread, "-m", "B's work")
    b.run("push", "origin")
    a.run("pull", "origin")
    assert _head(a, thread) == b_snap["id"]
    a.run("restore", zero["id"])
    (a_ws / "shared.txt").write_text("zero, edited by A\n")
    a_snap = a.json("snapshot", "-m", "A after restoring zero")
    assert a_snap["thread"] != thread
    assert _head(a, thread) == b_snap["id"]  # B's work is still the thread's head
    out = tmp_path / "check"
    a.run("restore", thread, "--to", str(out))
    assert (out / "from-b.txt").read_text() == "B's work\n"
    for ws in (a_ws, b_ws):
        _fsck(ws)
