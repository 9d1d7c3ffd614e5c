"""Reading published artifacts, always against their sidecar: :class:`VerifiedReader` (in
:mod:`transfer.verified_local`) streams and checks the digest at the end of the data,
:func:`open_verified`, :func:`verify` and
:func:`read_small` build on it, and :func:`exists`, :func:`location_exists` and
:func:`list_dir` tell what is published (unpublished data and bookkeeping names never count).
"""

from __future__ import annotations

import errno
import hashlib
import posixpath
import time
from collections.abc import Mapping
from typing import Any

from fsspec.asyn import AsyncFileSystem, sync
from fsspec.callbacks import Callback

from .errors import ChecksumMismatch
from .fsio import (
    BLOCK_SIZE,
    IO_CHUNK,
    StageProgress,
    file_exists,
    is_s3,
    read_capped,
    redact,
    refresh,
    resolve,
    translate,
)
from .sidecar import (
    SIDECAR_SUFFIX,
    check_artifact_path,
    is_bookkeeping,
    not_published,
    read_sidecar,
)
from .verified_local import VerifiedReader

__all__ = [
    "VerifiedReader",
    "exists",
    "list_dir",
    "location_exists",
    "open_verified",
    "read_small",
    "verify",
]


_SMALL_READ_WINDOW = 5.0
"""Seconds a small document is read again while writers keep replacing it under the reader
(each attempt after a pause doubling from 0.02 s up to 0.5 s): four pushers racing on a loaded
machine replaced an index more often than a 0.6 s window allowed."""
_UNPUBLISHED_ATTEMPTS = 6
"""Reads of a document whose sidecar is missing before it counts as unpublished (~0.6 s)."""


class _SingleGet:
    """An S3 object read front to back through one streamed GET (s3fs ``open_async``).

    The buffered S3 file issues a ranged GET per 8 MiB block; moto answers each in time
    proportional to the whole object, and any server pays a request per block. Reading a
    600 MiB bundle from moto: 8 MiB blocks 39.9 s, 32 MiB blocks 11.2 s, one GET 9.0 s. One
    response is also one version of the object (no mix across a replacement), and memory
    stays at what the caller asks for. ``read(n)`` returns ``n`` bytes unless the end came.
    """

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._file = sync(fs.loop, fs.open_async, path, "rb")
        sync(fs.loop, self._file.read, 0)  # sends the GET: the size is known from here on
        self.size: int | None = self._file.size

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return bytes(sync(self._fs.loop, self._file.read, -1))
        parts: list[bytes] = []
        wanted = size
        while wanted > 0:
            data = sync(self._fs.loop, self._file.read, wanted)
            if not data:
                break
            parts.append(data)
            wanted -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        body = getattr(self._file, "r", None)
        if body is not None:
            sync(self._fs.loop, _close_body, body)


async def _close_body(body: Any) -> None:
    body.close()  # on the filesystem's loop: releases the connection, read to the end or not


def open_verified(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    callback: Callback | None = None,
) -> VerifiedReader:
    """Open a published artifact for a streaming, checksum-verified read.

    Use it as a context manager: ``with open_verified(url, opts) as f: ...``. The sidecar is
    read first; the data is hashed as it is read and compared at the end (see
    :class:`VerifiedReader`). With a caching URL (``simplecache::...``) the data and sidecar
    both come through the cache.

    Args:
        url: The artifact.
        storage_options: Options for the filesystem.
        callback: fsspec progress callback: ``set_size`` with the object's size (when known),
            ``relative_update(n)`` per read.

    Returns:
        A :class:`VerifiedReader`.

    Raises:
        ArtifactNotFound: No data, or no sidecar (missing or unpublished artifact).
        InvalidArtifact: The sidecar is malformed.
        StorageError: The backend failed.
    """
    fs, path = resolve(url, storage_options)
    check_artifact_path(path, url)
    with translate(url, "opening"):
        refresh(fs, path)
        expected = read_sidecar(fs, path, url)
        if expected is None:
            raise not_published(url)
        if isinstance(fs, AsyncFileSystem) and is_s3(fs):
            raw: Any = _SingleGet(fs, path)
        else:
            raw = fs.open(path, "rb", block_size=BLOCK_SIZE)
    size = getattr(raw, "size", None)
    size = size if isinstance(size, int) else None
    if callback is not None and size is not None:
        callback.set_size(size)
    if callback is None:
        shown = StageProgress("receiving", size)
        return VerifiedReader(raw, url, expected, size, shown, on_close=shown.finish)
    return VerifiedReader(raw, url, expected, size, callback)


def verify(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    callback: Callback | None = None,
) -> str:
    """Stream a whole published artifact and check it against its sidecar.

    Args:
        url: The artifact.
        storage_options: Options for the filesystem.
        callback: fsspec progress callback.

    Returns:
        The artifact's hex sha256.

    Raises:
        ArtifactNotFound: Missing or unpublished.
        ChecksumMismatch: The content does not match the sidecar.
        InvalidArtifact: The sidecar is malformed.
        StorageError: The backend failed.
    """
    with open_verified(url, storage_options, callback=callback) as f:
        while f.read(IO_CHUNK):
            pass
        if not f.verified:  # pragma: no cover - reaching EOF always checks
            raise ChecksumMismatch(redact(url), f.sha256, "unverified")
        return f.sha256


def read_small(
    url: str, storage_options: dict[str, Any] | None = None, limit: int = 1 << 20
) -> bytes:
    """Read a small published document (manifest, index) whole, verified.

    A read that overlaps an overwrite can see the data and sidecar of different versions, the
    moment with no sidecar, or (where the backend checks) an object replaced since it was
    opened; such reads are retried for up to about 5 s (a missing sidecar: about 0.6 s) before
    giving up.

    Args:
        url: The document.
        storage_options: Options for the filesystem.
        limit: The largest size accepted, in bytes.

    Returns:
        The document's bytes.

    Raises:
        ArtifactNotFound: Missing or unpublished.
        InvalidArtifact: Larger than ``limit``, or the sidecar is malformed.
        ChecksumMismatch: The content does not match the sidecar.
        StorageError: The backend failed.
    """
    fs, path = resolve(url, storage_options)
    check_artifact_path(path, url)
    delay = 0.02
    deadline = time.monotonic() + _SMALL_READ_WINDOW
    waited = 0
    while True:
        last = time.monotonic() + delay > deadline
        with translate(url, "reading"):
            refresh(fs, path)
            try:
                expected = read_sidecar(fs, path, url)
                data = read_capped(fs, path, limit, url) if expected is not None else b""
            except OSError as exc:
                # the document or its sidecar replaced since it was opened (s3fs checks the
                # ETag on each read): read both again
                if exc.errno != errno.EBUSY or last:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            if expected is None:  # half published, or never: wait only briefly for it
                waited += 1
                if last or waited >= _UNPUBLISHED_ATTEMPTS or not file_exists(fs, path):
                    raise not_published(url)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
        actual = hashlib.sha256(data).hexdigest()
        if actual == expected:
            return data
        if last:
            raise ChecksumMismatch(redact(url), expected, actual)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a published artifact is at ``url`` (its data and its sidecar both exist).

    Args:
        url: The artifact.
        storage_options: Options for the filesystem.

    Raises:
        StorageError: The backend failed.
    """
    fs, path = resolve(url, storage_options)
    with translate(url, "checking"):
        refresh(fs, path)
        return file_exists(fs, path + SIDECAR_SUFFIX) and file_exists(fs, path)


def location_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything is at ``url``: a directory, a file, or (object stores) a bucket or a
    prefix holding at least one object. Distinguishes an empty place from a wrong URL.

    Raises:
        StorageError: The backend failed (an unreachable endpoint is never "absent").
    """
    fs, path = resolve(url, storage_options)
    with translate(url, "checking"):
        refresh(fs, path)
        try:
            fs.info(path.rstrip("/") or path)
        except FileNotFoundError:
            return False
        return True


def list_dir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the published artifacts directly inside the directory (or prefix) ``url``.

    Sidecars, locks, temporary files, subdirectories and unpublished data are left out. A
    missing directory lists as empty (object stores have no directories to be missing).

    Args:
        url: The directory or prefix.
        storage_options: Options for the filesystem.

    Returns:
        Sorted base names.

    Raises:
        StorageError: The backend failed.
    """
    fs, path = resolve(url, storage_options)
    with translate(url, "listing"):
        refresh(fs, path)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
    files = {
        posixpath.basename(str(e["name"]).rstrip("/"))
        for e in entries
        if isinstance(e, Mapping) and e.get("type") == "file"
    }
    return sorted(n for n in files if not is_bookkeeping(n) and n + SIDECAR_SUFFIX in files)
