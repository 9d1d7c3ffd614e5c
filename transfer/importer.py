"""``import``: take in a bundle or archive from any fsspec URL, verified before any ref moves.

Order (what makes a refused import leave the store exactly as it was): read and check the whole
artifact against its sha256 sidecar while parsing it; verify every object, that the history is
complete (connected down to objects the store already has), that every thread ref names a
snapshot of that thread, and that every record is valid — all before anything is published.
Then the objects are published, records merged, and thread refs moved by compare-and-swap:
fast-forwards move; a thread that moved on both sides keeps the local head and gets the
incoming one under ``refs/narrative/remotes/<source>/threads/<id>``. Importing twice changes
nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from narrative.commitmsg import is_snapshot_commit, snapshot_from_commit
from narrative.objects import parse_commit
from narrative.store import THREAD_REF_PREFIX, Store

from .bundle import BUNDLE_SIGNATURE, BundleFormatError, read_bundle_header
from .errors import InvalidArtifact
from .packin import receive_pack
from .records import BUNDLE_META_REF, merge_records, parse_records
from .storage_base import plain_local_path
from .thread_updates import ImportResult, Readable, fast_forward

if TYPE_CHECKING:
    from fsspec.callbacks import Callback

__all__ = ["import_", "import_stream"]

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_LINE_CHUNK = 64 << 10


def source_name(url: str) -> str:
    """A ref-safe name for where an import came from."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[:40].strip("-.")
    return f"{tail or 'import'}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def import_(
    store: Store,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    callback: Callback | None = None,
    source: str | None = None,
) -> ImportResult:
    """Import the artifact at ``url`` (format detected from its content)."""
    local = plain_local_path(url, storage_options)
    if local is not None:  # no fsspec (60-180 ms of import), as for exports to local files
        from .verified_local import open_local_verified

        stream = open_local_verified(local, url, callback)
    else:
        # imported here: fsspec is for URLs, and a runtime imports bundles from a stream only
        from . import verified

        stream = verified.open_verified(url, storage_options, callback=callback)
    with stream:
        return import_stream(store, stream, url, source or source_name(url))


class _Peek:
    """A stream whose first bytes were looked at for format detection, with line reads.

    Lines are cut from a read-ahead buffer (never byte by byte, never by re-joining what was
    read so far), so a long crafted header line costs linear time."""

    def __init__(self, stream: Readable, head: bytes) -> None:
        self._stream = stream
        self._buffer = head
        self._pos = 0

    def _buffered(self) -> int:
        return len(self._buffer) - self._pos

    def _take(self, n: int) -> bytes:
        data = self._buffer[self._pos : self._pos + n]
        self._pos += len(data)
        if self._pos == len(self._buffer):
            self._buffer, self._pos = b"", 0
        return data

    def read(self, n: int = -1) -> bytes:
        if not self._buffered():
            return self._stream.read(n)
        if n < 0:
            return self._take(self._buffered()) + self._stream.read()
        data = self._take(n)
        if len(data) < n:
            data += self._stream.read(n - len(data))
        return data

    def readline(self, limit: int = -1) -> bytes:
        parts: list[bytes] = []
        size = 0
        while limit < 0 or size < limit:
            if not self._buffered():
                self._buffer, self._pos = self._stream.read(_LINE_CHUNK), 0
                if not self._buffer:
                    break
            end = (
                len(self._buffer) if limit < 0 else min(len(self._buffer), self._pos + limit - size)
            )
            newline = self._buffer.find(b"\n", self._pos, end)
            piece = self._take((end if newline < 0 else newline + 1) - self._pos)
            parts.append(piece)
            size += len(piece)
            if newline >= 0:
                break
        return b"".join(parts)


def import_stream(
    store: Store,
    stream: Readable,
    url: str,
    source: str,
    *,
    move_threads: bool = True,
    check_threads: Callable[[dict[str, bytes]], None] | None = None,
    max_bytes: int | None = None,
    stage: Mapping[str, str] | None = None,
) -> ImportResult:
    """Import from an open stream (see :func:`import_`). Without ``move_threads`` only objects
    and records are taken in (``fetch``); thread refs stay where they are. ``stage`` maps a
    thread id to a ref that receives its incoming head instead of the thread (a run's result,
    screened before it reaches the thread). ``check_threads``
    sees the bundle's thread heads (thread id → commit) before anything is stored, and raises
    to refuse the whole import (only bundles are accepted then). ``max_bytes`` caps a bundle's
    pack, each object and all objects inflated together (the limits of
    :func:`transfer.packin.receive_pack`), for bundles from hostile peers."""
    head = stream.read(len(BUNDLE_SIGNATURE))
    peek: Any = _Peek(stream, head)
    if head.startswith(BUNDLE_SIGNATURE[:12]):
        return _import_bundle(
            store, peek, url, source, move_threads, check_threads, max_bytes, stage or {}
        )
    if check_threads is not None:
        raise InvalidArtifact(f"{url} is not a narrative bundle")
    if head.startswith((_GZIP, _ZSTD)):
        return _import_archive(store, peek, url, source)
    raise InvalidArtifact(f"{url} is neither a narrative bundle nor a narrative archive")


def _import_bundle(
    store: Store,
    stream: Any,
    url: str,
    source: str,
    move_threads: bool,
    check_threads: Callable[[dict[str, bytes]], None] | None = None,
    max_bytes: int | None = None,
    stage: Mapping[str, str] | None = None,
) -> ImportResult:
    header = read_bundle_header(stream)
    for oid, comment in header.prerequisites.items():
        if not store.odb.exists(oid):
            raise InvalidArtifact(
                f"{url} needs snapshot {comment or oid.hex()} ({oid.hex()[:12]}) which this "
                "store does not have: import the earlier bundle first"
            )
    limit = store.config.max_import_size
    if max_bytes is None:
        received = receive_pack(stream, store.odb, max_object=limit, max_expanded=limit)
    else:
        limit = min(limit, max_bytes)
        received = receive_pack(
            stream, store.odb, max_object=limit, max_total=max_bytes, max_expanded=limit
        )
    try:
        tail = stream.read(1)  # reaching EOF makes the verified reader check the sidecar
        if tail:
            raise InvalidArtifact(f"{url} has data after its pack")
        missing = received.missing_below(list(header.refs.values()), store.odb)
        if missing:
            raise InvalidArtifact(
                f"{url} is incomplete: object {missing[0].hex()} is neither in the bundle nor "
                "in this store"
            )
        threads = _check_thread_refs(store, header.refs, received.small)
        if check_threads is not None:
            check_threads(threads)
        records: dict[str, Any] = {}
        meta = header.refs.get(BUNDLE_META_REF)
        if meta is not None:
            commit = received.small.get(meta)
            if commit is None:
                raise InvalidArtifact(f"{url} names records it does not carry")

            def read(oid: bytes) -> bytes | None:
                if oid in received.small:
                    return received.small[oid]
                pending = received.writer.read_pending(oid)
                if pending is not None:
                    return pending[1]
                return store.odb.read(oid)[1] if store.odb.exists(oid) else None

            records = parse_records(read, parse_commit(commit).tree)
        known = set(records.get("threads", {})) | set(store.meta.ids("threads"))
        unknown = sorted(set(threads) - known)
        if unknown:
            raise InvalidArtifact(f"{url} carries thread {unknown[0]} without its record")
    except BaseException:
        received.abort()
        raise
    received.publish()
    result = ImportResult(url, "bundle", source, objects=len(received.objects))
    result.records, result.conflicts = merge_records(store, records, source)
    store.odb.invalidate()
    if move_threads:
        for thread_id, incoming in sorted(threads.items()):
            staged_ref = (stage or {}).get(thread_id)
            if staged_ref is None:
                fast_forward(store, thread_id, incoming, source, result)
            else:
                store.refs.update(staged_ref, incoming, reason=f"staged from {source}")
                result.staged[thread_id] = incoming.hex()
    return result


def _check_thread_refs(
    store: Store, refs: dict[str, bytes], small: dict[bytes, bytes]
) -> dict[str, bytes]:
    """Every ref besides the records must be a thread ref naming a snapshot of that thread."""
    threads: dict[str, bytes] = {}
    for name, oid in refs.items():
        if name == BUNDLE_META_REF:
            continue
        if not name.startswith(THREAD_REF_PREFIX):
            raise BundleFormatError(f"bundle ref {name} is not a thread ref")
        thread_id = name[len(THREAD_REF_PREFIX) :]
        data = small.get(oid)
        if data is None:
            data = store.odb.read(oid)[1]
        commit = parse_commit(data)
        if not is_snapshot_commit(commit):
            raise InvalidArtifact(f"bundle ref {name} does not point at a snapshot")
        snap = snapshot_from_commit(oid, commit, None)
        if snap.thread != thread_id:
            raise InvalidArtifact(f"bundle ref {name} points at a snapshot of {snap.thread}")
        threads[thread_id] = oid
    return threads


def _import_archive(store: Store, stream: Any, url: str, source: str) -> ImportResult:
    # imported here: archives (tar, zstd) arrive by ``narrative import`` only, never at a runtime
    from .archive_import import import_archive_snapshot

    return import_archive_snapshot(store, stream, url, source)
