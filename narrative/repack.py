"""Rewriting packs: copying objects between packs, and keeping the pack count bounded.

Every snapshot publishes one pack, so a long-lived store would accumulate thousands of small
packs and every lookup would probe each index. :func:`consolidate_small_packs` merges the small
ones once there are too many (like git's geometric repacking). It only moves objects, never
drops one, so it runs under the shared ``gc`` lock next to concurrent snapshots.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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


def consolidate_small_packs(odb: ObjectStore) -> bool:
    """Merge the small packs into one when there are more than :data:`MAX_PACKS`."""
    odb.invalidate()
    if odb.pack_count() <= MAX_PACKS:
        return False
    small = []
    for name in os.listdir(odb.pack_dir):
        if name.endswith(".pack"):
            path = os.path.join(odb.pack_dir, name)
            try:
                if os.path.getsize(path) < SMALL_PACK_BYTES and os.path.exists(path[:-5] + ".idx"):
                    small.append(path[:-5])
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
