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
from collections.abc import Callable

from .blobs import write_blobs
from .commitmsg import encode_message, snapshot_from_commit
from .commits import read_commit, snapshot_at, snapshot_by_id
from .errors import ConcurrentUpdate, InvalidInput, SnapshotNotFound
from .head import HEAD_LOCK, fork_thread, read_head, set_head
from .ids import new_id
from .models import Snapshot
from .objects import MODE_DIR, Commit, Signature, encode_commit, encode_tree, hash_object
from .odb import PackWriter
from .plain import Frozen
from .repack import MAX_PACKS, consolidate_small_packs
from .scan import DirNode, FileJob, ScanResult, scan_workspace
from .statcache import (
    RACY_WINDOW_NS,
    DirRecord,
    FileDetail,
    StatCache,
    cache_path,
    encode_details,
)
from .store import Store
from .watch import known_changes, sync_journal

__all__ = ["Fill", "SnapshotResult", "take_snapshot", "scan_tree"]

_MAX_ATTEMPTS = 100

Fill = Callable[[PackWriter], ScanResult | None]
"""Builds a snapshot's content without walking a directory: given the snapshot's pack
writer (called under the store's shared ``gc`` lock), it writes the blobs and returns the
tree as a scan would (``jobs`` only counted, already stored); or None: walk the workspace."""


class SnapshotResult(Frozen):
    """The snapshot now at the thread's head, and whether this call created it."""

    __slots__ = ("cache", "created", "new_thread", "snapshot")
    FIELDS = ("snapshot", "created", "cache", "new_thread")
    snapshot: Snapshot
    created: bool
    cache: StatCache
    """The workspace's stat records as of this snapshot (restore checks edits against it)."""
    new_thread: bool
    """The snapshot started a new thread (the workspace was not at its thread's head)."""

    def __init__(
        self,
        snapshot: Snapshot,
        created: bool,
        cache: StatCache | None = None,
        new_thread: bool = False,
    ) -> None:
        self.set_fields(snapshot, created, StatCache() if cache is None else cache, new_thread)


def _build_tree(node: DirNode, writer: PackWriter | None) -> bytes | None:
    """Tree id of ``node`` (written to ``writer`` when new); None when it ended up empty."""
    if node.record is not None:
        return node.oid
    entries = []
    for name, mode, value in node.entries:
        oid = _build_tree(value, writer) if mode == MODE_DIR else value
        if oid is not None:
            entries.append((name, mode, oid))
    if not entries:
        return None
    data = encode_tree(entries)
    node.oid = writer.add_raw("tree", data) if writer is not None else hash_object("tree", data)
    return node.oid


def scan_tree(
    store: Store,
    workspace: str | None = None,
    writer: PackWriter | None = None,
    sweep_tmp: bool = False,
    *,
    use_watcher: bool = True,
    unchanged_ok: bool = False,
) -> tuple[ScanResult, bytes | None, StatCache]:
    """Walk and hash a workspace; returns the scan, its root tree id and the old stat cache.

    Without a writer nothing is stored (used by ``diff`` against the live workspace). With a
    live watcher (:mod:`narrative.watch`) only what its journal names is listed, unless
    ``use_watcher`` is False. ``unchanged_ok``: when the journal shows no change at all since
    the stat cache was taken, return at once with ``ScanResult.unchanged`` and the cache's
    tree (the cache's records are not even decoded).
    """
    ws = os.path.realpath(workspace or store.workspace)
    if not os.path.isdir(ws):
        raise InvalidInput(f"workspace {ws} does not exist")
    cache = StatCache.load(cache_path(store.git_dir, ws), store.config.max_file_size)
    # with a live watcher: synchronise with it first, so the scan is complete as of its journal
    sync = sync_journal(store.git_dir, ws) if use_watcher else None
    known = known_changes(sync, cache.journal) if sync is not None else None
    if (
        unchanged_ok
        and sync is not None
        and known is not None
        and not (known.dirs or known.trees)
        and cache.head is not None
        and not cache.unvouched  # (listed again whatever the journal says, as in a scan)
    ):
        store.odb.invalidate()
        unchanged = ScanResult(DirNode(""), [], [], [], journal=sync.mark, unchanged=True)
        return unchanged, cache.head[1], cache
    exclude = {store.git_dir}
    result = scan_workspace(ws, cache, exclude, store.config.max_file_size, sweep_tmp, known)
    result.journal = sync.mark if sync is not None else None
    store.odb.invalidate()
    failed = write_blobs(result.jobs, store.odb, writer)
    if failed:
        _drop_failed(result, failed)
    return result, _build_tree(result.root, writer), cache


def _drop_failed(result: ScanResult, failed: list[FileJob]) -> None:
    """Leave out files that vanished or became unreadable after the walk."""
    gone = {id(job.entry) for job in failed}
    result.jobs = [j for j in result.jobs if id(j.entry) not in gone]
    for node in result.dirs:
        if node.record is None:
            node.entries = [e for e in node.entries if id(e) not in gone]
            node.files = [f for f in node.files if id(f[2]) not in gone]
            node.sig = None
    result.skipped += [{"path": job.rel, "reason": "vanished or unreadable"} for job in failed]


def _new_cache(result: ScanResult, old: StatCache, start_ns: int) -> StatCache:
    """Records for every directory: reused ones as they were, changed ones rebuilt."""
    racy_after = start_ns - RACY_WINDOW_NS
    changed = {id(job.entry) for job in result.jobs if job.changed}
    dirs: dict[str, DirRecord] = dict(result.carried)
    for node in result.dirs:
        if node.record is not None:
            dirs[node.rel] = node.record
            continue
        details: dict[str, FileDetail] = {}
        sig = node.sig
        for name, key, item in node.files:
            racy = key[0] >= racy_after or id(item) in changed
            if racy:
                sig = None
            details[name] = (key, item[2], racy)
        dirs[node.rel] = (
            sig,
            node.oid or b"",
            node.file_count,
            node.byte_count,
            node.skipped,
            encode_details(details),
        )
    return StatCache(dirs, old.head, old.max_file_size, result.journal, old.base)


class _Capture:
    """A scanned and hashed workspace state, ready to be committed."""

    old_cache: StatCache | None
    """None: no directory was walked (a :data:`Fill`), so there is no stat cache to keep."""

    def __init__(
        self,
        store: Store,
        workspace: str,
        result: ScanResult,
        root: bytes,
        old_cache: StatCache | None,
        start_ns: int,
    ) -> None:
        self.store = store
        self.workspace = workspace
        self.result = result
        self.root = root
        self.old_cache = old_cache
        self.start_ns = start_ns
        if old_cache is None:
            self.cache = StatCache()
        elif result.unchanged:
            self.cache = old_cache
        else:
            self.cache = _new_cache(result, old_cache, start_ns)

    def stats(self) -> dict[str, int]:
        carried = self.result.carried.values()
        return {
            "files": sum(n.file_count for n in self.result.dirs) + sum(r[2] for r in carried),
            "bytes": sum(n.byte_count for n in self.result.dirs) + sum(r[3] for r in carried),
            "hashed": len(self.result.jobs),
            "skipped": len(self.result.skipped),
        }

    def head_info(self, head: bytes) -> tuple[bytes, str]:
        """(tree, snapshot id) of a thread head, from the cache when it is still current."""
        cached = self.old_cache.head if self.old_cache is not None else None
        if cached is not None and cached[0] == head:
            return cached[1], str(cached[2])
        snap = snapshot_at(self.store, head)
        return bytes.fromhex(snap.tree), snap.id

    def save_cache(self, head: tuple[bytes, bytes, str]) -> None:
        """Persist the stat cache, only when something in it changed.

        An unchanged cache keeps its older journal mark: replaying the journal from there is
        still complete, and saves rewriting the whole cache on every no-op snapshot.
        """
        old = self.old_cache
        if self.result.unchanged and old is not None:
            if head != old.head:  # the same tree, under another commit
                old.head = head
                old.save(cache_path(self.store.git_dir, self.workspace))
            return
        self.cache.head = head
        if old is None:
            return
        new_generation = (self.cache.journal or ("",))[0] != (old.journal or ("",))[0]
        if self.cache.dirs != old.dirs or self.cache.head != old.head or new_generation:
            self.cache.save(cache_path(self.store.git_dir, self.workspace))


def take_snapshot(
    store: Store,
    thread_id: str | None = None,
    run_id: str | None = None,
    message: str = "",
    allow_empty: bool = False,
    workspace: str | None = None,
    trailers: dict[str, str] | None = None,
    *,
    unchanged_if: bytes | None = None,
    track_head: bool = True,
    sweep_tmp: bool = False,
    merge_parents: tuple[bytes, ...] = (),
    stage_as: str | None = None,
    fill: Fill | None = None,
) -> SnapshotResult:
    """Snapshot the workspace onto a thread.

    With no ``thread_id``, the snapshot continues the workspace's thread when the workspace
    HEAD (:mod:`narrative.head`) is that thread's head, and otherwise starts a new thread
    ``<name>-<n>`` forked from the HEAD (``SnapshotResult.new_thread``): a thread is never
    given a state that silently drops a later snapshot's work. Snapshots of the store's own
    workspace move the HEAD (unless ``track_head`` is False); ``workspace`` names another
    directory (an environment's checkout), which has no HEAD here.

    ``trailers`` adds ``Narrative-<key>: value`` lines to the commit (merges record their
    source). ``unchanged_if`` names a commit whose tree counts as "nothing changed" instead of
    the thread's head (a restore's safety snapshot compares with the workspace HEAD).
    ``merge_parents`` are further parents after the thread's head (a merge of another
    thread's work records it, so that thread's head is an ancestor and a push fast-forwards).
    ``sweep_tmp``: the caller holds the workspace lock; temporary files left in the workspace
    are removed whatever their age. ``stage_as`` names a ref (not a thread's) that receives the
    snapshot instead of the thread, which stays where it is: a run's result waits there to be
    screened (:func:`narrative.runs.withhold_secrets`). ``fill`` builds the content instead of
    a walk of ``workspace`` (see :data:`Fill`); it needs ``workspace`` (another directory).
    """
    tracks = (
        track_head
        and stage_as is None
        and (workspace is None or os.path.realpath(workspace) == os.path.realpath(store.workspace))
    )
    if not tracks:
        return _take(
            store, thread_id, run_id, message, allow_empty, workspace, trailers,
            unchanged_if, False, sweep_tmp, merge_parents, stage_as, fill,
        )  # fmt: skip
    if fill is not None:
        raise InvalidInput("a filled snapshot needs a workspace other than the store's")
    # The workspace HEAD and the thread head move together: snapshots of one workspace take
    # turns, or one could see the thread moved before the HEAD did and fork a thread for nothing.
    with store.lock(HEAD_LOCK, timeout=120.0):
        return _take(
            store, thread_id, run_id, message, allow_empty, workspace, trailers,
            unchanged_if, True, sweep_tmp, merge_parents, None, None,
        )  # fmt: skip


def _fork_point(store: Store, snapshot_id: str) -> bytes | None:
    """The commit an empty thread continues from: its fork point's, or None (the thread's
    first snapshot starts a history of its own) once that snapshot is dropped (the thread it
    was on reset past it, or dropped). The workspace is snapshotted whole either way; failing
    instead left a workspace no snapshot could be taken of until the thread was switched."""
    try:
        return bytes.fromhex(snapshot_by_id(store, snapshot_id).commit)
    except SnapshotNotFound:
        return None


def _take(
    store: Store,
    thread_id: str | None,
    run_id: str | None,
    message: str,
    allow_empty: bool,
    workspace: str | None,
    trailers: dict[str, str] | None,
    unchanged_if: bytes | None,
    tracks: bool,
    sweep_tmp: bool,
    merge_parents: tuple[bytes, ...],
    stage_as: str | None,
    fill: Fill | None,
) -> SnapshotResult:
    fork_from: Snapshot | None = None
    if thread_id is None and tracks:
        workspace_head = read_head(store)
        current_head = store.refs.read(store.thread_ref(store.config.default_thread))
        # (an empty thread the user switched to is continued: there is nothing to drop)
        if (
            workspace_head is not None
            and current_head is not None
            and workspace_head != current_head
        ):
            fork_from = snapshot_at(store, workspace_head)
    thread_id = thread_id or store.config.default_thread
    ref = store.thread_ref(thread_id)
    head = None if fork_from is not None else store.refs.read(ref)
    fork_parent: bytes | None = bytes.fromhex(fork_from.commit) if fork_from else None
    if (head is None and fork_from is None) or run_id is not None:
        from .hierarchy import get_run, get_thread

        thread = get_thread(store, thread_id)
        if head is None and thread.forked_from:
            fork_parent = _fork_point(store, thread.forked_from)
        if run_id is not None and get_run(store, run_id).thread_id != thread_id:
            raise InvalidInput(f"run {run_id} does not belong to thread {thread_id}")
    ws = os.path.realpath(workspace or store.workspace)
    start_ns = time.time_ns()
    with store.lock("gc", shared=True):
        writer = PackWriter(store.odb)
        try:
            filled = fill(writer) if fill is not None else None
            cache: StatCache | None
            if filled is not None:
                result, root, cache = filled, _build_tree(filled.root, writer), None
            else:
                result, root, cache = scan_tree(
                    store, ws, writer, sweep_tmp, unchanged_ok=not allow_empty
                )
            if root is None:
                root = writer.add_raw("tree", b"")
            capture = _Capture(store, ws, result, root, cache, start_ns)
            # A new forked thread whose workspace still equals the fork point needs no snapshot.
            current = unchanged_if or head or fork_parent
            if result.unchanged and (current is None or capture.head_info(current)[0] != root):
                # nothing changed since the stat cache, but that is not the head's state: a
                # commit needs the scan's figures
                result, root, cache = scan_tree(store, ws, writer, sweep_tmp)
                root = root or writer.add_raw("tree", b"")
                capture = _Capture(store, ws, result, root, cache, start_ns)
            if current is not None and not allow_empty:
                head_tree, head_snap = capture.head_info(current)
                if head_tree == root:
                    writer.abort()
                    capture.save_cache((current, root, head_snap))
                    if tracks and unchanged_if is None and fork_from is None:
                        set_head(store, current, thread_id)
                    return SnapshotResult(snapshot_at(store, current), False, capture.cache)
            if fork_from is not None:
                # the workspace moved away from its thread's head: continue on a new thread
                thread_id = fork_thread(store, fork_from.thread, fork_from.id).id
                ref = store.thread_ref(thread_id)
            stats = capture.stats()
            message = encode_message(
                message, new_id("snapshot"), thread_id, run_id, stats, result.skipped, trailers
            )
            commit = _commit_object(root, head or fork_parent, message, merge_parents)
            oid = writer.add_raw("commit", encode_commit(commit))
            writer.publish()
        except BaseException:
            writer.abort()
            raise
        if stage_as is not None:
            store.refs.update(stage_as, oid, reason="staged")
            parent = commit.parents[0] if commit.parents else None
            parent_id = snapshot_at(store, parent).id if parent is not None else None
            return SnapshotResult(snapshot_from_commit(oid, commit, parent_id), True, capture.cache)
        outcome = _advance(capture, ref, head, fork_parent, commit, oid, allow_empty)
        if tracks:
            set_head(store, bytes.fromhex(outcome.snapshot.commit), thread_id)
        if fork_from is not None:
            outcome = outcome.replace(new_thread=True)
        if store.odb.pack_count() > MAX_PACKS:
            consolidate_small_packs(store.odb)
        return outcome


def _commit_object(
    root: bytes, parent: bytes | None, message: str, merge_parents: tuple[bytes, ...] = ()
) -> Commit:
    sig = Signature("narrative", "narrative@localhost", int(time.time()))
    parents = ((parent,) if parent else ()) + tuple(p for p in merge_parents if p != parent)
    return Commit(root, parents, sig, sig, message)


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
            reason = "merge" if len(commit.parents) > 1 else "snapshot"
            store.refs.update(ref, oid, expected=head, reason=reason)
            break
        except ConcurrentUpdate:
            head = store.refs.read(ref)
            if head is not None and not allow_empty and capture.head_info(head)[0] == capture.root:
                # Another writer captured this very state: that snapshot is ours too.
                return SnapshotResult(snapshot_at(store, head), False, capture.cache)
            commit = _commit_object(
                capture.root, head or fork_parent, commit.message, commit.parents[1:]
            )
            oid = store.odb.write_loose("commit", encode_commit(commit))
    else:
        raise ConcurrentUpdate(f"store busy, retry: too many concurrent writers advanced {ref}")
    capture.save_cache((oid, capture.root, snapshot_from_commit(oid, commit, None).id))
    parent = commit.parents[0] if commit.parents else None
    parent_id = None
    if parent is not None:
        parent_id = snapshot_from_commit(parent, read_commit(store, parent), None).id
    return SnapshotResult(snapshot_from_commit(oid, commit, parent_id), True, capture.cache)
