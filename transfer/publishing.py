"""Publishing artifacts atomically: :func:`publish` streams an artifact and publishes it with its
sidecar (see :mod:`transfer.sidecar` for the protocol), :func:`write_small_atomic` and
:func:`compare_and_swap_small` write small documents (the latter only over the version the
caller read), and :func:`remove` unpublishes. How the data becomes visible depends on the
filesystem: local files are written to a hidden temporary file in the same directory, fsynced,
then ``os.replace``-d onto the final name, so a reader never sees a partial file under that
name; object stores (fsspec's async backends, e.g. s3fs, whose writers buffer and upload on
commit) are written under the final key, as S3 makes a PUT / CompleteMultipartUpload visible
atomically and a failed write is aborted so nothing appears; anything else (``memory://``,
unknown backends) is written to a hidden temporary key, then moved onto the final key. Library
code never prints; progress goes through an :class:`fsspec.callbacks.Callback` the caller passes
in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.callbacks import Callback

from narrative.errors import InvalidInput

from .errors import ArtifactNotFound, ChecksumMismatch
from .fsio import (
    BLOCK_SIZE,
    commits_on_close,
    file_exists,
    is_local,
    is_s3,
    precondition_failed,
    put_small,
    read_capped,
    redact,
    refresh,
    resolve,
    rm_if_exists,
    storage_fs,
    tmp_path,
    translate,
)
from .sidecar import (
    HEX64,
    SIDECAR_SUFFIX,
    check_artifact_path,
    read_sidecar,
    restore_sidecar,
    sidecar_text,
    unpublish,
)
from .storage_base import (
    PublishWriter,
    Sidecars,
    Stage,
    publish_local,
    publish_staged,
)
from .storage_lock import DEFAULT_LOCK_TIMEOUT, LOCK_SUFFIX, StorageLock

__all__ = [
    "PublishWriter",
    "compare_and_swap_small",
    "current_version",
    "publish",
    "remove",
    "write_small_atomic",
]

logger = logging.getLogger(__name__)


_MAX_PARTS = 9_000  # below S3's 10,000-part limit, with room to spare
_CAS_READ_LIMIT = 64 << 20


class _DirectStage(Stage):
    """Object-store writer on the final key: nothing is visible until ``close`` commits."""

    def __init__(self, fs: AbstractFileSystem, path: str, size: int | None) -> None:
        block = BLOCK_SIZE
        if size is not None:
            # S3 allows 10,000 parts: grow the part size for artifacts known to be huge.
            block = max(block, -(-size // _MAX_PARTS))
        self.file = fs.open(path, "wb", block_size=block)

    def commit(self) -> None:
        self.file.close()

    def abort(self) -> None:
        # ``close`` would commit what was written so far: discard (aborts a multipart upload)
        # and mark the file closed so neither close() nor the finaliser uploads anything.
        try:
            discard = getattr(self.file, "discard", None)
            if callable(discard):
                discard()
        finally:
            self.file.closed = True


class _CopyStage(Stage):
    """Hidden temporary key, then a move (for backends with neither rename nor commit)."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self.tmp = tmp_path(path)
        self.file = fs.open(self.tmp, "wb")

    def finish(self) -> None:
        self.file.close()

    def commit(self) -> None:
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        rm_if_exists(self.fs, self.tmp)


def _stage(fs: AbstractFileSystem, path: str, size: int | None) -> Stage:
    if commits_on_close(fs):
        return _DirectStage(fs, path, size)
    return _CopyStage(fs, path)


@contextlib.contextmanager
def publish(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    callback: Callback | None = None,
    size: int | None = None,
) -> Iterator[PublishWriter]:
    """Stream an artifact to ``url`` and publish it atomically with its sha256 sidecar.

    Bytes go straight to the backend as they are written (bounded memory, whatever the
    artifact's size). On a clean exit the data becomes visible under ``url`` in one step and
    ``url.sha256`` is written after it; see the module docstring for how each kind of
    filesystem does that. If the block raises, the partial data is removed (or the upload
    aborted), an artifact previously at ``url`` is left as it was, and the exception
    propagates.

    Example::

        with publish("s3://bucket/x.bundle", opts, callback=cb) as out:
            for chunk in chunks:
                out.write(chunk)
        print(out.sha256, out.size)

    Args:
        url: Where to publish (any fsspec URL; caching layers are written through).
        storage_options: Options for the filesystem.
        callback: fsspec progress callback: ``set_size(size)`` when ``size`` is given and
            ``relative_update(n)`` per write.
        size: The expected size in bytes, when known: reported to ``callback`` and used to
            pick an upload part size (8 MiB parts cap an unsized S3 upload at ~70 GiB).

    Yields:
        A :class:`PublishWriter`; after exit its ``sha256`` and ``size`` are final.

    Raises:
        InvalidInput: The URL names a directory or a reserved (sidecar/lock) name.
        StorageError: The backend failed; nothing was published.
    """
    fs, path = resolve(url, storage_options)
    fs = storage_fs(fs)
    check_artifact_path(path, url)
    if callback is not None and size is not None:
        callback.set_size(size)
    if is_local(fs):
        with publish_local(path, url, callback, size) as writer:
            yield writer
        return
    with translate(url, "opening for write", writing=True):
        stage = _stage(fs, path, size)
    sidecars = Sidecars(
        partial(unpublish, fs),
        lambda side, old: restore_sidecar(fs, side, old, url),
        partial(put_small, fs),
    )
    with publish_staged(stage, path, url, sidecars, callback, size) as writer:
        yield writer


def write_small_atomic(
    url: str, data: bytes, storage_options: dict[str, Any] | None = None
) -> None:
    """Publish a small document (an index, a manifest) atomically, with its sidecar.

    This is an unconditional overwrite; use :func:`compare_and_swap_small` where several
    writers may update the same document.

    Args:
        url: Where to write.
        data: The whole document.
        storage_options: Options for the filesystem.

    Raises:
        InvalidInput: ``data`` is not bytes, or the URL is unusable.
        StorageError: The backend failed; nothing was published.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"document data must be bytes, got {type(data).__name__}")
    with publish(url, storage_options) as out:
        out.write(data)


def remove(
    url: str, storage_options: dict[str, Any] | None = None, *, missing_ok: bool = False
) -> None:
    """Remove an artifact: its sidecar first (unpublishing it), then its data.

    Args:
        url: The artifact.
        storage_options: Options for the filesystem.
        missing_ok: Do not raise when there is nothing to remove.

    Raises:
        ArtifactNotFound: Neither data nor sidecar exists (unless ``missing_ok``).
        StorageError: The backend failed.
    """
    fs, path = resolve(url, storage_options)
    fs = storage_fs(fs)
    check_artifact_path(path, url)
    with translate(url, "removing"):
        refresh(fs, path)
        side = path + SIDECAR_SUFFIX
        # Ask first: an S3 DELETE of a missing key succeeds, so rm cannot tell us.
        had_sidecar = file_exists(fs, side)
        had_data = file_exists(fs, path)
        if had_sidecar:
            rm_if_exists(fs, side)
        if had_data:
            rm_if_exists(fs, path)
    if not (had_sidecar or had_data or missing_ok):
        raise ArtifactNotFound(redact(url))


def _check_digest(value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not HEX64.fullmatch(value)):
        raise InvalidInput(f"expected sha256 must be 64 hex digits or None, got {value!r}")


def compare_and_swap_small(
    url: str,
    expected_sha256: str | None,
    data: bytes,
    storage_options: dict[str, Any] | None = None,
    *,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> bool:
    """Replace a small published document only if it is still the version the caller read.

    Optimistic concurrency for a shared index: read it (``read_small``), compute the new
    version, then call this with the sha256 of what was read. Returns False, changing
    nothing, when the current document's sha256 differs (``None`` means "must not exist",
    i.e. not published). Retrying is up to the caller.

    Guarantees:

    * Every backend: the read-compare-write runs while holding a lock object
      ``<url>.lock``, so writers that all go through this function are serialised; within
      that, the data and its sidecar are published as :func:`publish` does.
    * Local files: the lock is created with ``O_CREAT | O_EXCL``, which is atomic on a local
      filesystem, so exactly one of any number of racing callers (threads or processes)
      wins. This holds on NFS only where exclusive create does.
    * S3: the lock is created with a conditional PUT (``If-None-Match: *``), and the
      document itself is written with ``If-Match: <ETag read under the lock>`` (or
      ``If-None-Match: *`` when it did not exist). The second condition is a true
      compare-and-swap on the data object: even if the lock were lost (broken as stale while
      its holder stalled), a write never replaces a version it did not compare against; the
      loser returns False. Both rely on the server honouring S3 conditional writes (AWS S3
      does since 2024; an S3-compatible server that ignores these headers gives no
      exclusion at all). Between the data PUT and the sidecar PUT a reader can briefly see
      the new data with the old sidecar; :func:`transfer.verified.read_small` retries through
      that, and a crash in that window leaves a ``ChecksumMismatch`` until the next
      unconditional write.
    * ``memory://``: exact within one process (a process-wide mutex guards the lock create).
    * Other backends: the lock create is a check-then-write, so two racing writers can both
      believe they hold it; treat the guarantee as best effort.
    * A lock older than :data:`transfer.storage_lock.STALE_LOCK_SECONDS` is taken to be left
      by a crashed writer and broken; on local files and ``memory://`` a holder stalled for
      longer than that can therefore lose its exclusion. S3's ``If-Match`` still protects the
      data there.
    * Unconditional writers (:func:`write_small_atomic`, :func:`publish`) ignore the lock:
      do not mix them with compare-and-swap on the same document.

    Args:
        url: The document.
        expected_sha256: The hex sha256 the current version must have, or None when the
            document must not exist yet.
        data: The new document.
        storage_options: Options for the filesystem.
        timeout: Seconds to wait for the lock.

    Returns:
        True if ``data`` was published, False if the current version did not match.

    Raises:
        InvalidInput: Bad ``expected_sha256``, ``data`` or URL.
        ChecksumMismatch: The current document does not match its own sidecar.
        InvalidArtifact: The current document is over 64 MiB or its sidecar is malformed.
        StorageLockTimeout: The lock stayed taken for ``timeout`` seconds.
        StorageError: The backend failed.
    """
    _check_digest(expected_sha256)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"document data must be bytes, got {type(data).__name__}")
    payload = bytes(data)
    fs, path = resolve(url, storage_options)
    fs = storage_fs(fs)
    check_artifact_path(path, url)
    expected = None if expected_sha256 is None else expected_sha256.lower()
    if is_local(fs):
        with translate(url, "preparing", writing=True):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with StorageLock(fs, path + LOCK_SUFFIX, url, timeout):
        with translate(url, "reading"):
            current, etag = current_version(fs, path, url)
        if current != expected:
            return False
        digest = hashlib.sha256(payload).hexdigest()
        side = path + SIDECAR_SUFFIX
        with translate(url, "writing", writing=True):
            if is_s3(fs):
                condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
                try:
                    fs.pipe_file(path, payload, **condition)
                except Exception as exc:
                    if precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                        logger.warning("lost a conditional write to %s", redact(url))
                        return False
                    raise
                put_small(fs, side, sidecar_text(digest, path))
            else:
                old_sidecar = unpublish(fs, side)
                try:
                    put_small(fs, path, payload)
                except BaseException:
                    if old_sidecar is not None:
                        restore_sidecar(fs, side, old_sidecar, url)
                    raise
                put_small(fs, side, sidecar_text(digest, path))
    return True


def current_version(fs: AbstractFileSystem, path: str, url: str) -> tuple[str | None, str | None]:
    """(sha256 of the published document or None, ETag of the data object or None)."""
    refresh(fs, path)
    recorded = read_sidecar(fs, path, url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None, None
    etag = info.get("ETag") if isinstance(info, Mapping) else None
    etag = etag if isinstance(etag, str) and etag else None
    if recorded is None:
        return None, etag  # leftover data of an unpublished write: free to overwrite
    data = read_capped(fs, path, _CAS_READ_LIMIT, url)
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise ChecksumMismatch(redact(url), recorded, actual)
    return actual, etag
