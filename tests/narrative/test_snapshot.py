"""Snapshots against stock git as the oracle: tree ids, fsck, exclusions, nested repos."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from narrative.commits import thread_snapshots
from narrative.errors import InvalidInput, ThreadNotFound
from narrative.hierarchy import create_thread, start_run
from narrative.history import resolve_snapshot
from narrative.snapshot import scan_tree, take_snapshot
from narrative.store import Store
from tests.conftest import git, git_tree_of


def _rich_workspace(ws: Path) -> None:
    (ws / "a" / "b" / "c").mkdir(parents=True)
    (ws / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (ws / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (ws / "run.sh").chmod(0o755)
    (ws / "link-to-readme").symlink_to("README.md")
    (ws / "dangling").symlink_to("does/not/exist")
    (ws / "dirlink").symlink_to("a")
    (ws / "ünïcödé name.txt").write_text("unicode\n")
    (ws / "binary.bin").write_bytes(bytes(range(256)) * 100)
    (ws / "empty").write_bytes(b"")
    (ws / "emptydir").mkdir()
    (ws / "a" / "file-and-dir-order").mkdir()
    (ws / "a" / "file-and-dir-order" / "x").write_text("x")
    (ws / "a" / "file-and-dir-order.txt").write_text("y")
    (ws / "a" / "file-and-dir-order-z").write_text("z")


def test_tree_matches_git_and_fsck_passes(store: Store, workspace: Path, tmp_path: Path) -> None:
    _rich_workspace(workspace)
    result = take_snapshot(store, message="first")
    assert result.created
    assert result.snapshot.tree == git_tree_of(workspace, tmp_path)
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
    body = git("--git-dir", store.git_dir, "cat-file", "-p", result.snapshot.commit)
    assert f"Narrative-Snapshot: {result.snapshot.id}" in body
    assert f"Narrative-Thread: {store.config.default_thread}" in body
    # stock git reads the symlink and the exec bit the way we stored them
    listing = git("--git-dir", store.git_dir, "ls-tree", "-r", result.snapshot.tree)
    assert "120000 blob" in listing and "100755 blob" in listing


def test_ignore_rules_match_git(store: Store, workspace: Path, tmp_path: Path) -> None:
    (workspace / ".gitignore").write_text("*.log\nbuild/\n!keep.log\n/rootonly.txt\n")
    (workspace / "x.log").write_text("ignored")
    (workspace / "keep.log").write_text("kept")
    (workspace / "rootonly.txt").write_text("ignored")
    (workspace / "src" / "rootonly.txt").write_text("kept: pattern is anchored")
    (workspace / "build").mkdir()
    (workspace / "build" / "out.o").write_text("ignored")
    (workspace / "src" / ".gitignore").write_text("*.tmp\n")
    (workspace / "src" / "a.tmp").write_text("ignored")
    (workspace / "a.tmp").write_text("kept: rule only below src")
    (workspace / ".narrativeignore").write_text("secret.txt\n")
    (workspace / "secret.txt").write_text("never snapshotted")
    snap = take_snapshot(store).snapshot
    # git does not know .narrativeignore: give the oracle the same rule as an exclude
    expected = git_tree_of(workspace, tmp_path, exclude=("/.narrative", "secret.txt"))
    assert snap.tree == expected
    names = git("--git-dir", store.git_dir, "ls-tree", "-r", "--name-only", snap.tree).split()
    assert "secret.txt" not in names and "keep.log" in names and "x.log" not in names


def test_store_and_git_dirs_are_never_snapshotted(store: Store, workspace: Path) -> None:
    git("init", "-q", cwd=workspace)
    snap = take_snapshot(store).snapshot
    names = git("--git-dir", store.git_dir, "ls-tree", "-r", "--name-only", snap.tree).split()
    assert not any(n.startswith((".narrative", ".git/")) for n in names)
    assert names == ["README.md", "src/app.py"]


def test_nested_repository_files_are_plain_files(store: Store, workspace: Path) -> None:
    nested = workspace / "vendor" / "lib"
    nested.mkdir(parents=True)
    git("init", "-q", cwd=nested)
    (nested / "lib.py").write_text("x = 1\n")
    (nested / "local.cfg").write_text("excluded by the nested repo's info/exclude\n")
    (nested / ".git" / "info").mkdir(exist_ok=True)
    (nested / ".git" / "info" / "exclude").write_text("local.cfg\n")
    git("add", "lib.py", cwd=nested)
    git("commit", "-qm", "nested", cwd=nested)
    snap = take_snapshot(store).snapshot
    listing = git("--git-dir", store.git_dir, "ls-tree", "-r", snap.tree)
    assert "160000" not in listing  # never a gitlink
    paths = [line.split("\t")[1] for line in listing.splitlines()]
    assert "vendor/lib/lib.py" in paths
    assert "vendor/lib/local.cfg" not in paths
    assert not any("/.git/" in p for p in paths)
    assert (nested / ".git").is_dir()  # the nested repo was not renamed or touched


def test_large_files_are_skipped_and_reported(store: Store, workspace: Path) -> None:
    store.config.max_file_size = 1000
    store.save_config()
    (workspace / "big.bin").write_bytes(b"x" * 1001)
    snap = take_snapshot(store).snapshot
    assert snap.skipped == [{"path": "big.bin", "size": 1001, "reason": "too-large"}]
    names = git("--git-dir", store.git_dir, "ls-tree", "-r", "--name-only", snap.tree).split()
    assert "big.bin" not in names
    # the list survives a round trip through the commit
    assert resolve_snapshot(store, snap.id).skipped == snap.skipped
    # and is still reported when the directory is reused from the stat cache
    (workspace / "src" / "new.py").write_text("1\n")
    assert take_snapshot(store).snapshot.skipped == snap.skipped


def test_incremental_snapshots(store: Store, workspace: Path, tmp_path: Path) -> None:
    first = take_snapshot(store, message="one")
    again = take_snapshot(store)
    assert not again.created and again.snapshot.id == first.snapshot.id
    forced = take_snapshot(store, allow_empty=True)
    assert forced.created and forced.snapshot.parent == first.snapshot.id
    assert forced.snapshot.tree == first.snapshot.tree
    (workspace / "src" / "app.py").write_text("print('changed')\n")
    changed = take_snapshot(store)
    assert changed.created
    assert changed.snapshot.stats["hashed"] >= 1
    assert changed.snapshot.tree == git_tree_of(workspace, tmp_path)
    os.unlink(workspace / "README.md")
    removed = take_snapshot(store).snapshot
    assert removed.tree == git_tree_of(workspace, tmp_path)
    chain = [s.id for s in thread_snapshots(store, store.config.default_thread)]
    assert chain == [removed.id, changed.snapshot.id, forced.snapshot.id, first.snapshot.id]


def test_stat_cache_only_rehashes_changed_files(store: Store, workspace: Path) -> None:
    for i in range(50):
        (workspace / "src" / f"f{i}.txt").write_text(f"{i}\n")
    take_snapshot(store)
    # age every file beyond the racy window so the cache trusts them
    old = 1_000_000_000
    for root, _dirs, files in os.walk(workspace):
        for name in files:
            os.utime(os.path.join(root, name), (old, old))
    take_snapshot(store, allow_empty=True)
    (workspace / "src" / "f7.txt").write_text("changed\n")
    snap = take_snapshot(store).snapshot
    assert snap.stats["hashed"] == 1
    assert snap.stats["files"] == 52


def test_stat_cache_is_optional(store: Store, workspace: Path, tmp_path: Path) -> None:
    take_snapshot(store)
    cache_dir = Path(store.git_dir) / "narrative" / "cache"
    for f in cache_dir.iterdir():
        f.write_bytes(b"garbage")
    (workspace / "new.txt").write_text("n\n")
    assert take_snapshot(store).snapshot.tree == git_tree_of(workspace, tmp_path)


def test_racy_edit_within_the_same_tick_is_seen(store: Store, workspace: Path) -> None:
    target = workspace / "src" / "app.py"
    take_snapshot(store)
    st = target.stat()
    target.write_text("print('HELLO')\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, as within one tick
    snap = take_snapshot(store)
    assert snap.created, "an edit keeping size and mtime must still be captured"


def test_threads_runs_and_forks(store: Store, workspace: Path) -> None:
    base = take_snapshot(store).snapshot
    main = store.config.default_thread
    fork = create_thread(store, store.config.default_objective, "experiment", base.id)
    (workspace / "exp.txt").write_text("experiment\n")
    run = start_run(store, fork.id, agent="claude", base_snapshot=base.id)
    snap = take_snapshot(store, fork.id, run.id, "in the fork").snapshot
    assert snap.thread == fork.id and snap.run == run.id and snap.parent == base.id
    git("--git-dir", store.git_dir, "merge-base", "--is-ancestor", base.commit, snap.commit)
    assert [s.id for s in thread_snapshots(store, fork.id)] == [snap.id]
    with pytest.raises(InvalidInput):
        take_snapshot(store, main, run.id)
    with pytest.raises(ThreadNotFound):
        take_snapshot(store, "th-0000000000zzzzzzzzzz")


def test_snapshot_ids_resolve_by_prefix_and_commit(store: Store, workspace: Path) -> None:
    snap = take_snapshot(store).snapshot
    assert resolve_snapshot(store, snap.id[:12]).id == snap.id
    assert resolve_snapshot(store, snap.commit[:10]).id == snap.id
    assert resolve_snapshot(store, store.config.default_thread).id == snap.id


def test_parallel_walk_of_a_large_tree_matches_git(
    store: Store, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from narrative import scan

    forks = []
    real = scan._walk_in_workers

    def counting(*args: Any) -> Any:
        forks.append(1)
        return real(*args)

    monkeypatch.setattr(scan, "_walk_in_workers", counting)
    _large_tree_changed_since_a_snapshot(store, workspace, tmp_path)
    second = take_snapshot(store).snapshot
    assert forks, "the large tree must take the forked-worker path"
    assert second.tree == git_tree_of(workspace, tmp_path)
    third = take_snapshot(store)
    assert not third.created and third.snapshot.id == second.id


@pytest.mark.parametrize("failing", ["fork", "pipe"])
def test_a_walk_that_cannot_fork_is_done_by_this_process(
    store: Store, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """No worker (fork fails) or no queue to share the work through (pipe fails): this
    process walks every subtree itself, and nothing is missed."""

    def refuse(*_args: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")

    _large_tree_changed_since_a_snapshot(store, workspace, tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(os, failing, refuse)
        second = take_snapshot(store).snapshot
    assert second.tree == git_tree_of(workspace, tmp_path)


def _large_tree_changed_since_a_snapshot(store: Store, workspace: Path, tmp_path: Path) -> None:
    """A tree large enough for the forked walk, snapshot (as git has it), then changed at
    several depths."""
    from narrative import scan

    for i in range(scan._PARALLEL_MIN_DIRS + 20):
        d = workspace / f"top{i % 7}" / f"mid{i % 13}" / f"leaf{i}"
        d.mkdir(parents=True)
        (d / "f.txt").write_text(f"{i}\n")
    (workspace / "top3" / ".gitignore").write_text("*.tmp\n")
    (workspace / "top3" / "mid0" / "x.tmp").write_text("ignored below top3\n")
    first = take_snapshot(store).snapshot  # serial: no cache yet
    assert first.tree == git_tree_of(workspace, tmp_path)
    # now the cache is large enough for forked workers; change things at several depths
    (workspace / "top1" / "mid1" / "leaf1" / "f.txt").write_text("changed\n")
    (workspace / "top2" / "new.txt").write_text("new\n")
    os.unlink(workspace / "README.md")
    (workspace / "top4" / "mid4" / "leaf4" / "f.txt").unlink()
    (workspace / "top4" / "mid4" / "leaf4").rmdir()


def test_unchanged_subtrees_are_taken_whole_from_the_cache(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """A no-op scan builds one node (the root's record stands for everything); after a deep
    change, nodes only along its path, each other subtree carried over as cached records."""
    for i in range(40):
        d = workspace / f"top{i % 4}" / f"mid{i % 8}" / f"leaf{i}"
        d.mkdir(parents=True)
        (d / "f.txt").write_text(f"{i}\n")
    past = time.time() - 60  # nothing racy: every directory's record is kept with a signature
    for base, names, files in os.walk(workspace):
        for name in names + files:
            os.utime(os.path.join(base, name), (past, past), follow_symlinks=False)
    first = take_snapshot(store).snapshot
    every_dir = {
        os.path.relpath(base, workspace).removeprefix(".")
        for base, _dirs, _files in os.walk(workspace)
        if ".narrative" not in base
    }

    noop, root, _cache = scan_tree(store, use_watcher=False)
    assert root is not None and root.hex() == first.tree
    assert [node.rel for node in noop.dirs] == [""] and noop.root.record is not None
    assert set(noop.carried) == every_dir - {""} and not noop.jobs

    (workspace / "top1" / "mid1" / "leaf1" / "f.txt").write_text("changed\n")
    changed, root, _cache = scan_tree(store, use_watcher=False)
    path = ["", "top1", "top1/mid1", "top1/mid1/leaf1"]
    built = {node.rel for node in changed.dirs if node.record is None}
    assert built == set(path)
    reused = {node.rel for node in changed.dirs if node.record is not None}
    assert reused == {
        os.path.join(parent, name).removeprefix("/")
        for parent in path[:-1]
        for name in os.listdir(workspace / parent)
        if (workspace / parent / name).is_dir() and name != ".narrative"
    } - set(path)
    assert set(changed.carried) | built | reused == every_dir
    assert [job.rel for job in changed.jobs] == ["top1/mid1/leaf1/f.txt"]
    assert root is not None and root.hex() == git_tree_of(workspace, tmp_path)


def test_a_symlink_hashed_first_is_stored(tmp_path: Path) -> None:
    """Regression: the link's blob was only hashed, never written, while the pack was empty."""
    ws = tmp_path / "only-links"
    (ws / "sub").mkdir(parents=True)
    os.symlink("../../..", ws / "sub" / "up")
    store = Store.init(str(ws))
    snap = take_snapshot(store).snapshot
    git("--git-dir", store.git_dir, "fsck", "--full", "--no-dangling")
    tree = git("--git-dir", store.git_dir, "ls-tree", "-r", snap.tree).split()
    assert git("--git-dir", store.git_dir, "cat-file", "-p", tree[2]) == "../../.."


def test_a_workspace_that_cannot_be_listed_is_not_snapshotted_as_empty(
    store: Store, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot whose scan cannot list the workspace's top directory would record every
    file as deleted and move the thread's head there: it is refused, and nothing moves. (The
    refusal comes from the OS, which root's tests cannot provoke: open(2) fails for it here.)"""
    from narrative.errors import WorkspaceUnreadable

    first = take_snapshot(store, message="first").snapshot
    (workspace / "new.txt").write_text("unsaved work\n")
    real_open, top = os.open, os.path.realpath(workspace)

    def refusing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == top:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(WorkspaceUnreadable, match="nothing was snapshotted"):
        take_snapshot(store, message="unreadable")
    monkeypatch.undo()
    assert store.thread_heads()[first.thread] == bytes.fromhex(first.commit)


class _Entry:
    """A listing's entry whose ``lstat`` fails with ``error`` (what the OS answers for a file
    in a directory that may be listed but not searched: root's tests cannot provoke it)."""

    def __init__(self, entry: os.DirEntry[str], error: OSError) -> None:
        self._entry, self._error = entry, error
        self.name, self.path = entry.name, entry.path

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        raise self._error


@pytest.mark.parametrize(
    ("error", "reported"),
    [(PermissionError(13, "Permission denied"), True), (FileNotFoundError(2, "gone"), False)],
    ids=["cannot-stat", "vanished"],
)
def test_a_file_that_cannot_be_looked_at_is_reported_not_dropped_silently(
    store: Store,
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: OSError,
    reported: bool,
) -> None:
    """A file the walk lists but cannot ``lstat`` is left out of the snapshot, which then reads
    as if it had been deleted: unless it vanished since the listing, the snapshot says so in
    its skipped paths, as for an unreadable directory (before, it was dropped without a word)."""
    take_snapshot(store, message="first")
    (workspace / "src" / "app.py").write_text("print('changed')\n")
    real_scandir = os.scandir

    class Listing:
        def __init__(self, target: Any) -> None:
            self._it = real_scandir(target)

        def __enter__(self) -> list[Any]:
            entries = list(self._it.__enter__())
            return [_Entry(e, error) if e.name == "README.md" else e for e in entries]

        def __exit__(self, *exc: object) -> None:
            self._it.__exit__(*exc)

    # the os.scandir walk (the C lister's failures, provoked for real: test_native_listing.py)
    from narrative import scan

    monkeypatch.setattr(scan, "NATIVE_LISTER", None)
    monkeypatch.setattr(os, "scandir", Listing)
    result = take_snapshot(store, message="second")
    monkeypatch.undo()
    skipped = [s for s in result.snapshot.skipped if s["path"] == "README.md"]
    assert skipped == (
        [{"path": "README.md", "reason": "unreadable: Permission denied"}] if reported else []
    )
    files = git("--git-dir", store.git_dir, "ls-tree", "-r", "--name-only", result.snapshot.tree)
    assert files.split() == ["src/app.py"]
