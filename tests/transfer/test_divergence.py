"""Diverged threads can be reconciled (issue 12 bug 2): remote-tracking names resolve, a pull
of a thread that moved on both sides merges it into the workspace as a two-parent snapshot, and
the next push fast-forwards; conflicts stop the pull with nothing lost."""

from __future__ import annotations

from pathlib import Path

from narrative.store import Store
from tests.conftest import Cli, git, two_machines


def _pair(tmp_path: Path) -> tuple[Cli, Cli, Path, Path, str]:
    """Alice and Bob share a thread through a directory remote; returns its id."""
    remote, alice, bob = two_machines(tmp_path)
    a_ws, b_ws = alice.cwd, bob.cwd
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


def _head_and_parents(ws: Path, thread: str) -> list[str]:
    """A thread's head commit and its parents, as stock git reads them."""
    store = Store.open(workspace=str(ws))
    return git(
        "--git-dir", store.git_dir, "rev-list", "--parents", "-n1", store.thread_ref(thread)
    ).split()


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
    assert len(_head_and_parents(a_ws, thread)) == 3  # the merge snapshot has two parents
    alice.run("push", "origin")  # a fast-forward now
    bob.run("pull", "origin")
    assert (b_ws / "alice.txt").read_text() == "alice\n"  # the workspace followed the pull
    [tip] = bob.items("log", "origin/main", "-n", "1")
    assert tip["message"].startswith("merge")
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


def test_a_pending_merge_of_another_thread_is_merged_when_that_thread_is_restored(
    tmp_path: Path,
) -> None:
    """A thread that is not the workspace's current one and moved on both sides: pull writes
    nothing to the workspace and lists it in info; restoring it merges the remote's side."""
    alice, bob, a_ws, b_ws, main = _pair(tmp_path)
    alice.run("thread", "create", "side")
    (a_ws / "side.txt").write_text("side 1\n")
    side = alice.json("snapshot", "--thread", "side", "-m", "side")["thread"]
    alice.run("restore", main)  # alice works on main again
    alice.run("push", "origin")
    bob.run("pull", "origin")
    bob.run("restore", "origin/side")
    (b_ws / "bob-side.txt").write_text("bob\n")
    assert bob.json("snapshot", "-m", "bob on side")["thread"] == side
    bob.run("push", "origin")
    alice.run("restore", "side")
    (a_ws / "alice-side.txt").write_text("alice\n")
    alice.run("snapshot", "-m", "alice on side")
    alice.run("restore", main)
    before = sorted(p.name for p in a_ws.iterdir())
    pulled = alice.json("pull", "origin")
    assert pulled["pending"] == [side] and pulled["merge"] is None
    assert sorted(p.name for p in a_ws.iterdir()) == before  # nothing written
    assert side in alice.json("info")["pending_merges"]
    restored = alice.json("restore", "side")
    assert restored["pending_merge"]["snapshot"], restored  # a recorded two-parent merge
    assert (a_ws / "bob-side.txt").read_text() == "bob\n"
    assert (a_ws / "alice-side.txt").read_text() == "alice\n"
    assert alice.json("info")["pending_merges"] is None
    assert len(_head_and_parents(a_ws, side)) == 3
    alice.run("push", "origin")  # a fast-forward now
    _fsck(a_ws)


def test_continue_records_what_was_merged_even_after_the_name_moved(tmp_path: Path) -> None:
    """A merge of ``origin/main`` stopped on a conflict; a fetch then moves ``origin/main``.
    The merge snapshot's second parent must be the commit merged, not the new head: claiming
    the newer one would mark work as merged that never reached the workspace."""
    alice, bob, a_ws, b_ws, thread = _pair(tmp_path)
    (b_ws / "notes.txt").write_text("line 1\nbob's line 2\nline 3\n")
    bob.run("snapshot", "-m", "bob")
    bob.run("push", "origin")
    (a_ws / "notes.txt").write_text("line 1\nalice's line 2\nline 3\n")
    alice.run("snapshot", "-m", "alice")
    assert alice.run("pull", "origin", check=False).returncode == 1  # conflict, in progress
    store = Store.open(workspace=str(a_ws))
    merged = store.refs.read(f"refs/narrative/remotes/origin/threads/{thread}")
    (b_ws / "later.txt").write_text("bob's later work\n")
    bob.run("snapshot", "-m", "bob later")
    bob.run("push", "origin")
    alice.run("fetch", "origin")  # origin/main moves on
    (a_ws / "notes.txt").write_text("line 1\nboth line 2s\nline 3\n")
    alice.run("merge", "--continue")
    assert merged is not None and _head_and_parents(a_ws, thread)[2] == merged.hex()
    alice.run("pull", "origin")  # bob's later work is still to come, and comes
    assert (a_ws / "later.txt").read_text() == "bob's later work\n"
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
    assert alice.items("log", "-n", "1")[0]["message"].startswith("merge")
    _fsck(a_ws)


def test_a_thread_name_shared_after_a_pull_means_the_current_thread(tmp_path: Path) -> None:
    """Bob's store has his own empty ``main`` and Alice's pulled ``main``; every name lookup
    (snapshot references and thread arguments alike) picks the one his workspace is on."""
    _alice, bob, _a_ws, _b_ws, thread = _pair(tmp_path)
    names = [t["name"] for t in bob.items("thread", "list")]
    assert names.count("main") == 2
    assert bob.json("thread", "show", "main")["id"] == thread
    assert bob.json("show", "main")["thread"] == thread
    bob.run("thread", "reset", "main", "main")  # a no-op move, but resolved without ambiguity
