"""Turning an imported archive back into a snapshot on its thread.

The archive's files become blobs and trees (:func:`transfer.archive_read.read_archive` verifies
the tree id); here the snapshot commit is rebuilt from the manifest — same message and trailers,
same time, same parent when this store holds it — so the commit id comes out identical to the
original's whenever the parent is present. Records are merged, and the thread moves like a
bundle import would: created, fast-forwarded, or kept beside the local head when both moved.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from narrative.commitmsg import encode_message
from narrative.errors import NarrativeError
from narrative.history import resolve_snapshot
from narrative.objects import Commit, Signature, encode_commit

from .archive_read import read_archive
from .errors import InvalidArtifact
from .records import Records, merge_records
from .thread_updates import ImportResult, Readable, fast_forward

__all__ = ["import_archive_snapshot"]


def _timestamp(created_at: str) -> int:
    try:
        return calendar.timegm(time.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        raise InvalidArtifact(
            f"archive snapshot has an invalid created_at {created_at!r}"
        ) from None


def import_archive_snapshot(store: Any, stream: Readable, url: str, source: str) -> ImportResult:
    """Import one archived snapshot (see the module docstring)."""
    limit = store.config.max_import_size
    imported = read_archive(stream, store, max_total=limit)  # type: ignore[arg-type]
    while stream.read(1 << 20):
        pass  # drain to the end so the sidecar checksum is verified
    manifest = imported.manifest
    snap: dict[str, Any] = manifest.snapshot
    result = ImportResult(url, "archive", source, objects=imported.objects, snapshot=snap["id"])
    records: Records = {}
    for kind, record in (
        ("objectives", manifest.objective),
        ("threads", manifest.thread),
        ("runs", manifest.run),
    ):
        if record is not None:
            records.setdefault(kind, {})[record["id"]] = record
    result.records, result.conflicts = merge_records(store, records, source)
    try:
        existing = resolve_snapshot(store, snap["id"])
    except NarrativeError:
        existing = None
    if existing is not None:
        result.unchanged.append(existing.thread)
        return result
    parent_hex = snap.get("parent_commit")
    parent = bytes.fromhex(parent_hex) if parent_hex else None
    if parent is not None and (
        not store.odb.exists(parent) or store.odb.read(parent)[0] != "commit"
    ):
        parent = None  # history before this snapshot did not travel: it starts a new line
    when = _timestamp(snap["created_at"])
    sig = Signature("narrative", "narrative@localhost", when)
    message = encode_message(
        snap["message"],
        snap["id"],
        snap["thread"],
        snap.get("run"),
        snap.get("stats", {}),
        snap.get("skipped", []),
    )
    commit = Commit(imported.tree, (parent,) if parent else (), sig, sig, message)
    oid = store.odb.write_loose("commit", encode_commit(commit))
    fast_forward(store, snap["thread"], oid, source, result)
    return result
