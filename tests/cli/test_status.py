"""``narrative status`` (issue 14 item 10): the workspace's thread and snapshot, what changed
since, where the next snapshot goes, the merge in progress and running runs; it writes nothing."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli, store_dir_of, tree_bytes


def test_status_follows_the_workspace(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    fresh = cli.json("status")
    assert fresh["kind"] == "status" and fresh["changes"] is None and fresh["head"] is None
    (workspace / "a.txt").write_text("a\n")
    first = cli.json("snapshot", "-m", "one")
    (workspace / "a.txt").write_text("changed\n")
    (workspace / "b.txt").write_text("b\n")
    before = tree_bytes(store_dir_of(workspace))
    status = cli.json("status")
    assert tree_bytes(store_dir_of(workspace)) == before  # read only
    assert status["head"] == first["id"] and status["thread_name"] == "main"
    assert sorted((c["status"], c["path"]) for c in status["changes"]) == [
        ("A", "b.txt"),
        ("M", "a.txt"),
    ]
    human = cli.run("status").stdout
    assert "M  a.txt" in human and "A  b.txt" in human and first["id"] in human
    cli.run("snapshot", "-m", "two")
    cli.run("restore", first["id"])
    detached = cli.json("status")
    assert detached["head"] == first["id"] and "main-2" in detached["next_snapshot"]
    assert detached["changes"] == []


def test_status_shows_a_merge_in_progress_and_running_runs(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    (workspace / "notes.txt").write_text("1\n2\n3\n")
    base = cli.json("snapshot", "-m", "base")
    (workspace / "notes.txt").write_text("1\nours\n3\n")
    cli.run("snapshot", "-m", "ours")
    cli.run("thread", "create", "other", "--from", base["id"])
    cli.run("restore", base["id"])
    (workspace / "notes.txt").write_text("1\ntheirs\n3\n")
    theirs = cli.json("snapshot", "--thread", "other", "-m", "theirs")
    cli.run("restore", "main")
    assert cli.run("merge", theirs["id"], check=False).returncode == 1  # a conflict
    run = cli.json("run", "start", "--manual", "--agent", "tester")
    status = cli.json("status")
    assert status["merge"]["conflicts"] == ["notes.txt"]
    assert [r["id"] for r in status["running_runs"]] == [run["id"]]
    human = cli.run("status").stdout
    assert "merging" in human and "notes.txt" in human and run["id"] in human
