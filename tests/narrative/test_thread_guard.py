"""Thread heads only move forward (issue 12 bug 3, "no command ever makes a thread head stop
being a descendant of what it was"): the guard in RefStore.update, ``thread reset [--force]``,
the head log behind ``<thread>@{n}``, and gc keeping what the head log names.

Stock git is the oracle: ``git merge-base --is-ancestor`` on the store's git dir decides
whether a head moved backwards, ``git fsck --strict`` whether the store is valid.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from narrative.errors import NonFastForward
from narrative.gc import RetentionPolicy, collect_garbage
from narrative.hierarchy import finish_run, start_run
from narrative.refs import RefStore
from narrative.snapshot import take_snapshot
from narrative.store import THREAD_REF_PREFIX, Store
from tests.conftest import Cli, git, tree_bytes, two_machines


def _thread_heads(git_dir: str) -> dict[str, str]:
    out = git("--git-dir", git_dir, "for-each-ref", "--format=%(refname) %(objectname)")
    heads = dict(line.split() for line in out.splitlines())
    return {ref: oid for ref, oid in heads.items() if ref.startswith(THREAD_REF_PREFIX)}


def _is_ancestor(git_dir: str, old: str, new: str) -> bool:
    proc = subprocess.run(
        ["git", "--git-dir", git_dir, "merge-base", "--is-ancestor", old, new], check=False
    )
    assert proc.returncode in (0, 1), proc
    return proc.returncode == 0


class _Watch:
    """Records every store's thread heads after each step; a head that disappears, or whose
    new value does not descend from its old one (by stock git), fails the test."""

    def __init__(self, *workspaces: Path) -> None:
        self.workspaces = workspaces
        self.seen: dict[str, dict[str, str]] = {}
        self.moves = 0

    def check(self, step: str) -> None:
        for ws in self.workspaces:
            try:
                git_dir = Store.open(workspace=str(ws)).git_dir
            except Exception:
                continue
            now = _thread_heads(git_dir)
            for ref, old in self.seen.get(git_dir, {}).items():
                assert ref in now, f"{step}: {ref} was deleted in {ws.name}"
                assert _is_ancestor(git_dir, old, now[ref]), (
                    f"{step}: {ref} of {ws.name} moved from {old} to {now[ref]}, "
                    "which does not descend from it"
                )
                self.moves += old != now[ref]
            self.seen[git_dir] = now


@pytest.mark.long  # several seconds: make test stays under ten minutes
def test_no_command_moves_a_thread_head_backwards(tmp_path: Path) -> None:
    remote, alice, bob = two_machines(tmp_path)
    a_ws, b_ws = alice.cwd, bob.cwd
    watch = _Watch(a_ws, b_ws)

    def step(cli: Cli, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = cli.run(*args, check=ok)
        assert "Traceback" not in proc.stderr
        watch.check(" ".join(args))
        return proc

    step(alice, "init")
    (a_ws / "notes.txt").write_text("v1\n")
    v1 = alice.json("snapshot", "-m", "v1")
    watch.check("snapshot v1")
    old_bundle = tmp_path / "old.bundle"
    step(alice, "export", str(old_bundle))
    for n in (2, 3):
        (a_ws / "notes.txt").write_text(f"v{n}\n")
        step(alice, "snapshot", "-m", f"v{n}")
    step(alice, "remote", "add", "origin", str(remote))
    step(alice, "push", "origin")
    # restore an older snapshot, then snapshot: the thread keeps v3
    step(alice, "restore", v1["id"])
    (a_ws / "notes.txt").write_text("v1 edited\n")
    step(alice, "snapshot", "-m", "edit of v1")
    step(alice, "restore", "main")
    # import and pull of what is older than the thread
    step(alice, "import", str(old_bundle))
    step(bob, "init")
    step(bob, "remote", "add", "origin", str(remote))
    step(bob, "pull", "origin")
    step(bob, "restore", "origin/main")
    step(bob, "import", str(old_bundle))
    # both sides move on; pull merges, push fast-forwards
    (b_ws / "bob.txt").write_text("bob\n")
    step(bob, "snapshot", "-m", "bob")
    step(bob, "push", "origin")
    (a_ws / "alice.txt").write_text("alice\n")
    step(alice, "snapshot", "-m", "alice")
    step(alice, "pull", "origin")
    step(alice, "push", "origin")
    step(bob, "pull", "origin")
    # merging an older snapshot of the thread into the workspace
    step(alice, "merge", v1["id"], ok=False)
    # an explicit reset to an older snapshot, without --force, is refused in one line
    refused = step(alice, "thread", "reset", v1["thread"], v1["id"], ok=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    step(alice, "gc")
    assert watch.moves >= 6  # the steps above did move heads (forward)
    for ws in (a_ws, b_ws):
        git("--git-dir", Store.open(workspace=str(ws)).git_dir, "fsck", "--strict")


def _three_snapshots(store: Store, ws: Path) -> list[bytes]:
    commits = []
    for i in range(3):
        (ws / "n.txt").write_text(f"{i}\n")
        commits.append(bytes.fromhex(take_snapshot(store, message=f"s{i}").snapshot.commit))
    return commits


def _store_files(store: Store) -> dict[str, bytes]:
    return tree_bytes(Path(store.git_dir))


@pytest.mark.parametrize("own_odb", [True, False])
def test_refstore_refuses_a_non_descendant_update_and_a_delete(
    store: Store, workspace: Path, own_odb: bool
) -> None:
    c0, _c1, c2 = _three_snapshots(store, workspace)
    ref = store.thread_ref(store.config.default_thread)
    # the guard holds for any RefStore of the git dir, not only the Store's own
    refs = store.refs if own_odb else RefStore(store.git_dir)
    before = _store_files(store)
    with pytest.raises(NonFastForward, match="thread reset --force"):
        refs.update(ref, c0)
    with pytest.raises(NonFastForward):
        refs.update(ref, c0, expected=c2)
    with pytest.raises(NonFastForward, match="deletion"):
        refs.update(ref, None)
    assert _store_files(store) == before  # refused: nothing written, not even the log
    assert refs.read(ref) == c2
    # a ref outside the threads is not guarded
    refs.update("refs/narrative/test", c2)
    refs.update("refs/narrative/test", c0)
    # forward is fine, and force moves anywhere, logged
    refs.update(ref, c0, force=True, reason="test")
    assert refs.read(ref) == c0
    assert refs.head_log(ref)[-1].old == c2
    assert refs.head_log(ref)[-1].reason == "test"
    refs.update(ref, c2)  # c2 descends from c0
    refs.update(ref, None, force=True)
    assert refs.read(ref) is None
    git("--git-dir", store.git_dir, "fsck", "--strict")


def test_thread_reset_needs_force_to_move_backwards(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    ids = []
    for i in range(3):
        (workspace / "n.txt").write_text(f"{i}\n")
        ids.append(cli.json("snapshot", "-m", f"s{i}")["id"])
    store = Store.open(workspace=str(workspace))
    before = _store_files(store)
    refused = cli.run("thread", "reset", "main", ids[0], check=False)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _store_files(store) == before
    assert cli.json("show", "main")["id"] == ids[2]
    done = cli.json("thread", "reset", "main", ids[0], "--force")
    assert done["head"] == ids[0]
    assert cli.json("show", "main")["id"] == ids[0]
    # the old head is still named, and the reset can be undone without --force
    assert cli.json("show", "main@{1}")["id"] == ids[2]
    cli.run("thread", "reset", "main", "main@{1}")
    assert cli.json("show", "main")["id"] == ids[2]
    # stock git reads the head log
    thread = cli.json("show", "main")["thread"]
    log = git("--git-dir", store.git_dir, "reflog", "show", store.thread_ref(thread))
    assert "reset to" in log and "(forced)" in log
    # a snapshot of another thread is not a head for this one
    cli.run("thread", "create", "other", "--from", ids[1])
    (workspace / "other.txt").write_text("other\n")
    elsewhere = cli.json("snapshot", "--thread", "other")["id"]
    wrong = cli.run("thread", "reset", "main", elsewhere, "--force", check=False)
    assert wrong.returncode == 1 and "belongs to thread" in wrong.stderr
    assert cli.json("show", "main")["id"] == ids[2]
    git("--git-dir", store.git_dir, "fsck", "--strict")


def test_previous_heads_resolve_in_log_show_diff_and_restore(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    ids = []
    for i in range(3):
        (workspace / "n.txt").write_text(f"{i}\n")
        ids.append(cli.json("snapshot", "-m", f"s{i}")["id"])
    assert cli.json("show", "main@{0}")["id"] == ids[2]
    assert cli.json("show", "main@{1}")["id"] == ids[1]
    assert [s["id"] for s in cli.items("log", "main@{1}")] == [ids[1], ids[0]]
    thread = cli.json("show", "main")["thread"]
    assert cli.json("show", f"{thread}@{{2}}")["id"] == ids[0]
    diff = cli.run("diff", "main@{2}", "main@{0}", "--name-status").stdout
    assert "n.txt" in diff
    out = tmp_path / "out"
    cli.run("restore", "main@{2}", "--to", str(out))
    assert (out / "n.txt").read_text() == "0\n"
    cli.run("restore", "main@{1}")
    assert (workspace / "n.txt").read_text() == "1\n"
    missing = cli.run("show", "main@{3}", check=False)
    assert missing.returncode == 1 and "main@{3}" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_run_id_names_its_result(store: Store, workspace: Path, cli: Cli) -> None:
    _three_snapshots(store, workspace)
    main = store.config.default_thread
    base = take_snapshot(store, message="base", allow_empty=True).snapshot
    run = start_run(store, main, base_snapshot=base.id)
    result = take_snapshot(store, thread_id=main, run_id=run.id, allow_empty=True).snapshot
    finish_run(store, run.id, "succeeded", 0, result.id)
    assert cli.json("show", run.id)["id"] == result.id
    assert cli.items("log", run.id, "-n", "1")[0]["id"] == result.id
    failed = start_run(store, main, base_snapshot=base.id)
    finish_run(store, failed.id, "failed", 1, result.id)
    refused = cli.run("show", failed.id, check=False)
    assert refused.returncode == 1 and "did not succeed" in refused.stderr


def test_gc_keeps_the_heads_the_head_log_names(store: Store, workspace: Path, cli: Cli) -> None:
    c0, _c1, c2 = _three_snapshots(store, workspace)
    cli.run("restore", c0.hex())  # the workspace HEAD no longer names c2
    ref = store.thread_ref(store.config.default_thread)
    store.refs.update(ref, c0, force=True, reason="test reset")
    collect_garbage(store, RetentionPolicy(keep_last=1))
    # no ref reaches c2 any more, but the head log names it: still there and valid
    git("--git-dir", store.git_dir, "cat-file", "-e", c2.hex())
    git("--git-dir", store.git_dir, "fsck", "--strict")
    from narrative.history import resolve_snapshot

    assert resolve_snapshot(store, "main@{1}").commit == c2.hex()
    # once the log entries are older than the retention they expire, and so does c2
    collect_garbage(store, RetentionPolicy(keep_last=1, keep_within=-10.0))
    assert store.refs.head_log(ref) == []
    gone = subprocess.run(
        ["git", "--git-dir", store.git_dir, "cat-file", "-e", c2.hex()],
        check=False,
        capture_output=True,
    )
    assert gone.returncode != 0
    git("--git-dir", store.git_dir, "fsck", "--strict")


def test_an_empty_thread_whose_fork_point_was_dropped_still_takes_snapshots(
    tmp_path: Path,
) -> None:
    """A thread forked from a snapshot that a reset of its own thread then dropped: its first
    snapshot starts a history of its own (before, every snapshot of it failed with "unknown
    snapshot", found by the snapshot index's model under make soak). Stock git checks it."""
    from narrative.commits import snapshot_at
    from narrative.hierarchy import create_thread, list_objectives, reset_thread

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("one\n")
    store = Store.init(str(workspace), str(tmp_path / "store"))
    first = take_snapshot(store, None, message="first").snapshot
    (workspace / "a.txt").write_text("two\n")
    second = take_snapshot(store, None, message="second").snapshot
    objective = list_objectives(store)[0].id
    fork = create_thread(store, objective, "fork", forked_from=second.id)
    reset_thread(store, store.config.default_thread, first, force=True)  # drops the fork point
    (workspace / "b.txt").write_text("three\n")
    taken = take_snapshot(store, fork.id, message="on the fork").snapshot
    head = store.refs.read(store.thread_ref(fork.id))
    assert head is not None and snapshot_at(store, head).id == taken.id
    assert git("--git-dir", store.git_dir, "rev-list", "--count", head.hex()).strip() == "1"
    files = git("--git-dir", store.git_dir, "ls-tree", "--name-only", "-r", taken.tree)
    assert files.split() == ["a.txt", "b.txt"]
    git("--git-dir", store.git_dir, "fsck", "--strict")
