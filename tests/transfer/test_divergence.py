"""Diverged threads can be reconciled (issue 12 bug 2): remote-tracking names resolve, a pull
of a thread that moved on both sides merges it into the workspace as a two-parent snapshot, and
the next push fast-forwards; conflicts stop the pull with nothing lost."""

from __future__ import annotations

from pathlib import Path

from narrative.store import Store

from ..conftest import Cli, git


def _pair(tmp_path: Path) -> tuple[Cli, Cli, Path, Path, str]:
    """Alice and Bob share a thread through a directory remote; returns its id."""
    remote = tmp_path / "remote"
    remote.mkdir()
    a_ws, b_ws = tmp_path / "alice", tmp_path / "bob"
    a_ws.mkdir()
    b_ws.mkdir()
    alice, bob = Cli(a_ws), Cli(b_ws)
    alice.run("init")
    (a_ws / "notes.txt").write_text("line 1\nline 2\nline 3\n")
    thread = alice.json("snapshot", "-m", "first")["thread"]
    for cli in (alice, bob):
        if cli is bob:
            cli.run("init")
        cli.run("remote", "add", "origin", str(remote))
    alice.run("push", "origin")
    bob.run("pull", "origin")
    bob.run("restore", "origin/main")
    return alice, bob, a_ws, b_ws, thread


def _fsck(ws: Path) -> None:
    git("--git-dir", Store.open(workspace=str(ws)).git_dir, "fsck", "--strict", "--no-dangling")


def test_pull_merges_a_diverged_thread_and_push_then_fast_forwards(tmp_path: Path) -> None:
    alice, bob, a_ws, b_ws, thread = _pair(tmp_path)
    (b_ws / "bob.txt").write_text("bob\n")
    assert bob.json("snapshot", "-m", "bob")["thread"] == thread
    bob.run("push", "origin")
    (a_ws / "alice.txt").write_text("alice\n")
    alice.run("snapshot", "-m", "alice")
    refused = alice.run("push", "origin", check=False)
    assert refused.returncode == 1 and "pull" in refused.stderr
    alice.run("pull", "origin")
    assert (a_ws / "bob.txt").read_text() == "bob\n" and (a_ws / "alice.txt").exists()
    store = Store.open(workspace=str(a_ws))
    parents = git(
        "--git-dir", store.git_dir, "rev-list", "--parents", "-n1", store.thread_ref(thread)
    )
    assert len(parents.split()) == 3  # the merge snapshot has two parents
    alice.run("push", "origin")  # a fast-forward now
    bob.run("pull", "origin")
    assert (b_ws / "alice.txt").read_text() == "alice\n"  # the workspace followed the pull
    assert next(s["message"] for s in bob.json("log", "origin/main", "-n", "1")).startswith("merge")
    for ws in (a_ws, b_ws):
        _fsck(ws)


def test_conflicting_pull_stops_with_both_sides_kept(tmp_path: Path) -> None:
    alice, bob, a_ws, b_ws, _thread = _pair(tmp_path)
    (b_ws / "notes.txt").write_text("line 1\nbob's line 2\nline 3\n")
    bob.run("snapshot", "-m", "bob")
    bob.run("push", "origin")
    (a_ws / "notes.txt").write_text("line 1\nalice's line 2\nline 3\n")
    alice.run("snapshot", "-m", "alice")
    proc = alice.run("pull", "origin", check=False)
    assert proc.returncode == 1 and "conflict" in proc.stdout + proc.stderr
    text = (a_ws / "notes.txt").read_text()
    assert "alice's line 2" in text and "bob's line 2" in text  # markers, nothing lost
    out = tmp_path / "theirs"
    alice.run("restore", "origin/main", "--to", str(out))
    assert "bob's line 2" in (out / "notes.txt").read_text()
    _fsck(a_ws)


def test_pull_merges_a_teammates_gitignore_edit(
    tmp_path: Path,
) -> None:
    """``pull`` merges like ``git pull``, an ignore-file change included (only ``narrative
    merge`` holds such a change for ``--force``, see docs/security.md)."""
    alice, bob, a_ws, b_ws, _ = _pair(tmp_path)
    (b_ws / ".gitignore").write_text("*.log\n")
    bob.run("snapshot", "-m", "bob ignores logs")
    bob.run("push", "origin")
    (a_ws / "alice.txt").write_text("alice\n")
    alice.run("snapshot", "-m", "alice")
    alice.run("pull", "origin")
    assert (a_ws / ".gitignore").read_text() == "*.log\n"
    assert alice.json("log", "-n", "1")[0]["message"].startswith("merge")
    _fsck(a_ws)
