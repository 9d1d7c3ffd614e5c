"""``export``: write threads as a git bundle, or one snapshot as an archive, to any fsspec URL.

The store is only read. The artifact is streamed to the backend and published atomically with
a ``.sha256`` sidecar (see :mod:`transfer.publishing`).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from narrative.errors import InvalidInput
from narrative.hierarchy import (
    get_objective,
    get_run,
    get_thread,
    list_threads,
    resolve_objective,
    resolve_thread,
)
from narrative.history import resolve_snapshot
from narrative.restore import RESTORE_BACKUP_THREAD
from narrative.shared import mark_shared
from narrative.store import THREAD_REF_PREFIX, Store

from .bundle import write_bundle
from .records import BUNDLE_META_REF, collect_records, encode_records
from .storage_base import PublishWriter, plain_local_path, publish_local

if TYPE_CHECKING:
    from fsspec.callbacks import Callback

__all__ = ["FORMATS", "ExportResult", "export"]

FORMATS = ("bundle", "tar.gz", "tar.zst")


@dataclass
class ExportResult:
    """What ``export`` wrote (``nothing_new`` when an incremental export had nothing to send)."""

    url: str
    format: str
    size: int = 0
    sha256: str | None = None
    objects: int = 0
    refs: dict[str, str] = field(default_factory=dict)
    prerequisites: list[str] = field(default_factory=list)
    snapshot: str | None = None
    nothing_new: bool = False


def _publish(
    url: str, storage_options: dict[str, Any] | None, callback: Callback | None
) -> AbstractContextManager[PublishWriter]:
    """:func:`transfer.publishing.publish`, but a plain local path is published without
    importing fsspec (a fifth of a small export's time; see :mod:`transfer.storage_base`)."""
    path = plain_local_path(url, storage_options)
    if path is not None:
        return publish_local(path, url, callback)
    from . import publishing

    return publishing.publish(url, storage_options, callback=callback)


def selected_threads(store: Store, threads: list[str] | None, objective: str | None) -> list[str]:
    if objective is not None:
        obj = resolve_objective(store, objective)
        picked = [t.id for t in list_threads(store, obj.id)]
    else:
        picked = []
    picked += [resolve_thread(store, t).id for t in threads or []]
    if not picked and objective is None:
        # by default every thread but the local safety net of restores (it is this machine's)
        picked = [t.id for t in list_threads(store) if t.name != RESTORE_BACKUP_THREAD]
    return sorted(set(picked))


def export(
    store: Store,
    url: str,
    *,
    fmt: str = "bundle",
    threads: list[str] | None = None,
    objective: str | None = None,
    snapshot: str | None = None,
    since: str | None = None,
    storage_options: dict[str, Any] | None = None,
    callback: Callback | None = None,
) -> ExportResult:
    """Export to ``url``: a bundle of the selected threads (default: all), or with ``fmt``
    ``tar.gz``/``tar.zst`` an archive of one snapshot (``snapshot``, default the head of the
    single selected thread)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "bundle":
        return _export_bundle(
            store, url, threads, objective, snapshot, since, storage_options, callback
        )
    if since is not None:
        raise InvalidInput("--since applies to bundles only; archives hold one whole snapshot")
    return _export_archive(store, url, fmt, threads, objective, snapshot, storage_options, callback)


def _export_bundle(
    store: Store,
    url: str,
    threads: list[str] | None,
    objective: str | None,
    snapshot: str | None,
    since: str | None,
    storage_options: dict[str, Any] | None,
    callback: Callback | None,
) -> ExportResult:
    heads = store.thread_heads()
    refs: dict[str, bytes] = {}
    if snapshot is not None:
        snap = resolve_snapshot(store, snapshot)
        thread_ids = [snap.thread]
        refs[store.thread_ref(snap.thread)] = bytes.fromhex(snap.commit)
    else:
        thread_ids = selected_threads(store, threads, objective)
        refs = {store.thread_ref(t): heads[t] for t in thread_ids if t in heads}
    prerequisites: dict[bytes, str] = {}
    if since is not None:
        base = resolve_snapshot(store, since)
        prerequisites[bytes.fromhex(base.commit)] = base.id
        if all(oid == bytes.fromhex(base.commit) for oid in refs.values()):
            return ExportResult(url, "bundle", nothing_new=True, prerequisites=[base.commit])
    if not refs:
        raise InvalidInput("nothing to export: the selected threads have no snapshots")
    meta_commit, meta_objects = encode_records(collect_records(store, thread_ids), int(time.time()))
    with _publish(url, storage_options, callback) as out:
        stats = write_bundle(
            store.odb,
            out,
            {**refs, BUNDLE_META_REF: meta_commit},
            prerequisites,
            extra=meta_objects,
        )
    mark_shared(store, {ref[len(THREAD_REF_PREFIX) :]: oid for ref, oid in refs.items()})
    return ExportResult(
        url, "bundle", out.size, out.sha256, stats.objects, stats.refs, stats.prerequisites
    )


def _export_archive(
    store: Store,
    url: str,
    fmt: str,
    threads: list[str] | None,
    objective: str | None,
    snapshot: str | None,
    storage_options: dict[str, Any] | None,
    callback: Callback | None,
) -> ExportResult:
    from .archive_write import write_archive

    if snapshot is not None:
        snap = resolve_snapshot(store, snapshot)
    else:
        picked = (
            selected_threads(store, threads, objective)
            if threads or objective
            else [store.config.default_thread]
        )
        if len(picked) != 1:
            raise InvalidInput("an archive holds one snapshot: name it with --snapshot")
        if picked[0] not in store.thread_heads():
            raise InvalidInput(f"thread {picked[0]} has no snapshots: name one with --snapshot")
        snap = resolve_snapshot(store, picked[0])
    thread = get_thread(store, snap.thread)
    records: dict[str, Any] = {
        "thread": thread.to_dict(),
        "objective": get_objective(store, thread.objective_id).to_dict(),
        "run": get_run(store, snap.run).to_dict() if snap.run else None,
    }
    with _publish(url, storage_options, callback) as out:
        stats = write_archive(store, snap, cast(BinaryIO, out), fmt, records=records)
    mark_shared(store, {snap.thread: bytes.fromhex(snap.commit)})
    return ExportResult(url, fmt, out.size, out.sha256, stats.files, snapshot=snap.id)
