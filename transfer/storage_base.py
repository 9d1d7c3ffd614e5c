"""The storage layer's parts that need no fsspec: error translation, URL redaction, temporary
names, durable local writes, the sidecar's names, the publish stream and publishing to a local
file. A plain local path (no colon, no storage options) is published with these alone, so an
export to a local file never pays fsspec's import (about 80 ms, a third of a 5,000-file full
bundle export). Everything else is resolved by fsspec in :mod:`transfer.fsio` and published by
:mod:`transfer.publishing`, which delegates local files to :func:`publish_local` too: one
implementation of the local protocol, however the path was named.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import logging
import os
import posixpath
import queue
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from narrative import progress
from narrative.errors import InvalidInput, NarrativeError

from .errors import ArtifactNotFound, StorageError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "LOCK_SUFFIX",
    "SIDECAR_SUFFIX",
    "TMP_SUFFIX",
    "LocalStage",
    "Progress",
    "PublishWriter",
    "Sidecars",
    "Stage",
    "StageProgress",
    "abort_stage",
    "check_artifact_path",
    "describe",
    "fsync_dir",
    "local_write_atomic",
    "plain_local_path",
    "publish_local",
    "publish_staged",
    "redact",
    "sidecar_text",
    "tmp_path",
    "translate",
]

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
SIDECAR_SUFFIX = ".sha256"
"""Suffix of the checksum sidecar whose presence marks an artifact as published."""
LOCK_SUFFIX = ".lock"
"""Suffix of the lock objects of :mod:`transfer.storage_lock`."""

_USERINFO = re.compile(r"(?<=://)[^/@]*@")
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "requests")
_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument '([^']+)'")
#: botocore's and aiohttp's names for "nothing answers at that address"
_UNREACHABLE = re.compile(r"EndpointConnectionError|ConnectTimeout|ClientConnectorError")


def redact(url: str) -> str:
    """``url`` with any ``user:password@`` part hidden, for messages."""
    return _USERINFO.sub("***@", url)


def describe(exc: BaseException) -> str:
    """An exception's message for users, credentials in URLs hidden."""
    text = str(exc) or type(exc).__name__
    return _USERINFO.sub("***@", text)


def _is_backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a storage client library (botocore, aiohttp, ...)."""
    return any(cls.__module__.split(".", 1)[0] in _BACKEND_MODULES for cls in type(exc).__mro__)


@contextlib.contextmanager
def translate(url: str, action: str, *, writing: bool = False) -> Iterator[None]:
    """Translate backend exceptions raised inside the block into the transfer error tree.

    This is the single place where ``OSError`` and botocore/s3fs/aiohttp errors become
    :class:`~transfer.errors.StorageError` (or :class:`~transfer.errors.ArtifactNotFound` for a
    missing object when reading). Errors of our own tree pass through unchanged; anything else
    (programming errors) propagates as is.
    """
    try:
        yield
    except NarrativeError:
        raise
    except FileNotFoundError as exc:
        shown = redact(url)
        if writing:  # a missing bucket or parent, not a missing artifact
            raise StorageError(
                shown, f"{action} {shown} failed: no such bucket or directory"
            ) from exc
        raise ArtifactNotFound(shown) from exc
    except OSError as exc:
        shown = redact(url)
        raise StorageError(shown, f"{action} {shown} failed: {describe(exc)}") from exc
    except TypeError as exc:
        # backends take their options as **kwargs and may only use them at the first request:
        # an option they do not know is bad input, named, not a traceback
        option = _UNKNOWN_OPTION.search(str(exc))
        if option is None:
            raise
        raise InvalidInput(
            f"storage option {option.group(1)!r} is not accepted for {redact(url)} "
            f"({describe(exc)})"
        ) from exc
    except Exception as exc:
        if not _is_backend_error(exc):
            raise
        shown = redact(url)
        hint = ""
        if _UNREACHABLE.search(type(exc).__name__):
            hint = " (is the endpoint right? set it with client_kwargs.endpoint_url)"
        raise StorageError(shown, f"{action} {shown} failed: {describe(exc)}{hint}") from exc


def tmp_path(path: str) -> str:
    """A hidden, unique temporary name beside ``path`` (bookkeeping, never listed)."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def fsync_dir(path: str) -> None:
    """Make a rename in directory ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_write_atomic(path: str, data: bytes) -> None:
    """Write a small local file so that it appears complete or not at all, durably."""
    parent = os.path.dirname(path)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def check_artifact_path(path: str, url: str) -> None:
    """InvalidInput unless ``path`` names an artifact: not a directory, not a reserved name."""
    name = posixpath.basename(path.rstrip("/"))
    if not name or path.endswith("/"):
        raise InvalidInput(f"{redact(url)} names a directory, not an artifact")
    if name.endswith((SIDECAR_SUFFIX, LOCK_SUFFIX)):
        raise InvalidInput(
            f"{redact(url)}: names ending in {SIDECAR_SUFFIX} or {LOCK_SUFFIX} are reserved"
        )


def sidecar_text(digest: str, path: str) -> bytes:
    """The sidecar's content for ``digest``: ``sha256sum`` format."""
    return f"{digest}  {posixpath.basename(path)}\n".encode()


def plain_local_path(url: str, storage_options: dict[str, Any] | None) -> str | None:
    """The local file ``url`` names when it is a plain path given without storage options, as
    fsspec's ``url_to_fs`` would resolve it (``~`` expanded, relative to the working
    directory, trailing slashes dropped); None for anything else, which fsspec resolves.

    A URL without a colon has no protocol (``s3://``, ``file://``), no chain
    (``simplecache::``) and is no ``data:`` URL, so fsspec can only take it for a local path;
    the conservative rule leaves every URL with a colon to fsspec (the tests compare the two).
    """
    if storage_options or os.sep != "/" or not isinstance(url, str):
        return None
    if not url.strip() or ":" in url or "\x00" in url:
        return None  # fsspec's resolve() names what is wrong with an empty or odd URL
    if url.startswith("/"):
        path = url
    elif url.startswith("~"):
        path = os.path.expanduser(url)
    else:
        rel = url[2:] if url.startswith("./") else "" if url == "." else url
        path = f"{os.getcwd()}/{rel}"
    return path.rstrip("/") or "/"


class Progress(Protocol):
    """What a transfer reports its bytes to (fsspec's ``Callback`` is one)."""

    def relative_update(self, inc: int = 1) -> Any: ...


class StageProgress:
    """The default progress of a transfer: its bytes advance a :mod:`narrative.progress` stage
    (shown by the CLI on a terminal; free when nobody listens)."""

    def __init__(self, label: str, size: int | None) -> None:
        self._stage = progress.stage(label, size, "bytes")
        self._advance = self._stage.__enter__()
        self._open = True

    def relative_update(self, inc: int = 1) -> None:
        self._advance(inc)

    def finish(self) -> None:
        if self._open:
            self._open = False
            self._stage.__exit__(None, None, None)


class Stage(abc.ABC):
    """One in-flight write: where the bytes go, how they become visible, how to undo it."""

    file: Any

    def finish(self) -> None:  # noqa: B027 - a hook: stages with nothing to flush keep it
        """Flush and make durable everything written so far (before anything is visible)."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the data visible under the final name."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Throw the write away, leaving nothing behind."""


_WRITEBACK_STEP = 8 << 20
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
_ASYNC_MIN = 64 << 10
_QUEUED = 8


class _WritebackFile:
    """A local artifact being written. Writes of 64 KiB and more (and all after the first) go to
    the file on a thread of its own, so they overlap with the caller's hashing (the publish
    stream's sha256; 600 MiB spend about as long in ``write`` as in sha256 here); at most 8
    are queued. Every 8 MiB the kernel is asked to start writing what came before to disk
    (``POSIX_FADV_DONTNEED`` starts an asynchronous writeback on Linux), so the fsync before
    publishing waits for the last few MiB, not the whole artifact (262 vs 384 ms for 600 MiB
    here). Nothing is skipped: the fsync still covers every byte. A failed write is raised by
    the next ``write``, ``flush`` or ``close``. The publish stream's sha256 is taken on that
    thread too (:attr:`digest`, in write order), which takes it off the caller's."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._file = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()
        self._written = self._started = 0
        self._queue: queue.Queue[bytes | memoryview | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, data: ReadableBuffer) -> int:
        self._raise()
        view = memoryview(data)
        n = view.nbytes
        if self._queue is None and n < _ASYNC_MIN:
            self._write_now(view)
            return n
        if not (view.readonly and isinstance(view.obj, bytes)):
            view = memoryview(bytes(view))  # the caller may reuse its buffer once we return
        if self._queue is None:
            self._queue = queue.Queue(_QUEUED)
            self._thread = threading.Thread(target=self._drain, name="publish-writer", daemon=True)
            self._thread.start()
        self._queue.put(view)
        return n

    def _write_now(self, view: memoryview) -> None:
        self._file.write(view)
        self.digest.update(view)
        self._written += view.nbytes
        if _DONTNEED is not None and self._written - self._started >= _WRITEBACK_STEP:
            self._file.flush()
            with contextlib.suppress(OSError):  # only a hint: the fsync is what counts
                os.posix_fadvise(self._fd, self._started, self._written - self._started, _DONTNEED)
            self._started = self._written

    def _drain(self) -> None:
        assert self._queue is not None
        while (view := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write_now(memoryview(view))
                except BaseException as exc:  # raised on the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stop(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def flush(self) -> None:
        self._stop()  # the queue drained: later writes start a new thread
        self._raise()
        self._file.flush()

    def hexdigest(self) -> str:
        """The sha256 of everything written so far (queued writes are waited for)."""
        self._stop()
        return self.digest.hexdigest()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        try:
            self._stop()
        finally:
            self._file.close()
        self._raise()


class LocalStage(Stage):
    """Hidden temp file in the target directory, then ``os.replace`` (atomic on POSIX)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.parent = os.path.dirname(path)
        os.makedirs(self.parent, exist_ok=True)
        self.tmp = tmp_path(path)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self.file = _WritebackFile(fd)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        fsync_dir(self.parent)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def abort_stage(stage: Stage, url: str) -> None:
    """Abort a write, logging (never raising) a failure to clean up."""
    try:
        stage.abort()
    except Exception:  # never hide the error that made us abort
        logger.warning("could not clean up a failed write to %s", redact(url), exc_info=True)


class PublishWriter(io.BufferedIOBase):
    """The writable binary stream :func:`transfer.publishing.publish` yields.

    Hashes (sha256) and counts every byte on the way through. After the ``with`` block exits
    cleanly, :attr:`sha256` and :attr:`size` describe the published artifact. Closing the
    writer early (as some compressors do with their output) only stops further writes; the
    artifact is published when the ``publish`` block exits.
    """

    def __init__(self, raw: Any, url: str, callback: Progress | None) -> None:
        super().__init__()
        self._raw = raw
        self._url = url
        self._callback = callback
        # a local file hashes what it writes on its writer thread; other backends here
        self._hash = None if isinstance(raw, _WritebackFile) else hashlib.sha256()
        self._size = 0
        self.published = False

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far (the artifact's, once published)."""
        return self._raw.hexdigest() if self._hash is None else self._hash.hexdigest()

    @property
    def size(self) -> int:
        """Number of bytes written so far (the artifact's size, once published)."""
        return self._size

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        """Write ``data`` through to the backend, hashing it.

        Raises:
            ValueError: The writer is closed.
            StorageError: The backend failed.
        """
        if self.closed:
            raise ValueError("write to a closed publish stream")
        view = memoryview(data).cast("B")
        with translate(self._url, "writing", writing=True):
            self._raw.write(view)
        if self._hash is not None:
            self._hash.update(view)
        n = view.nbytes
        self._size += n
        if self._callback is not None:
            self._callback.relative_update(n)
        return n

    def flush(self) -> None:
        if self.closed:
            raise ValueError("flush of a closed publish stream")


def _unpublish_local(side: str) -> bytes | None:
    """Remove a local sidecar before its data is replaced; return its old content, if any."""
    try:
        with open(side, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(side)
    return old


@contextlib.contextmanager
def publish_local(
    path: str, url: str, callback: Progress | None = None, size: int | None = None
) -> Iterator[PublishWriter]:
    """:func:`transfer.publishing.publish` for a local file at ``path`` (named ``url`` in
    messages): the data goes to a hidden temporary file beside it, is fsynced and
    ``os.replace``-d onto ``path``, then the sidecar is written; a failure leaves the previous
    artifact (and its sidecar) as they were. ``size`` (when known) sizes the default progress
    stage, shown when no ``callback`` is given."""
    check_artifact_path(path, url)
    with translate(url, "opening for write", writing=True):
        stage = LocalStage(path)

    def restore(side: str, old: bytes) -> None:
        try:
            local_write_atomic(side, old)
        except Exception:
            logger.warning("could not restore the sidecar of %s", url, exc_info=True)

    sidecars = Sidecars(_unpublish_local, restore, local_write_atomic)
    with publish_staged(stage, path, url, sidecars, callback, size) as writer:
        yield writer


@dataclass(frozen=True)
class Sidecars:
    """How a backend takes an artifact's sidecar away (returning its old content, None when
    there was none), puts an old one back after a failure (never raising) and writes one."""

    unpublish: Callable[[str], bytes | None]
    restore: Callable[[str, bytes], None]
    write: Callable[[str, bytes], None]


@contextlib.contextmanager
def publish_staged(
    stage: Stage,
    path: str,
    url: str,
    sidecars: Sidecars,
    callback: Progress | None = None,
    size: int | None = None,
) -> Iterator[PublishWriter]:
    """Write an artifact through ``stage`` (opened for ``path``, named ``url`` in messages),
    then publish it: the sidecar is taken away, the stage committed, the new sidecar written;
    a failure anywhere leaves the previous artifact and its sidecar as they were."""
    shown = StageProgress("sending", size) if callback is None else None
    writer = PublishWriter(stage.file, url, callback or shown)
    try:
        yield writer
        with translate(url, "finishing", writing=True):
            stage.finish()
    except BaseException:
        abort_stage(stage, url)
        writer.close()
        raise
    finally:
        if shown is not None:
            shown.finish()
    writer.close()
    side = path + SIDECAR_SUFFIX
    with translate(url, "publishing", writing=True):
        old_sidecar = sidecars.unpublish(side)
        try:
            stage.commit()
        except BaseException:
            abort_stage(stage, url)
            if old_sidecar is not None:
                sidecars.restore(side, old_sidecar)
            raise
        sidecars.write(side, sidecar_text(writer.sha256, path))
    writer.published = True
    logger.debug("published %s (%d bytes, sha256 %s)", redact(url), writer.size, writer.sha256)
