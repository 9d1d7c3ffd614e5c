"""Narratives along the chain: snapshots travel between a hub and a runtime as git bundles,
pulled over the gateway in chunks.

Both ends serve the same three capabilities, so a snapshot can move either way and a runtime
that is itself a hub for the next environment passes narratives on:

* ``narrative:prepareBundle`` writes a bundle to a scratch file and answers its id, size and
  sha256. The bundle holds the refs asked for (a snapshot, and/or every thread head the caller
  does not have), the records of the threads named (with their forks, objectives and runs;
  ``forkRuns: false``: not the runs of the forks), and only the objects the caller lacks
  (``have`` lists commits it holds).
* ``narrative:readBundle`` answers one chunk (base64) at an offset: the caller pulls, so the
  transfer is flow-controlled by the caller and never outruns a frame or a queue.
* ``narrative:dropBundle`` deletes the scratch file (it also expires after an hour).

:func:`fetch_bundle` is the caller's side: it pulls the chunks a few at a time, checks size
and sha256, and imports the bundle with :func:`transfer.importer.import_stream`, which
validates everything before the store changes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from gateway.handlers import HandlerContext, HandlerRegistry
from narrative.errors import InvalidInput, NarrativeError
from narrative.history import resolve_snapshot
from narrative.shared import mark_shared
from narrative.store import THREAD_REF_PREFIX, Store
from providers.errors import ResultTooLarge
from transfer.bundle import write_bundle
from transfer.importer import import_stream
from transfer.packin import PackTooLarge
from transfer.records import BUNDLE_META_REF, collect_records, encode_records
from transfer.thread_updates import ImportResult

__all__ = ["CHUNK", "BundleShelf", "fetch_bundle"]

#: Raw bytes per chunk: base64 of it plus the envelope stays well below the 1 MiB frame limit.
CHUNK = 512 * 1024
_WINDOW = 4
_EXPIRY = 3600.0
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
T = TypeVar("T")


class Blocking(Protocol):
    """Runs a function off the event loop and returns its result."""

    def __call__(self, func: Callable[[], T], /) -> Awaitable[T]: ...


Call = Callable[[str, str, dict[str, Any]], Awaitable[Any]]
"""``call(kind, action, payload)`` towards the peer holding the bundle."""


def _commits(value: Any) -> list[bytes]:
    if not isinstance(value, list) or not all(
        isinstance(c, str) and _HEX40.match(c) for c in value
    ):
        raise InvalidInput("'have' must be a list of commit ids")
    return [bytes.fromhex(c) for c in value]


def _thread_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidInput("'threads' must be a list of thread ids")
    return list(value)


def make_bundle(
    store: Store, path: str, spec: dict[str, Any], baseline: frozenset[bytes] = frozenset()
) -> dict[str, Any]:
    """Write the bundle ``spec`` asks for to ``path`` (see the module docstring); with
    ``changed``, thread heads in ``baseline`` (what the store held when the run began) stay
    home too."""
    offered = _commits(spec.get("have", []))
    have = [c for c in offered if store.odb.exists(c)]
    threads = _thread_ids(spec.get("threads", []))
    refs: dict[str, bytes] = {}
    snapshot = spec.get("snapshot")
    if snapshot is not None:
        if not isinstance(snapshot, str):
            raise InvalidInput("'snapshot' must be a snapshot id")
        snap = resolve_snapshot(store, snapshot)
        refs[store.thread_ref(snap.thread)] = bytes.fromhex(snap.commit)
    if spec.get("changed"):
        held = set(offered) | baseline
        for thread_id, head in store.thread_heads().items():
            if head not in held:
                refs[store.thread_ref(thread_id)] = head
                threads.append(thread_id)
    known = set(store.meta.ids("threads"))
    unknown = sorted(set(threads) - known)
    if unknown:
        raise InvalidInput(f"unknown thread {unknown[0]}")
    fork_runs = spec.get("forkRuns", True) is not False  # False: the caller wants fewer
    records = collect_records(store, threads, fork_runs=fork_runs)
    meta_commit, meta_objects = encode_records(records, int(time.time()))
    digest = hashlib.sha256()
    size = 0

    class _Out:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> None:
            nonlocal size
            digest.update(data)
            size += len(data)
            self.f.write(data)

    with open(path, "wb") as f:
        stats = write_bundle(
            store.odb,
            _Out(f),
            {**refs, BUNDLE_META_REF: meta_commit},
            {c: "" for c in have},
            extra=meta_objects,
        )
    # the peer now holds these commits: gc must keep them as they are (narrative.shared)
    mark_shared(store, {ref[len(THREAD_REF_PREFIX) :]: oid for ref, oid in refs.items()})
    return {"size": size, "sha256": digest.hexdigest(), "objects": stats.objects}


class BundleShelf:
    """Serves bundles of ``store`` to peers (the ``narrative:*Bundle`` capabilities).

    Args:
        store: The store bundles are made from.
        baseline: Thread heads a ``changed`` bundle leaves out (a runtime's heads right after
            it restored the base: its own bookkeeping never travels home).
        run_blocking: Runs store work off the event loop (one worker: the store is not
            thread-safe).
        on_read: Told the peer (the first of a call's route) and the size of each chunk
            served (a hub counts what it sends each run's runtime).
    """

    def __init__(
        self,
        store: Store,
        run_blocking: Blocking,
        baseline: Callable[[], frozenset[bytes]] = frozenset,
        on_read: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.baseline = baseline
        self.on_read = on_read
        self.directory = os.path.join(store.git_dir, "narrative", "tmp", "bundles")
        self._run = run_blocking

    def install(self, registry: HandlerRegistry) -> None:
        registry.register("narrative", "prepareBundle", self._prepare)
        registry.register("narrative", "readBundle", self._read)
        registry.register("narrative", "dropBundle", self._drop)

    def _path(self, payload: dict[str, Any]) -> str:
        bundle_id = payload.get("bundleId")
        if not isinstance(bundle_id, str) or not _ID_RE.match(bundle_id):
            raise InvalidInput("'bundleId' must be a bundle id")
        path = os.path.join(self.directory, f"{bundle_id}.bundle")
        if not os.path.exists(path):
            raise InvalidInput(f"no bundle {bundle_id} (dropped or expired)")
        return path

    async def _prepare(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        os.makedirs(self.directory, exist_ok=True)
        self._expire()
        bundle_id = secrets.token_hex(8)
        path = os.path.join(self.directory, f"{bundle_id}.bundle")
        try:
            baseline = self.baseline()
            info = await self._run(lambda: make_bundle(self.store, path, payload, baseline))
        except BaseException:
            _unlink(path)
            raise
        return {"bundleId": bundle_id, **info}

    async def _read(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        path = self._path(payload)
        offset = payload.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise InvalidInput("'offset' must be a non-negative integer")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(CHUNK)
        if self.on_read is not None and ctx.route_path:
            self.on_read(ctx.route_path[0], len(data))
        return {"data": base64.b64encode(data).decode("ascii")}

    async def _drop(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        _unlink(self._path(payload))
        return {}

    def _expire(self) -> None:
        cutoff = time.time() - _EXPIRY
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except FileNotFoundError:
                continue


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def fetch_bundle(
    call: Call,
    store: Store,
    spec: dict[str, Any],
    run_blocking: Blocking,
    source: str,
    *,
    check_threads: Callable[[dict[str, bytes]], None] | None = None,
    max_bytes: int | None = None,
    stage: Mapping[str, str] | None = None,
) -> tuple[ImportResult, int]:
    """Pull the bundle ``spec`` describes from a peer and import it into ``store``
    (``check_threads``, ``stage``: see :func:`transfer.importer.import_stream`). With
    ``max_bytes``, a bundle announced larger is refused before a byte is pulled, and its
    objects are held to the same cap while they are imported.

    Returns:
        The import's result and the bundle's size in bytes.

    Raises:
        InvalidArtifact: the bundle is damaged, over ``max_bytes`` once inflated, or does not
            fit this store (nothing imported).
        ResultTooLarge: the bundle is over ``max_bytes`` (nothing pulled).
        GatewayError: the peer failed or went away.
    """
    info = await call("narrative", "prepareBundle", spec)
    try:
        bundle_id, size, sha256 = str(info["bundleId"]), int(info["size"]), str(info["sha256"])
    except (KeyError, TypeError, ValueError):
        raise NarrativeError(f"{source} answered a malformed bundle description") from None
    if max_bytes is not None and size > max_bytes:
        with contextlib.suppress(Exception):  # best effort: it expires anyway
            await call("narrative", "dropBundle", {"bundleId": bundle_id})
        raise ResultTooLarge(
            f"the bundle from {source} is {size} bytes, over the limit of {max_bytes} "
            "(max_result_bytes)"
        )
    scratch = os.path.join(store.git_dir, "narrative", "tmp")
    os.makedirs(scratch, exist_ok=True)
    path = os.path.join(scratch, f"incoming-{secrets.token_hex(8)}.bundle")
    try:
        await _pull(call, bundle_id, size, path)
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256:
            raise NarrativeError(f"bundle from {source} arrived damaged (sha256 mismatch)")

        def take_in() -> ImportResult:
            with open(path, "rb") as f:
                return import_stream(
                    store,
                    f,
                    f"gateway:{source}",
                    source,
                    check_threads=check_threads,
                    max_bytes=max_bytes,
                    stage=stage,
                )

        try:
            return await run_blocking(take_in), size
        except PackTooLarge as exc:
            if max_bytes is None:
                raise
            raise ResultTooLarge(f"the bundle from {source}: {exc} (max_result_bytes)") from None
    finally:
        _unlink(path)
        with contextlib.suppress(Exception):  # best effort: it expires anyway
            await call("narrative", "dropBundle", {"bundleId": bundle_id})


async def _pull(call: Call, bundle_id: str, size: int, path: str) -> None:
    offsets = list(range(0, size, CHUNK))
    with open(path, "wb") as f:
        for start in range(0, len(offsets), _WINDOW):
            window = offsets[start : start + _WINDOW]
            parts = await asyncio.gather(
                *(
                    call("narrative", "readBundle", {"bundleId": bundle_id, "offset": o})
                    for o in window
                )
            )
            for offset, part in zip(window, parts, strict=True):
                try:
                    data = base64.b64decode(part["data"], validate=True)
                except (binascii.Error, KeyError, TypeError):
                    raise NarrativeError("a bundle chunk arrived malformed") from None
                expected = min(CHUNK, size - offset)
                if len(data) != expected:
                    raise NarrativeError(
                        f"a bundle chunk at {offset} has {len(data)} bytes, expected {expected}"
                    )
                f.write(data)


def have_commits(store: Store) -> list[str]:
    """Commits a store holds that a bundle sender may leave out: its thread heads."""
    return sorted({h.hex() for h in store.thread_heads().values()})
