"""URLs and filesystems for the transfer package: every byte a bundle, archive or remote index
moves between machines goes through a filesystem resolved here.

Public functions of the storage modules take ``url: str, storage_options: dict | None`` and
resolve them with :func:`resolve` (:func:`fsspec.core.url_to_fs`), so plain paths, ``file://``,
``memory://``, ``s3://`` and chained URLs (``simplecache::s3://bucket/key``) all work. With a
chained URL, options for a layer can be nested under its protocol (fsspec's rule), e.g.
``{"s3": {"key": ..., "client_kwargs": {...}}, "cache_storage": "/tmp/c"}``; flat options that
a caching layer does not take are passed on to the storage below it, so ``--storage-option
key=...`` works the same with or without ``simplecache::``. This module also owns what kind of
filesystem a path lives on and the small-object primitives the other storage modules build on
(atomic small writes, existence checks that do not swallow errors, capped reads); it passes on
the fsspec-free ones of :mod:`transfer.storage_base` (:func:`translate`, the one place where
backend exceptions become the transfer error tree, and the progress stage a transfer
advances). The storage layer around it: :mod:`transfer.publishing`
(atomic publish, conditional replace, removal), :mod:`transfer.verified` (checksum-verified
reads and listings), :mod:`transfer.sidecar` (the ``.sha256`` sidecar that marks an artifact
published), :mod:`transfer.storage_lock` (lock objects) and :mod:`transfer.storage_options`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import fsspec
import fsspec.core
from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.local import LocalFileSystem

from narrative.errors import InvalidInput

from .errors import InvalidArtifact, StorageError
from .storage_base import (
    TMP_SUFFIX,
    StageProgress,
    describe,
    fsync_dir,
    local_write_atomic,
    redact,
    tmp_path,
    translate,
)
from .storage_options import merge_storage_options

__all__ = [
    "BLOCK_SIZE",
    "IO_CHUNK",
    "StageProgress",
    "TMP_SUFFIX",
    "commits_on_close",
    "file_exists",
    "fsync_dir",
    "is_local",
    "is_s3",
    "precondition_failed",
    "put_small",
    "read_capped",
    "redact",
    "refresh",
    "resolve",
    "rm_if_exists",
    "storage_fs",
    "tmp_path",
    "translate",
]


IO_CHUNK = 1 << 20
# Upload part / read-ahead size for object stores. s3fs defaults to 50 MiB, which would hold a
# 50 MiB artifact wholly in memory; 8 MiB keeps streaming bounded and is above S3's 5 MiB
# minimum part size.
BLOCK_SIZE = 8 << 20


def _error_codes(exc: BaseException) -> set[str]:
    """S3 error codes and HTTP statuses found on ``exc`` or its causes (botocore shape)."""
    codes: set[str] = set()
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        response = getattr(cur, "response", None)
        if isinstance(response, Mapping):
            err = response.get("Error")
            if isinstance(err, Mapping) and err.get("Code"):
                codes.add(str(err["Code"]))
            meta = response.get("ResponseMetadata")
            if isinstance(meta, Mapping) and meta.get("HTTPStatusCode"):
                codes.add(str(meta["HTTPStatusCode"]))
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return codes


def precondition_failed(exc: BaseException) -> bool:
    """Whether a conditional S3 write lost: 412 (condition false) or 409 (concurrent write)."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of a failed If-None-Match
        return True
    codes = _error_codes(exc)
    return bool(codes & {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def resolve(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """Turn a URL and its storage options into a filesystem and a path on it.

    Args:
        url: A plain path, ``file://``, ``memory://``, ``s3://`` or chained fsspec URL.
        storage_options: Options for the filesystem (see the module docstring for chains).

    Returns:
        The filesystem instance and the path in that filesystem's own namespace.

    Raises:
        InvalidInput: The URL is empty or names an unknown protocol.
        StorageError: The backend's driver is not installed or cannot be set up.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"storage URL must be a non-empty string, got {url!r}")
    if "\x00" in url:
        raise InvalidInput("storage URL contains a NUL byte")
    options = dict(storage_options or {})
    shown = redact(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise StorageError(
            shown, f"cannot open {shown}: {exc} (for s3:// install narrative-engine[s3])"
        ) from exc
    except ValueError as exc:
        raise InvalidInput(f"cannot use storage URL {shown}: {describe(exc)}") from exc
    except TypeError as exc:
        raise InvalidInput(f"bad storage options for {shown}: {describe(exc)}") from exc
    except OSError as exc:
        raise StorageError(shown, f"cannot open {shown}: {describe(exc)}") from exc
    rerouted = _route_to_target(fs, options)
    if rerouted is not None:
        return resolve(url, rerouted)
    return fs, str(path)


def _route_to_target(fs: AbstractFileSystem, options: dict[str, Any]) -> dict[str, Any] | None:
    """Options for a caching chain with flat storage options moved to the storage layer.

    fsspec hands top-level options to the outermost layer, where a cache silently ignores
    ``key``/``secret``/``client_kwargs``; credentials would then be dropped without a word.
    Options the cache layer does not take go to the layer below it instead (merged under
    explicit per-protocol ones). Returns None when nothing needs to move.
    """
    if not isinstance(fs, CachingFileSystem) or not options:
        return None
    own: set[str] = set()
    for cls in type(fs).__mro__:  # subclasses pass most options up as **kwargs
        init = vars(cls).get("__init__")
        if issubclass(cls, CachingFileSystem) and callable(init):
            params = inspect.signature(init).parameters.values()
            own |= {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    protocols = set(fsspec.available_protocols())
    stray = {k: v for k, v in options.items() if k not in own and k not in protocols}
    if not stray:
        return None
    target = _protocols(fs.fs)[0]
    routed = {k: v for k, v in options.items() if k not in stray}
    routed[target] = merge_storage_options(stray, options.get(target) or {})
    return routed


def storage_fs(fs: AbstractFileSystem) -> AbstractFileSystem:
    """The filesystem that actually stores the bytes, below any caching layers.

    Writes, locks and compare-and-swap must see the real, current objects: a ``simplecache``
    layer would serve a stale index and write through only on close.
    """
    while isinstance(fs, CachingFileSystem):
        fs = fs.fs
    return fs


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (atomic rename, ``O_EXCL``, fsync)."""
    return isinstance(fs, LocalFileSystem)


def is_s3(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` speaks S3 (conditional writes)."""
    return "s3" in _protocols(fs)


def commits_on_close(fs: AbstractFileSystem) -> bool:
    """Object stores whose writers upload on commit, so the final key is safe to write to."""
    return isinstance(fs, AsyncFileSystem)


def put_small(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object so that it appears complete or not at all."""
    if is_local(fs):
        local_write_atomic(path, data)
    elif commits_on_close(fs):
        fs.pipe_file(path, data)
    else:
        tmp = tmp_path(path)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def file_exists(fs: AbstractFileSystem, path: str) -> bool:
    """Whether a file is at ``path``; backend failures raise rather than read as absent.

    fsspec's own ``exists`` swallows every exception, so an unreachable endpoint or a
    permission error would look like "no such artifact".
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False
    return not (isinstance(info, Mapping) and info.get("type") == "directory")


def rm_if_exists(fs: AbstractFileSystem, path: str) -> bool:
    """Remove the file at ``path``; False when it was not there."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        return False
    return True


def refresh(fs: AbstractFileSystem, path: str) -> None:
    """Drop listing caches (s3fs keeps them per instance) so lookups see other writers."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def read_capped(fs: AbstractFileSystem, path: str, limit: int, url: str) -> bytes:
    """The whole object at ``path``, InvalidArtifact when over ``limit`` bytes."""
    with fs.open(path, "rb", block_size=BLOCK_SIZE) as f:
        size = getattr(f, "size", None)
        if isinstance(size, int) and size > limit:
            raise InvalidArtifact(
                f"{redact(url)} is {size} bytes, over the {limit}-byte limit", redact(url)
            )
        data = f.read(limit + 1)
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > limit:
        raise InvalidArtifact(f"{redact(url)} is over the {limit}-byte limit", redact(url))
    return data
