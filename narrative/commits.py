"""Reading snapshots back from the commits that store them: one commit, a thread's snapshots
(newest first), every snapshot of the store, one by its exact id.

Names (prefixes, thread names, ``origin/main``, run ids) are :mod:`narrative.history`'s job.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import threading
import weakref
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

from .commitmsg import is_snapshot_commit, snapshot_from_commit, snapshot_names
from .errors import SnapshotNotFound, StoreCorrupted
from .fsutil import write_atomic
from .models import Snapshot
from .objects import Commit, parse_commit
from .plain import Frozen

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "all_snapshots",
    "keep_snapshot_ids",
    "read_commit",
    "resolved_snapshot",
    "snapshot_at",
    "snapshot_by_id",
    "snapshot_ids",
    "thread_snapshots",
]


def read_commit(store: Store, oid: bytes) -> Commit:
    kind, data = store.odb.read(oid)
    if kind != "commit":
        raise StoreCorrupted(f"{oid.hex()} is a {kind}, not a commit")
    return parse_commit(data)


def _snapshot_id_of(store: Store, oid: bytes | None) -> str | None:
    if oid is None:
        return None
    commit = read_commit(store, oid)
    return snapshot_from_commit(oid, commit, None).id if is_snapshot_commit(commit) else None


def snapshot_at(store: Store, oid: bytes) -> Snapshot:
    """The snapshot stored in commit ``oid`` (with its parent's snapshot id)."""
    commit = read_commit(store, oid)
    if not is_snapshot_commit(commit):
        raise SnapshotNotFound(oid.hex())
    parent = _snapshot_id_of(store, commit.parents[0] if commit.parents else None)
    return snapshot_from_commit(oid, commit, parent)


class _Link(Frozen):
    """One commit of a history walk, decoded only as far as the walk needs."""

    __slots__ = ("data", "oid", "parent", "snapshot_id", "thread")
    FIELDS = ("oid", "data", "parent", "snapshot_id", "thread")
    oid: bytes
    data: bytes
    parent: bytes | None
    snapshot_id: str | None
    thread: str | None

    def __init__(
        self,
        oid: bytes,
        data: bytes,
        parent: bytes | None,
        snapshot_id: str | None,
        thread: str | None,
    ) -> None:
        self.set_fields(oid, data, parent, snapshot_id, thread)


def _link(store: Store, oid: bytes) -> _Link:
    kind, data = store.odb.read(oid)
    if kind != "commit":
        raise StoreCorrupted(f"{oid.hex()} is a {kind}, not a commit")
    head, _, message = data.partition(b"\n\n")
    parent = None
    for line in head.split(b"\n"):
        if line.startswith(b"parent "):  # the first one (continuation lines start with " ")
            parent = bytes.fromhex(line[7:].decode())
            break
    names = snapshot_names(message.decode("utf-8", "replace"))
    snapshot_id, thread = names if names is not None else (None, None)
    return _Link(oid, data, parent, snapshot_id, thread)


def _chain(store: Store, thread_id: str, head: bytes) -> Iterator[tuple[_Link, _Link | None]]:
    """A thread's snapshot commits from ``head``, newest first, each with its first parent
    (also when that parent ends the thread); every commit is read once and lazily, so a
    caller that stops after n snapshots reads n + 1 commits, not the whole history."""
    link = _link(store, head)
    if link.snapshot_id is None:
        raise StoreCorrupted(f"commit {head.hex()} is not a valid snapshot")
    while link.thread == thread_id:
        parent = _link(store, link.parent) if link.parent is not None else None
        yield link, parent
        if parent is None or parent.snapshot_id is None:
            return
        link = parent


def thread_snapshots(store: Store, thread_id: str, head: bytes | None = None) -> Iterator[Snapshot]:
    """Snapshots of one thread, newest first (stops where the thread was forked)."""
    oid = head if head is not None else store.refs.read(store.thread_ref(thread_id))
    if oid is None:
        return
    for link, parent in _chain(store, thread_id, oid):
        parent_id = parent.snapshot_id if parent is not None else None
        yield snapshot_from_commit(link.oid, parse_commit(link.data), parent_id)


def _all_links(store: Store) -> Iterator[tuple[_Link, _Link | None]]:
    """The commits of every thread's snapshots, each once (thread by thread, newest first)."""
    seen: set[bytes] = set()
    for thread_id, head in sorted(store.thread_heads().items()):
        for link, parent in _chain(store, thread_id, head):
            if link.oid in seen:
                break
            seen.add(link.oid)
            yield link, parent


def all_snapshots(store: Store) -> Iterator[Snapshot]:
    """Every snapshot reachable from any thread, each once (thread by thread, newest first)."""
    for link, parent in _all_links(store):
        parent_id = parent.snapshot_id if parent is not None else None
        yield snapshot_from_commit(link.oid, parse_commit(link.data), parent_id)


def snapshot_ids(store: Store) -> Generator[tuple[str, bytes], None, None]:
    """``(snapshot id, commit)`` of every snapshot :func:`all_snapshots` yields, in its order,
    without decoding the snapshots (resolving a name scans them all). Read through the store's
    :class:`_SnapshotIndex`: a long-lived process (a hub resolving a snapshot for every run)
    reads only what was added since it last asked, and a new process starts from what an
    earlier one kept (:func:`keep_snapshot_ids`)."""
    yield from _index_of(store).entries(store)


def keep_snapshot_ids(store: Store) -> None:
    """Keep what this process read of the snapshot index in the store's cache directory, when
    it read enough commits to be worth a file (a cold ``show`` of a snapshot deep in a history
    of 10,000 reads thousands of commits; the next process then reads only what is newer).
    Called after a name resolved: a name that resolves to nothing leaves the store as it was.
    The file is only a cache: a process that cannot write it goes on without it."""
    _index_of(store).keep(store)


def _index_of(store: Store) -> _SnapshotIndex:
    with _INDEXES_LOCK:
        index = _INDEXES.get(store)
        if index is None:
            index = _INDEXES[store] = _SnapshotIndex()
    return index


_Chain = tuple[bytes, list[tuple[str, bytes]], bytes | None]
"""One thread's entry of the index: the head it was read from, the ``(snapshot id, commit)``
pairs read from there (newest first), and the commit the reading goes on from (None: all read)."""

_INDEX_FILE = ("narrative", "cache", "snapshot-index")
_INDEX_VERSION = 1
KEEP_INDEX_AFTER = 64
"""Commits read since the file was loaded or written before :func:`keep_snapshot_ids` writes
it again (a few new snapshots are cheaper to read again than the file to rewrite)."""


class _SnapshotIndex:
    """Each thread's ``(snapshot id, commit)`` pairs, newest first, as far as they were read,
    with the head they were read from and the commit the reading goes on from (None: the whole
    chain was read). Read lazily: a caller that stops at what it looked for (a cold process
    resolving a recent snapshot) reads no further, and the next goes on from there. A thread
    whose head moved is read from its new head down to the old one when it only grew (a
    snapshot taken, a result merged), else (reset, rewritten) again from its head; a thread
    gone is dropped. Snapshot commits never change: a pair read once stays true as long as its
    thread's head still leads to it, which the old head being met on the way proves. That is
    also why the pairs an earlier process kept (:meth:`keep`) can be trusted the same way: an
    entry is used only from the very head it was read from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[str, _Chain] | None = None  # None: the kept file not loaded yet
        self._read = 0  # commits read since the kept file was loaded or written

    def entries(self, store: Store) -> Iterator[tuple[str, bytes]]:
        """The pairs, thread by thread as :func:`_all_links` gives them (chains of two threads
        never share a commit: each commit names its one thread, and a chain stops at the first
        that names another)."""
        heads = store.thread_heads()
        with self._lock:
            threads = self._loaded(store)
            for gone in threads.keys() - heads.keys():
                del threads[gone]
        for thread_id, head in sorted(heads.items()):
            yield from self._pairs(store, thread_id, head)

    def keep(self, store: Store) -> None:
        with self._lock:
            if self._threads is None or self._read < KEEP_INDEX_AFTER:
                return
            kept = {
                thread_id: (
                    head,
                    " ".join(snapshot_id for snapshot_id, _ in pairs),
                    b"".join(oid for _, oid in pairs),
                    start,
                )
                for thread_id, (head, pairs, start) in self._threads.items()
            }
            self._read = 0
        with contextlib.suppress(OSError):  # a read-only store: resolving works without it
            write_atomic(
                os.path.join(store.git_dir, *_INDEX_FILE),
                marshal.dumps((_INDEX_VERSION, kept)),
                durable=False,  # a cache: a torn file is refused when loaded, and read again
            )

    def _loaded(self, store: Store) -> dict[str, _Chain]:
        if self._threads is None:
            self._threads = _load_kept(os.path.join(store.git_dir, *_INDEX_FILE))
        return self._threads

    def _pairs(self, store: Store, thread_id: str, head: bytes) -> Iterator[tuple[str, bytes]]:
        with self._lock:
            kept = self._loaded(store).get(thread_id)
        older = None  # what was read from an older head, met again if the thread only grew
        if kept is not None and kept[0] == head:
            pairs, start = list(kept[1]), kept[2]
        else:
            pairs, start, older = [], head, kept
        read = 0
        try:
            yield from tuple(pairs)  # read before (none when the head moved)
            while start is not None:
                chain, start = _chain(store, thread_id, start), None
                for link, parent in chain:
                    read += 1
                    if older is not None and link.oid == older[0]:
                        pairs += older[1]
                        start, grown, older = older[2], older[1], None
                        yield from grown
                        break
                    assert link.snapshot_id is not None  # _chain yields snapshot commits only
                    start = None  # where a later reading goes on: the parent, if the chain does
                    if parent is not None and parent.snapshot_id and parent.thread == thread_id:
                        start = parent.oid
                    pairs.append((link.snapshot_id, link.oid))
                    yield pairs[-1]
        finally:  # what was read, also when the caller stopped early
            with self._lock:
                self._loaded(store)[thread_id] = (head, pairs, start)
                self._read += read


def _load_kept(path: str) -> dict[str, _Chain]:
    """The index an earlier process kept; empty when there is none or it is not one this
    version wrote whole (torn, truncated, another version: it is read again from the commits)."""
    try:
        with open(path, "rb") as f:
            version, kept = marshal.loads(f.read())
        if version != _INDEX_VERSION or not isinstance(kept, dict):
            return {}
        threads: dict[str, _Chain] = {}
        for thread_id, (head, ids, oids, start) in kept.items():
            names = ids.split(" ") if ids else []
            if (
                not isinstance(thread_id, str)
                or not isinstance(head, bytes)
                or not isinstance(oids, bytes)
                or len(oids) != 20 * len(names)
                or not (start is None or isinstance(start, bytes))
            ):
                return {}
            commits = [oids[i : i + 20] for i in range(0, len(oids), 20)]
            threads[thread_id] = (head, list(zip(names, commits, strict=True)), start)
        return threads
    except (OSError, EOFError, ValueError, TypeError, AttributeError):
        return {}


_INDEXES: weakref.WeakKeyDictionary[Store, _SnapshotIndex] = weakref.WeakKeyDictionary()
_INDEXES_LOCK = threading.Lock()


def snapshot_by_id(store: Store, snapshot_id: str) -> Snapshot:
    """The snapshot whose id (or commit id) is exactly ``snapshot_id``, as records store them.

    Raises:
        SnapshotNotFound: no snapshot of the store has it.
    """
    with contextlib.closing(snapshot_ids(store)) as pairs:  # closed: what it read is recorded
        oid = next((oid for found, oid in pairs if snapshot_id in (found, oid.hex())), None)
    if oid is None:
        raise SnapshotNotFound(snapshot_id)
    return resolved_snapshot(store, oid)


def resolved_snapshot(store: Store, oid: bytes) -> Snapshot:
    """The snapshot a name resolved to, through :func:`snapshot_ids`: read, and what the
    resolving read of the index kept for the next process (:func:`keep_snapshot_ids`)."""
    snapshot = snapshot_at(store, oid)
    keep_snapshot_ids(store)
    return snapshot
