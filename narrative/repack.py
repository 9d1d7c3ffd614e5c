"""Rewriting packs: copying objects between packs, and keeping the pack count bounded.

Every snapshot publishes one pack, so a long-lived store would accumulate thousands of small
packs and every lookup would probe each index. :func:`consolidate_small_packs` merges the small
ones once there are too many (like git's geometric repacking). It only moves objects, never
drops one, so it runs under the shared ``gc`` lock next to concurrent snapshots.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator

from .fsutil import unlink_quiet
from .odb import ObjectStore, PackWriter

__all__ = ["MAX_PACKS", "SMALL_PACK_BYTES", "consolidate_small_packs", "copy_objects"]

MAX_PACKS = 24
SMALL_PACK_BYTES = 32 << 20


def copy_objects(odb: ObjectStore, oids: Iterable[bytes], writer: PackWriter) -> None:
    """Append ``oids`` to ``writer``: verbatim when stored whole, else re-deflated."""
    for oid in oids:
        raw = odb.raw_entry(oid)
        if raw is not None:
            writer.add_entry(oid, raw)
        else:
            kind, data = odb.read(oid)
            writer.add_raw(kind, data, dedupe=False)


@contextlib.contextmanager
def _consolidation_lock(odb: ObjectStore) -> Iterator[bool]:
    """One consolidator at a time; yields False (without waiting) when another one runs."""
    os.makedirs(odb.tmp_dir, exist_ok=True)
    fd = os.open(os.path.join(os.path.dirname(odb.tmp_dir), "repack.lock"), os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the flock


def consolidate_small_packs(odb: ObjectStore) -> bool:
    """Merge the small packs into one when there are more than :data:`MAX_PACKS`.

    Concurrent snapshots all reach this point at once: only one of them merges (the others
    skip, it is an optimisation), and only packs whose index was read are merged and removed,
    so a pack published meanwhile is never removed without its objects having been copied."""
    odb.invalidate()
    if odb.pack_count() <= MAX_PACKS:
        return False
    with _consolidation_lock(odb) as held:
        if not held:
            return False
        odb.invalidate()  # another consolidator may have finished while we looked
        return _consolidate_locked(odb)


def _consolidate_locked(odb: ObjectStore) -> bool:
    if odb.pack_count() <= MAX_PACKS:
        return False
    small = []
    for idx_path in odb.pack_index_paths():
        base = idx_path[:-4]
        try:
            if os.path.getsize(base + ".pack") < SMALL_PACK_BYTES:
                small.append(base)
        except FileNotFoundError:
            continue
    if len(small) < 2:
        return False
    oids = sorted({oid for base in small for oid in odb.pack_oids(base + ".idx")})
    writer = PackWriter(odb)
    try:
        copy_objects(odb, oids, writer)
        new_name = writer.publish()
    except BaseException:
        writer.abort()
        raise
    for base in small:
        if new_name and base.endswith(new_name):
            continue
        # index first: a pack without an index is invisible, never a dangling index
        unlink_quiet(base + ".idx")
        unlink_quiet(base + ".pack")
    odb.invalidate()
    return True
