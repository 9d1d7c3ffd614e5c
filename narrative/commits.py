"""Reading snapshots back from the commits that store them: one commit, a thread's snapshots
(newest first), every snapshot of the store, one by its exact id.

Names (prefixes, thread names, ``origin/main``, run ids) are :mod:`narrative.history`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .commitmsg import is_snapshot_commit, snapshot_from_commit
from .errors import SnapshotNotFound, StoreCorrupted
from .models import Snapshot
from .objects import Commit, parse_commit

if TYPE_CHECKING:
    from .store import Store

__all__ = ["all_snapshots", "read_commit", "snapshot_at", "snapshot_by_id", "thread_snapshots"]


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


def thread_snapshots(store: Store, thread_id: str, head: bytes | None = None) -> Iterator[Snapshot]:
    """Snapshots of one thread, newest first (stops where the thread was forked)."""
    oid = head if head is not None else store.refs.read(store.thread_ref(thread_id))
    if oid is None:
        return
    commit = read_commit(store, oid)
    while True:
        parent_oid = commit.parents[0] if commit.parents else None
        parent_commit = read_commit(store, parent_oid) if parent_oid is not None else None
        parent_id = (
            snapshot_from_commit(parent_oid, parent_commit, None).id
            if parent_oid is not None
            and parent_commit is not None
            and is_snapshot_commit(parent_commit)
            else None
        )
        snap = snapshot_from_commit(oid, commit, parent_id)
        if snap.thread != thread_id:
            return
        yield snap
        if parent_oid is None or parent_commit is None or not is_snapshot_commit(parent_commit):
            return
        oid, commit = parent_oid, parent_commit


def all_snapshots(store: Store) -> Iterator[Snapshot]:
    """Every snapshot reachable from any thread, each once (thread by thread, newest first)."""
    seen: set[str] = set()
    for thread_id, head in sorted(store.thread_heads().items()):
        for snap in thread_snapshots(store, thread_id, head):
            if snap.commit in seen:
                break
            seen.add(snap.commit)
            yield snap


def snapshot_by_id(store: Store, snapshot_id: str) -> Snapshot:
    """The snapshot whose id (or commit id) is exactly ``snapshot_id``, as records store them.

    Raises:
        SnapshotNotFound: no snapshot of the store has it.
    """
    for snap in all_snapshots(store):
        if snapshot_id in (snap.id, snap.commit):
            return snap
    raise SnapshotNotFound(snapshot_id)
