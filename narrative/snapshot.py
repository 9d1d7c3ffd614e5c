"""Taking a snapshot: walk, hash what changed, write trees and a commit, move the thread ref.

Order of writes (what makes ``kill -9`` at any moment safe): all new objects go into one pack
that is published (pack, then index, fsynced) before the thread ref moves by compare-and-swap;
the stat cache is replaced last. An interrupted snapshot leaves at most an unreferenced pack or
a temp file; the ref always names a complete snapshot.

Concurrent snapshots of the same thread never lose one another: when the CAS fails, the commit is
re-parented on the new head and retried (or, if the other writer captured the very same tree,
its snapshot is returned).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .blobs import write_blobs
from .commitmsg import encode_message, snapshot_from_commit
from .errors import ConcurrentUpdate, InvalidInput
from .history import read_commit, resolve_snapshot, snapshot_at
from .ids import new_id
from .models import Snapshot
from .objects import MODE_DIR, Commit, Signature, encode_commit, encode_tree, hash_object
from .odb import PackWriter
from .scan import DirNode, ScanResult, scan_workspace
from .statcache import RACY_KEY, RACY_WINDOW_NS, StatCache, StatKey, cache_path
from .store import Store

__all__ = ["SnapshotResult", "take_snapshot", "scan_tree"]

_MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class SnapshotResult:
    """The snapshot now at the thread's head, and whether this call created it."""

    snapshot: Snapshot
    created: bool
    keys: dict[str, StatKey] = field(default_factory=dict, repr=False)
    """Stat key of every file as it was read (restore uses it to detect later edits)."""


def _build_tree(
    node: DirNode, writer: PackWriter | None, trees: dict[str, tuple[bytes, int]]
) -> bytes | None:
    """Tree id of ``node`` (written to ``writer`` when new); None when it ended up empty."""
    if node.reusable and node.oid is not None:
        trees[node.rel] = (node.oid, len(node.entries))
        _keep_cached_subtrees(node, trees)
        return node.oid
    entries = []
    for name, mode, value in node.entries:
        oid = _build_tree(value, writer, trees) if mode == MODE_DIR else value
        if oid is not None:
            entries.append((name, mode, oid))
    if not entries:
        return None
    data = encode_tree(entries)
    oid = writer.add_raw("tree", data) if writer is not None else hash_object("tree", data)
    trees[node.rel] = (oid, len(node.entries))
    return oid


def _keep_cached_subtrees(node: DirNode, trees: dict[str, tuple[bytes, int]]) -> None:
    for child in node.children:
        if child.oid is not None:
            trees[child.rel] = (child.oid, len(child.entries))
            _keep_cached_subtrees(child, trees)


def scan_tree(
    store: Store,
    workspace: str | None = None,
    writer: PackWriter | None = None,
) -> tuple[ScanResult, bytes | None, StatCache, dict[str, tuple[bytes, int]]]:
    """Walk and hash a workspace; returns the scan, root tree id, old cache and new tree cache.

    Without a writer nothing is stored (used by ``diff`` against the live workspace).
    """
    ws = os.path.realpath(workspace or store.workspace)
    if not os.path.isdir(ws):
        raise InvalidInput(f"workspace {ws} does not exist")
    cache = StatCache.load(cache_path(store.git_dir, ws))
    result = scan_workspace(ws, cache, {store.git_dir}, store.config.max_file_size)
    store.odb.invalidate()
    failed = write_blobs(result.jobs, store.odb, writer)
    if failed:
        _drop_failed(result, failed)
    trees: dict[str, tuple[bytes, int]] = {}
    root = _build_tree(result.root, writer, trees)
    return result, root, cache, trees


def _drop_failed(result: ScanResult, failed: list) -> None:  # type: ignore[type-arg]
    gone = {id(job.entry) for job in failed}
    result.jobs = [j for j in result.jobs if id(j.entry) not in gone]

    def prune(node: DirNode) -> None:
        before = len(node.entries)
        node.entries = [e for e in node.entries if id(e) not in gone]
        if len(node.entries) != before:
            node.reusable = False
        for child in node.children:
            prune(child)

    prune(result.root)
    for job in failed:
        result.skipped.append({"path": job.rel, "reason": "vanished or unreadable"})


@dataclass
class _Capture:
    """A scanned and hashed workspace state, ready to be committed."""

    store: Store
    workspace: str
    result: ScanResult
    root: bytes
    trees: dict[str, tuple[bytes, int]]
    cache: StatCache
    start_ns: int

    def stats(self) -> dict[str, int]:
        return {
            "files": self.result.file_count,
            "bytes": self.result.byte_count,
            "hashed": len(self.result.jobs),
            "skipped": len(self.result.skipped),
        }

    def keys(self) -> dict[str, StatKey]:
        keys = {rel: entry[0] for rel, entry in self.result.files.items()}
        keys.update((job.rel, job.key) for job in self.result.jobs)
        return keys

    def head_info(self, head: bytes) -> tuple[bytes, str]:
        """(tree, snapshot id) of a thread head, from the cache when it is still current."""
        cached = self.cache.head
        if cached is not None and cached[0] == head:
            return cached[1], str(cached[2])
        snap = snapshot_at(self.store, head)
        return bytes.fromhex(snap.tree), snap.id

    def save_cache(self, head: tuple[bytes, bytes, str]) -> None:
        """Persist the stat cache (only when it changed); racy entries are kept unusable."""
        files = dict(self.result.files)
        racy_after = self.start_ns - RACY_WINDOW_NS
        for job in self.result.jobs:
            key = job.key if job.key and job.key[0] < racy_after else RACY_KEY
            files[job.rel] = (key, job.entry[2])
        new = StatCache(files, self.trees, head)
        old = self.cache
        if new.files != old.files or new.trees != old.trees or new.head != old.head:
            new.save(cache_path(self.store.git_dir, self.workspace))


def take_snapshot(
    store: Store,
    thread_id: str | None = None,
    run_id: str | None = None,
    message: str = "",
    allow_empty: bool = False,
    workspace: str | None = None,
) -> SnapshotResult:
    """Snapshot the workspace onto a thread (default: the store's default thread)."""
    thread_id = thread_id or store.config.default_thread
    ref = store.thread_ref(thread_id)
    head = store.refs.read(ref)
    fork_parent: bytes | None = None
    if head is None or run_id is not None:
        from .hierarchy import get_run, get_thread

        thread = get_thread(store, thread_id)
        if head is None and thread.forked_from:
            fork_parent = bytes.fromhex(resolve_snapshot(store, thread.forked_from).commit)
        if run_id is not None and get_run(store, run_id).thread_id != thread_id:
            raise InvalidInput(f"run {run_id} does not belong to thread {thread_id}")
    ws = os.path.realpath(workspace or store.workspace)
    start_ns = time.time_ns()
    with store.lock("gc", shared=True):
        writer = PackWriter(store.odb)
        try:
            result, root, cache, trees = scan_tree(store, ws, writer)
            if root is None:
                root = writer.add_raw("tree", b"")
            capture = _Capture(store, ws, result, root, trees, cache, start_ns)
            if head is not None and not allow_empty:
                head_tree, head_snap = capture.head_info(head)
                if head_tree == root:
                    writer.abort()
                    capture.save_cache((head, root, head_snap))
                    return SnapshotResult(snapshot_at(store, head), False, capture.keys())
            stats = capture.stats()
            message = encode_message(
                message, new_id("snapshot"), thread_id, run_id, stats, result.skipped
            )
            commit = _commit_object(root, head or fork_parent, message)
            oid = writer.add_raw("commit", encode_commit(commit))
            writer.publish()
        except BaseException:
            writer.abort()
            raise
        return _advance(capture, ref, head, fork_parent, commit, oid, allow_empty)


def _commit_object(root: bytes, parent: bytes | None, message: str) -> Commit:
    sig = Signature("narrative", "narrative@localhost", int(time.time()))
    return Commit(root, (parent,) if parent else (), sig, sig, message)


def _advance(
    capture: _Capture,
    ref: str,
    head: bytes | None,
    fork_parent: bytes | None,
    commit: Commit,
    oid: bytes,
    allow_empty: bool,
) -> SnapshotResult:
    """Move the thread ref to ``oid``; on a lost race, re-parent onto the new head and retry."""
    store = capture.store
    for _attempt in range(_MAX_ATTEMPTS):
        try:
            store.refs.update(ref, oid, expected=head)
            break
        except ConcurrentUpdate:
            head = store.refs.read(ref)
            if head is not None and not allow_empty and capture.head_info(head)[0] == capture.root:
                # Another writer captured this very state: that snapshot is ours too.
                return SnapshotResult(snapshot_at(store, head), False, capture.keys())
            commit = _commit_object(capture.root, head or fork_parent, commit.message)
            oid = store.odb.write_loose("commit", encode_commit(commit))
    else:
        raise ConcurrentUpdate(f"could not advance {ref}: too many concurrent writers")
    capture.save_cache((oid, capture.root, snapshot_from_commit(oid, commit, None).id))
    parent = commit.parents[0] if commit.parents else None
    parent_id = None
    if parent is not None:
        parent_id = snapshot_from_commit(parent, read_commit(store, parent), None).id
    return SnapshotResult(snapshot_from_commit(oid, commit, parent_id), True, capture.keys())
