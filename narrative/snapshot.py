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


def _build_tree(node: DirNode, writer: PackWriter | None, trees: dict[str, tuple[bytes, int]]) -> bytes | None:
    """Tree id of ``node`` (written to ``writer`` when new); None when it ended up empty."""
    if node.reusable and node.oid is not None:
        trees[node.rel] = (node.oid, len(node.entries))
        _keep_cached_subtrees(node, trees)
        return node.oid
    entries = []
    for name, mode, value in node.entries:
        if mode == MODE_DIR:
            value = _build_tree(value, writer, trees)
        if value is not None:
            entries.append((name, mode, value))
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


def scan_tree(store: Store, workspace: str | None = None, writer: PackWriter | None = None,
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


def _new_cache(result: ScanResult, trees: dict[str, tuple[bytes, int]], start_ns: int,
               head: tuple[bytes, bytes, str]) -> StatCache:
    files = dict(result.files)
    racy_after = start_ns - RACY_WINDOW_NS
    for job in result.jobs:
        key = job.key if job.key and job.key[0] < racy_after else RACY_KEY
        files[job.rel] = (key, job.entry[2])
    return StatCache(files, trees, head)


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
            return _commit(store, ref, thread_id, run_id, message, allow_empty, head,
                           fork_parent, root, result, trees, cache, writer, start_ns, ws)
        except BaseException:
            writer.abort()
            raise


def _head_info(store: Store, head: bytes, cache: StatCache) -> tuple[bytes, str]:
    """(tree, snapshot id) of the thread head, from the cache when it is still current."""
    if cache.head is not None and cache.head[0] == head:
        return cache.head[1], str(cache.head[2])
    snap = snapshot_at(store, head)
    return bytes.fromhex(snap.tree), snap.id


def _commit(store: Store, ref: str, thread_id: str, run_id: str | None, message: str,
            allow_empty: bool, head: bytes | None, fork_parent: bytes | None, root: bytes,
            result: ScanResult, trees: dict[str, tuple[bytes, int]], cache: StatCache,
            writer: PackWriter, start_ns: int, ws: str) -> SnapshotResult:
    stats = {
        "files": result.file_count,
        "bytes": result.byte_count,
        "hashed": len(result.jobs),
        "skipped": len(result.skipped),
    }
    snap_id = new_id("snapshot")
    parent = head or fork_parent
    attempt = 0
    while True:
        attempt += 1
        if head is not None and not allow_empty:
            head_tree, head_snap = _head_info(store, head, cache)
            if head_tree == root:
                writer.abort()
                _save_cache(store, ws, cache, result, trees, start_ns, (head, root, head_snap))
                return SnapshotResult(snapshot_at(store, head), False, _keys(result))
        now = int(time.time())
        sig = Signature("narrative", "narrative@localhost", now)
        commit = Commit(
            root, (parent,) if parent else (), sig, sig,
            encode_message(message, snap_id, thread_id, run_id, stats, result.skipped),
        )
        data = encode_commit(commit)
        if attempt == 1:
            oid = writer.add_raw("commit", data)
            writer.publish()
        else:
            oid = store.odb.write_loose("commit", data)
        try:
            store.refs.update(ref, oid, expected=head)
            break
        except ConcurrentUpdate:
            if attempt >= _MAX_ATTEMPTS:
                raise
            head = store.refs.read(ref)
            parent = head or fork_parent
    _save_cache(store, ws, cache, result, trees, start_ns, (oid, root, snap_id))
    parent_id = None
    if parent is not None:
        parent_id = snapshot_from_commit(parent, read_commit(store, parent), None).id
    return SnapshotResult(snapshot_from_commit(oid, commit, parent_id), True, _keys(result))


def _keys(result: ScanResult) -> dict[str, StatKey]:
    keys = {rel: entry[0] for rel, entry in result.files.items()}
    keys.update((job.rel, job.key) for job in result.jobs)
    return keys


def _save_cache(store: Store, ws: str, old: StatCache, result: ScanResult,
                trees: dict[str, tuple[bytes, int]], start_ns: int,
                head: tuple[bytes, bytes, str]) -> None:
    new = _new_cache(result, trees, start_ns, head)
    if new.files != old.files or new.trees != old.trees or new.head != old.head:
        new.save(cache_path(store.git_dir, ws))
