"""Storage layer of the transfer package: every byte a bundle, archive or remote index moves
between machines goes through here.

Public functions take ``url: str, storage_options: dict | None`` and resolve them with
:func:`fsspec.core.url_to_fs`, so plain paths, ``file://``, ``memory://``, ``s3://`` and
chained URLs (``simplecache::s3://bucket/key``) all work. With a chained URL, options for a
layer can be nested under its protocol (fsspec's rule), e.g.
``{"s3": {"key": ..., "client_kwargs": {...}}, "cache_storage": "/tmp/c"}``; flat options that
a caching layer does not take are passed on to the storage below it, so ``--storage-option
key=...`` works the same with or without ``simplecache::``.

Publication protocol
--------------------
An artifact at ``URL`` is a data object plus a sidecar ``URL.sha256`` holding its sha256 in
``sha256sum`` format. **An artifact counts as published exactly when its sidecar exists**:

* the sidecar is written last, after the data is complete and visible under its final name;
* overwriting an artifact first removes the old sidecar, so no reader ever pairs new data with
  an old digest (it sees "not published" for that moment instead);
* :func:`remove` removes the sidecar first.

How the data becomes visible depends on the filesystem:

* local files: written to a hidden temporary file in the same directory, fsynced, then
  ``os.replace``-d onto the final name; a reader never sees a partial file under that name;
* object stores (fsspec's async backends, e.g. s3fs, whose writers buffer and upload on
  commit): written under the final key; S3 makes a PUT / CompleteMultipartUpload visible
  atomically, and a failed write is aborted so nothing appears;
* anything else (``memory://``, unknown backends): written to a hidden temporary key, then
  moved onto the final key.

Names ending in ``.sha256`` or ``.lock`` and hidden ``.<name>.<hex>.tmp`` files are this
module's bookkeeping; they are never listed as artifacts and cannot be published to.

Library code never prints; progress goes through an :class:`fsspec.callbacks.Callback` the
caller passes in.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import posixpath
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import fsspec
import fsspec.core
from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem
from fsspec.callbacks import Callback
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from narrative import progress
from narrative.errors import InvalidInput, NarrativeError
from narrative.jsonio import parse_json

from .errors import (
    ArtifactNotFound,
    ChecksumMismatch,
    InvalidArtifact,
    StorageError,
    StorageLockTimeout,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "LOCK_SUFFIX",
    "SIDECAR_SUFFIX",
    "STALE_LOCK_SECONDS",
    "PublishWriter",
    "VerifiedReader",
    "compare_and_swap_small",
    "exists",
    "flat_storage_options",
    "list_dir",
    "location_exists",
    "merge_storage_options",
    "open_verified",
    "parse_storage_options",
    "publish",
    "read_small",
    "remove",
    "resolve",
    "storage_options_from_env",
    "verify",
    "write_small_atomic",
]

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
"""Suffix of the checksum sidecar whose presence marks an artifact as published."""
LOCK_SUFFIX = ".lock"
"""Suffix of the lock object :func:`compare_and_swap_small` takes."""
DEFAULT_LOCK_TIMEOUT = 30.0
"""Seconds :func:`compare_and_swap_small` waits for its lock before giving up."""
STALE_LOCK_SECONDS = 60.0
"""A lock older than this is taken to be left over by a crashed writer and is broken."""

_TMP_SUFFIX = ".tmp"
_IO_CHUNK = 1 << 20
# Upload part / read-ahead size for object stores. s3fs defaults to 50 MiB, which would hold a
# 50 MiB artifact wholly in memory; 8 MiB keeps streaming bounded and is above S3's 5 MiB
# minimum part size.
_BLOCK_SIZE = 8 << 20
_MAX_PARTS = 9_000  # below S3's 10,000-part limit, with room to spare
_SIDECAR_LIMIT = 1024
_CAS_READ_LIMIT = 64 << 20
_SMALL_READ_ATTEMPTS = 4
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_USERINFO = re.compile(r"(?<=://)[^/@]*@")
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "requests")
# memory:// lives in this process only: a process-wide mutex makes its exclusive create exact.
_MEMORY_MUTEX = threading.Lock()


# --------------------------------------------------------------------------- errors


def _redact(url: str) -> str:
    """``url`` with any ``user:password@`` part hidden, for messages."""
    return _USERINFO.sub("***@", url)


_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument '([^']+)'")
#: botocore's and aiohttp's names for "nothing answers at that address"
_UNREACHABLE = re.compile(r"EndpointConnectionError|ConnectTimeout|ClientConnectorError")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _USERINFO.sub("***@", text)


def _is_backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a storage client library (botocore, aiohttp, ...)."""
    return any(cls.__module__.split(".", 1)[0] in _BACKEND_MODULES for cls in type(exc).__mro__)


@contextlib.contextmanager
def _translate(url: str, action: str, *, writing: bool = False) -> Iterator[None]:
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
        shown = _redact(url)
        if writing:  # a missing bucket or parent, not a missing artifact
            raise StorageError(
                shown, f"{action} {shown} failed: no such bucket or directory"
            ) from exc
        raise ArtifactNotFound(shown) from exc
    except OSError as exc:
        shown = _redact(url)
        raise StorageError(shown, f"{action} {shown} failed: {_describe(exc)}") from exc
    except TypeError as exc:
        # backends take their options as **kwargs and may only use them at the first request:
        # an option they do not know is bad input, named, not a traceback
        option = _UNKNOWN_OPTION.search(str(exc))
        if option is None:
            raise
        raise InvalidInput(
            f"storage option {option.group(1)!r} is not accepted for {_redact(url)} "
            f"({_describe(exc)})"
        ) from exc
    except Exception as exc:
        if not _is_backend_error(exc):
            raise
        shown = _redact(url)
        hint = ""
        if _UNREACHABLE.search(type(exc).__name__):
            hint = " (is the endpoint right? set it with client_kwargs.endpoint_url)"
        raise StorageError(shown, f"{action} {shown} failed: {_describe(exc)}{hint}") from exc


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


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a conditional S3 write lost: 412 (condition false) or 409 (concurrent write)."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of a failed If-None-Match
        return True
    codes = _error_codes(exc)
    return bool(codes & {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


# --------------------------------------------------------------------------- resolving


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
    shown = _redact(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise StorageError(
            shown, f"cannot open {shown}: {exc} (for s3:// install narrative-engine[s3])"
        ) from exc
    except ValueError as exc:
        raise InvalidInput(f"cannot use storage URL {shown}: {_describe(exc)}") from exc
    except TypeError as exc:
        raise InvalidInput(f"bad storage options for {shown}: {_describe(exc)}") from exc
    except OSError as exc:
        raise StorageError(shown, f"cannot open {shown}: {_describe(exc)}") from exc
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


def _storage_fs(fs: AbstractFileSystem) -> AbstractFileSystem:
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


def _is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_s3(fs: AbstractFileSystem) -> bool:
    return "s3" in _protocols(fs)


def _commits_on_close(fs: AbstractFileSystem) -> bool:
    """Object stores whose writers upload on commit, so the final key is safe to write to."""
    return isinstance(fs, AsyncFileSystem)


def _check_artifact_path(path: str, url: str) -> None:
    name = posixpath.basename(path.rstrip("/"))
    if not name or path.endswith("/"):
        raise InvalidInput(f"{_redact(url)} names a directory, not an artifact")
    if name.endswith((SIDECAR_SUFFIX, LOCK_SUFFIX)):
        raise InvalidInput(
            f"{_redact(url)}: names ending in {SIDECAR_SUFFIX} or {LOCK_SUFFIX} are reserved"
        )


def _tmp_path(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")


def _is_bookkeeping(name: str) -> bool:
    return (
        name.endswith((SIDECAR_SUFFIX, LOCK_SUFFIX))
        or (name.startswith(".") and name.endswith(_TMP_SUFFIX))
        or ".stale-" in name
    )


def _sidecar_text(digest: str, path: str) -> bytes:
    return f"{digest}  {posixpath.basename(path)}\n".encode()


# --------------------------------------------------------------------------- storage options


def _parse_value(text: str) -> Any:
    try:
        return parse_json(text)
    except ValueError:
        return text


def _assign(tree: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise InvalidInput(f"storage option {source}: {where!r} is already set to a value")
        node = child
    last = keys[-1]
    if isinstance(node.get(last), dict) and isinstance(value, dict):
        node[last] = merge_storage_options(node[last], value)
    else:
        node[last] = value


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (the CLI's ``--storage-option``) into storage options.

    Values are JSON when they parse as JSON (numbers, ``true``/``false``, ``null``, objects,
    quoted strings) and plain strings otherwise. Dots in the key nest:
    ``client_kwargs.endpoint_url=http://127.0.0.1:9000`` gives
    ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``. A later pair overrides
    an earlier one; JSON objects merge with keys set before them.

    Args:
        pairs: The ``KEY=VALUE`` strings, in command-line order.

    Returns:
        The nested options dict.

    Raises:
        InvalidInput: A pair has no ``=``, an empty or malformed key, or nests below a key
            that already holds a plain value.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if not isinstance(pair, str):
            raise InvalidInput(f"storage option must be a KEY=VALUE string, got {pair!r}")
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise InvalidInput(f"storage option {pair!r} is not KEY=VALUE")
        keys = key.split(".")
        if not all(_OPTION_KEY.fullmatch(k) for k in keys):
            raise InvalidInput(
                f"storage option {pair!r}: key {key!r} must be dot-separated names "
                "(letters, digits, '_' or '-')"
            )
        _assign(out, keys, _parse_value(raw), repr(pair))
    return out


def storage_options_from_env(
    prefix: str = "NARRATIVE_STORAGE_", *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Collect storage options from environment variables.

    ``NARRATIVE_STORAGE_KEY=abc`` gives ``{"key": "abc"}``; a double underscore nests, so
    ``NARRATIVE_STORAGE_CLIENT_KWARGS__ENDPOINT_URL=http://...`` gives
    ``{"client_kwargs": {"endpoint_url": "http://..."}}``. Keys are lowercased; values are
    parsed like :func:`parse_storage_options` values.

    Args:
        prefix: The variable-name prefix to collect.
        environ: The environment to read (default: ``os.environ``).

    Returns:
        The nested options dict (empty when no variable matches).

    Raises:
        InvalidInput: A variable has an empty or malformed key, or conflicts with another.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        keys = name[len(prefix) :].lower().split("__")
        if not all(_OPTION_KEY.fullmatch(k) for k in keys):
            raise InvalidInput(
                f"environment variable {name}: expected {prefix}KEY or {prefix}KEY__SUBKEY"
            )
        _assign(out, keys, _parse_value(env[name]), name)
    return out


def merge_storage_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two option dicts, ``override`` winning (e.g. env defaults, then CLI flags).

    Args:
        base: The lower-priority options.
        override: The higher-priority options.

    Returns:
        A new dict; nested dicts are merged key by key, anything else is replaced.
    """
    out: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = merge_storage_options(out[key], value)
        else:
            out[key] = value
    return out


#: option names that hold credentials (``key``/``secret``/``token`` of s3fs, botocore's
#: ``aws_secret_access_key``, passwords...): shown as ``***``, never printed
_SECRET_OPTION = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?)(_|$)", re.I)


def flat_storage_options(options: Mapping[str, Any], *, redact: bool = True) -> dict[str, str]:
    """Options as the dotted ``KEY=VALUE`` pairs ``--storage-option`` takes, with the values
    of credential options replaced by ``***`` (for listings and logs)."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            for sub, text in flat_storage_options(value, redact=redact).items():
                out[f"{key}.{sub}"] = text
        elif redact and _SECRET_OPTION.search(str(key)):
            out[str(key)] = "***"
        else:
            out[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return out


# --------------------------------------------------------------------------- small helpers


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_write_atomic(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    tmp = _tmp_path(path)
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
    _fsync_dir(parent)


def _put_small(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object so that it appears complete or not at all."""
    if _is_local(fs):
        _local_write_atomic(path, data)
    elif _commits_on_close(fs):
        fs.pipe_file(path, data)
    else:
        tmp = _tmp_path(path)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def _exists(fs: AbstractFileSystem, path: str) -> bool:
    """Whether a file is at ``path``; backend failures raise rather than read as absent.

    fsspec's own ``exists`` swallows every exception, so an unreachable endpoint or a
    permission error would look like "no such artifact".
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False
    return not (isinstance(info, Mapping) and info.get("type") == "directory")


def _rm_if_exists(fs: AbstractFileSystem, path: str) -> bool:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        return False
    return True


def _fresh(fs: AbstractFileSystem, path: str) -> None:
    """Drop listing caches (s3fs keeps them per instance) so lookups see other writers."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def _read_capped(fs: AbstractFileSystem, path: str, limit: int, url: str) -> bytes:
    with fs.open(path, "rb", block_size=_BLOCK_SIZE) as f:
        size = getattr(f, "size", None)
        if isinstance(size, int) and size > limit:
            raise InvalidArtifact(
                f"{_redact(url)} is {size} bytes, over the {limit}-byte limit", _redact(url)
            )
        data = f.read(limit + 1)
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > limit:
        raise InvalidArtifact(f"{_redact(url)} is over the {limit}-byte limit", _redact(url))
    return data


def _parse_sidecar(raw: bytes, url: str) -> str:
    shown = _redact(url) + SIDECAR_SUFFIX
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArtifact(f"checksum sidecar {shown} is not ASCII text", shown) from None
    fields = text.split()
    if not fields or not _HEX64.fullmatch(fields[0]):
        raise InvalidArtifact(f"checksum sidecar {shown} holds no sha256 digest", shown)
    return fields[0].lower()


def _read_sidecar(fs: AbstractFileSystem, path: str, url: str) -> str | None:
    """The digest recorded for ``path``, or None when it is not published."""
    try:
        raw = _read_capped(fs, path + SIDECAR_SUFFIX, _SIDECAR_LIMIT, url + SIDECAR_SUFFIX)
    except FileNotFoundError:
        return None
    return _parse_sidecar(raw, url)


def _not_published(url: str) -> ArtifactNotFound:
    shown = _redact(url)
    return ArtifactNotFound(
        shown,
        f"artifact {shown} is missing or unpublished (no {SIDECAR_SUFFIX} sidecar)",
    )


# --------------------------------------------------------------------------- publishing


class _Stage(abc.ABC):
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


class _LocalStage(_Stage):
    """Hidden temp file in the target directory, then ``os.replace`` (atomic on POSIX)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.parent = os.path.dirname(path)
        os.makedirs(self.parent, exist_ok=True)
        self.tmp = _tmp_path(path)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self.file = os.fdopen(fd, "wb")

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        _fsync_dir(self.parent)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class _DirectStage(_Stage):
    """Object-store writer on the final key: nothing is visible until ``close`` commits."""

    def __init__(self, fs: AbstractFileSystem, path: str, size: int | None) -> None:
        block = _BLOCK_SIZE
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


class _CopyStage(_Stage):
    """Hidden temporary key, then a move (for backends with neither rename nor commit)."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self.tmp = _tmp_path(path)
        self.file = fs.open(self.tmp, "wb")

    def finish(self) -> None:
        self.file.close()

    def commit(self) -> None:
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        _rm_if_exists(self.fs, self.tmp)


def _stage(fs: AbstractFileSystem, path: str, size: int | None) -> _Stage:
    if _is_local(fs):
        return _LocalStage(path)
    if _commits_on_close(fs):
        return _DirectStage(fs, path, size)
    return _CopyStage(fs, path)


class PublishWriter(io.BufferedIOBase):
    """The writable binary stream :func:`publish` yields.

    Hashes (sha256) and counts every byte on the way through. After the ``with`` block exits
    cleanly, :attr:`sha256` and :attr:`size` describe the published artifact. Closing the
    writer early (as some compressors do with their output) only stops further writes; the
    artifact is published when the ``publish`` block exits.
    """

    def __init__(self, raw: Any, url: str, callback: Callback | None) -> None:
        super().__init__()
        self._raw = raw
        self._url = url
        self._callback = callback
        self._hash = hashlib.sha256()
        self._size = 0
        self.published = False

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far (the artifact's, once published)."""
        return self._hash.hexdigest()

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
        with _translate(self._url, "writing", writing=True):
            self._raw.write(view)
        self._hash.update(view)
        n = view.nbytes
        self._size += n
        if self._callback is not None:
            self._callback.relative_update(n)
        return n

    def flush(self) -> None:
        if self.closed:
            raise ValueError("flush of a closed publish stream")


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
    fs = _storage_fs(fs)
    _check_artifact_path(path, url)
    with _translate(url, "opening for write", writing=True):
        stage = _stage(fs, path, size)
    shown = _StageProgress("sending", size) if callback is None else None
    writer = PublishWriter(stage.file, url, callback or shown)
    if callback is not None and size is not None:
        callback.set_size(size)
    try:
        yield writer
        with _translate(url, "finishing", writing=True):
            stage.finish()
    except BaseException:
        _abort(stage, url)
        writer.close()
        raise
    finally:
        if shown is not None:
            shown.finish()
    writer.close()
    side = path + SIDECAR_SUFFIX
    with _translate(url, "publishing", writing=True):
        old_sidecar = _unpublish(fs, side)
        try:
            stage.commit()
        except BaseException:
            _abort(stage, url)
            if old_sidecar is not None:
                _restore(fs, side, old_sidecar, url)
            raise
        _put_small(fs, side, _sidecar_text(writer.sha256, path))
    writer.published = True
    logger.debug("published %s (%d bytes, sha256 %s)", _redact(url), writer.size, writer.sha256)


def _abort(stage: _Stage, url: str) -> None:
    try:
        stage.abort()
    except Exception:  # never hide the error that made us abort
        logger.warning("could not clean up a failed write to %s", _redact(url), exc_info=True)


def _unpublish(fs: AbstractFileSystem, side: str) -> bytes | None:
    """Remove a sidecar before its data is replaced; return its old content, if any."""
    try:
        old = bytes(fs.cat_file(side))
    except FileNotFoundError:
        return None
    _rm_if_exists(fs, side)
    return old


def _restore(fs: AbstractFileSystem, side: str, content: bytes, url: str) -> None:
    try:
        _put_small(fs, side, content)
    except Exception:
        logger.warning("could not restore the sidecar of %s", _redact(url), exc_info=True)


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


# --------------------------------------------------------------------------- reading


class VerifiedReader(io.BufferedIOBase):
    """A streaming reader that checks the artifact against its sidecar at end of data.

    Not seekable: the digest is computed over the bytes in the order they are read. When a
    read reaches the end of the data (or the known size), the digest is compared with the
    sidecar and :class:`~transfer.errors.ChecksumMismatch` is raised on a difference.
    ``close()`` does the same check if everything was read but the end was never seen.
    Closing after a partial read does not verify anything.
    """

    def __init__(
        self,
        raw: Any,
        url: str,
        expected: str,
        size: int | None,
        callback: Callback | None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_close = on_close
        self._raw = raw
        self._url = url
        self._expected = expected
        self._size = size
        self._callback = callback
        self._hash = hashlib.sha256()
        self._pos = 0
        self._checked = False
        self._verified = False

    @property
    def sha256(self) -> str:
        """The digest the sidecar records."""
        return self._expected

    @property
    def size(self) -> int | None:
        """The object's size in bytes, when the backend reports it."""
        return self._size

    @property
    def verified(self) -> bool:
        """True once the whole content was read and matched the sidecar."""
        return self._verified

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all remaining when negative or None).

        Raises:
            ChecksumMismatch: This read reached the end and the content differs.
            StorageError: The backend failed.
        """
        if self.closed:
            raise ValueError("read of a closed file")
        whole = size is None or size < 0
        with _translate(self._url, "reading"):
            data = self._raw.read() if whole else self._raw.read(size)
        if not isinstance(data, bytes):
            data = bytes(data)
        self._hash.update(data)
        self._pos += len(data)
        if data and self._callback is not None:
            self._callback.relative_update(len(data))
        at_end = whole or (size != 0 and not data) or self._pos == self._size
        if at_end and not self._checked:
            self._check()
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size if size >= 0 else _IO_CHUNK)

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)

    def readinto1(self, buffer: WriteableBuffer) -> int:
        return self.readinto(buffer)

    def _check(self) -> None:
        self._checked = True  # report a mismatch once, not again on close
        actual = self._hash.hexdigest()
        if actual != self._expected:
            raise ChecksumMismatch(_redact(self._url), self._expected, actual)
        self._verified = True

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._checked and self._size is not None and self._pos == self._size:
                self._check()
        finally:
            try:
                with _translate(self._url, "closing"):
                    self._raw.close()
            finally:
                if self._on_close is not None:
                    self._on_close()
                super().close()


class _StageProgress(Callback):  # type: ignore[misc]
    """The default callback of a transfer: its bytes advance a :mod:`narrative.progress` stage
    (shown by the CLI on a terminal; free when nobody listens)."""

    def __init__(self, label: str, size: int | None) -> None:
        super().__init__()
        self._stage = progress.stage(label, size, "bytes")
        self._advance = self._stage.__enter__()
        self._open = True

    def relative_update(self, inc: int = 1) -> None:
        self._advance(inc)

    def finish(self) -> None:
        if self._open:
            self._open = False
            self._stage.__exit__(None, None, None)


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
    _check_artifact_path(path, url)
    with _translate(url, "opening"):
        _fresh(fs, path)
        expected = _read_sidecar(fs, path, url)
        if expected is None:
            raise _not_published(url)
        raw = fs.open(path, "rb", block_size=_BLOCK_SIZE)
    size = getattr(raw, "size", None)
    size = size if isinstance(size, int) else None
    if callback is not None and size is not None:
        callback.set_size(size)
    if callback is None:
        shown = _StageProgress("receiving", size)
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
        while f.read(_IO_CHUNK):
            pass
        if not f.verified:  # pragma: no cover - reaching EOF always checks
            raise ChecksumMismatch(_redact(url), f.sha256, "unverified")
        return f.sha256


def read_small(
    url: str, storage_options: dict[str, Any] | None = None, limit: int = 1 << 20
) -> bytes:
    """Read a small published document (manifest, index) whole, verified.

    A read that overlaps an overwrite can see the data and sidecar of different versions, or
    the moment with no sidecar; such reads are retried a few times (about 0.15 s in all)
    before giving up.

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
    _check_artifact_path(path, url)
    delay = 0.02
    for attempt in range(_SMALL_READ_ATTEMPTS):
        last = attempt == _SMALL_READ_ATTEMPTS - 1
        with _translate(url, "reading"):
            _fresh(fs, path)
            expected = _read_sidecar(fs, path, url)
            if expected is None:
                if last or not _exists(fs, path):
                    raise _not_published(url)
                time.sleep(delay)
                delay *= 2
                continue
            data = _read_capped(fs, path, limit, url)
        actual = hashlib.sha256(data).hexdigest()
        if actual == expected:
            return data
        if last:
            raise ChecksumMismatch(_redact(url), expected, actual)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- listing


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a published artifact is at ``url`` (its data and its sidecar both exist).

    Args:
        url: The artifact.
        storage_options: Options for the filesystem.

    Raises:
        StorageError: The backend failed.
    """
    fs, path = resolve(url, storage_options)
    with _translate(url, "checking"):
        _fresh(fs, path)
        return _exists(fs, path + SIDECAR_SUFFIX) and _exists(fs, path)


def location_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything is at ``url``: a directory, a file, or (object stores) a bucket or a
    prefix holding at least one object. Distinguishes an empty place from a wrong URL.

    Raises:
        StorageError: The backend failed (an unreachable endpoint is never "absent").
    """
    fs, path = resolve(url, storage_options)
    with _translate(url, "checking"):
        _fresh(fs, path)
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
    with _translate(url, "listing"):
        _fresh(fs, path)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
    files = {
        posixpath.basename(str(e["name"]).rstrip("/"))
        for e in entries
        if isinstance(e, Mapping) and e.get("type") == "file"
    }
    return sorted(n for n in files if not _is_bookkeeping(n) and n + SIDECAR_SUFFIX in files)


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
    fs = _storage_fs(fs)
    _check_artifact_path(path, url)
    with _translate(url, "removing"):
        _fresh(fs, path)
        side = path + SIDECAR_SUFFIX
        # Ask first: an S3 DELETE of a missing key succeeds, so rm cannot tell us.
        had_sidecar = _exists(fs, side)
        had_data = _exists(fs, path)
        if had_sidecar:
            _rm_if_exists(fs, side)
        if had_data:
            _rm_if_exists(fs, path)
    if not (had_sidecar or had_data or missing_ok):
        raise ArtifactNotFound(_redact(url))


# --------------------------------------------------------------------------- compare-and-swap


class _StorageLock:
    """A lock object ``<path>.lock`` taken by exclusive create, with stale-lock breaking.

    Local files use ``O_CREAT | O_EXCL``; S3 uses a conditional PUT (``If-None-Match: *``);
    ``memory://`` uses a process-wide mutex around its create. Other backends get a
    check-then-create that is not atomic (best effort). A lock older than
    :data:`STALE_LOCK_SECONDS` is taken to be left by a crashed writer and is broken.
    """

    def __init__(self, fs: AbstractFileSystem, path: str, url: str, timeout: float) -> None:
        self.fs = fs
        self.path = path
        self.url = url
        self.timeout = timeout
        self.token = uuid.uuid4().hex
        self.body = json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "created": time.time(),
            }
        ).encode()
        self._fd: int | None = None

    def __enter__(self) -> _StorageLock:
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            with _translate(self.url + LOCK_SUFFIX, "locking", writing=True):
                if self._try_create():
                    return self
                self._break_if_stale()
            if time.monotonic() > deadline:
                raise StorageLockTimeout(_redact(self.url), self.timeout)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.1)

    def __exit__(self, *exc: object) -> None:
        with _translate(self.url + LOCK_SUFFIX, "unlocking", writing=True):
            self._release()

    def _try_create(self) -> bool:
        fs = self.fs
        if _is_local(fs):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, self.body)
            finally:
                os.close(fd)
            return True
        if _is_s3(fs):
            try:
                fs.pipe_file(self.path, self.body, IfNoneMatch="*")
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise
                # A retried PUT may have succeeded the first time: the lock may be ours.
                return self._owner() == self.token
            return True
        if isinstance(fs, MemoryFileSystem):
            with _MEMORY_MUTEX:
                if _exists(fs, self.path):
                    return False
                fs.pipe_file(self.path, self.body)
            return True
        if _exists(fs, self.path):  # other backends: not atomic, see the class docstring
            return False
        fs.pipe_file(self.path, self.body)
        return self._owner() == self.token

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        try:
            body = parse_json(raw[:_SIDECAR_LIMIT])
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _owner(self) -> str | None:
        body = self._read()
        token = None if body is None else body.get("token")
        return token if isinstance(token, str) else None

    def _break_if_stale(self) -> None:
        if _is_local(self.fs):
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return
            if age > STALE_LOCK_SECONDS:
                # Rename first: only one breaker wins, and never a fresh lock taken meanwhile.
                stale = f"{self.path}.stale-{uuid.uuid4().hex}"
                try:
                    os.rename(self.path, stale)
                    os.unlink(stale)
                except FileNotFoundError:
                    return
                logger.warning("broke a stale lock %s (%.0fs old)", self.path, age)
            return
        body = self._read()
        created = None if body is None else body.get("created")
        if isinstance(created, (int, float)) and time.time() - created > STALE_LOCK_SECONDS:
            _rm_if_exists(self.fs, self.path)
            logger.warning("broke a stale lock %s", _redact(self.url) + LOCK_SUFFIX)

    def _release(self) -> None:
        if _is_local(self.fs):
            with contextlib.suppress(FileNotFoundError):
                with open(self.path, "rb") as f:
                    mine = self.token.encode() in f.read(_SIDECAR_LIMIT)
                if mine:
                    os.unlink(self.path)
                    return
            logger.warning("lock %s was broken while held", self.path)
            return
        if self._owner() == self.token:
            _rm_if_exists(self.fs, self.path)
        else:
            logger.warning("lock %s was broken while held", _redact(self.url) + LOCK_SUFFIX)


def _check_digest(value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not _HEX64.fullmatch(value)):
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
      the new data with the old sidecar; :func:`read_small` retries through that, and a
      crash in that window leaves a ``ChecksumMismatch`` until the next unconditional write.
    * ``memory://``: exact within one process (a process-wide mutex guards the lock create).
    * Other backends: the lock create is a check-then-write, so two racing writers can both
      believe they hold it; treat the guarantee as best effort.
    * A lock older than :data:`STALE_LOCK_SECONDS` is taken to be left by a crashed writer
      and broken; on local files and ``memory://`` a holder stalled for longer than that can
      therefore lose its exclusion. S3's ``If-Match`` still protects the data there.
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
    fs = _storage_fs(fs)
    _check_artifact_path(path, url)
    expected = None if expected_sha256 is None else expected_sha256.lower()
    if _is_local(fs):
        with _translate(url, "preparing", writing=True):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with _StorageLock(fs, path + LOCK_SUFFIX, url, timeout):
        with _translate(url, "reading"):
            current, etag = _current(fs, path, url)
        if current != expected:
            return False
        digest = hashlib.sha256(payload).hexdigest()
        side = path + SIDECAR_SUFFIX
        with _translate(url, "writing", writing=True):
            if _is_s3(fs):
                condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
                try:
                    fs.pipe_file(path, payload, **condition)
                except Exception as exc:
                    if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                        logger.warning("lost a conditional write to %s", _redact(url))
                        return False
                    raise
                _put_small(fs, side, _sidecar_text(digest, path))
            else:
                old_sidecar = _unpublish(fs, side)
                try:
                    _put_small(fs, path, payload)
                except BaseException:
                    if old_sidecar is not None:
                        _restore(fs, side, old_sidecar, url)
                    raise
                _put_small(fs, side, _sidecar_text(digest, path))
    return True


def _current(fs: AbstractFileSystem, path: str, url: str) -> tuple[str | None, str | None]:
    """(sha256 of the published document or None, ETag of the data object or None)."""
    _fresh(fs, path)
    recorded = _read_sidecar(fs, path, url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None, None
    etag = info.get("ETag") if isinstance(info, Mapping) else None
    etag = etag if isinstance(etag, str) and etag else None
    if recorded is None:
        return None, etag  # leftover data of an unpublished write: free to overwrite
    data = _read_capped(fs, path, _CAS_READ_LIMIT, url)
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise ChecksumMismatch(_redact(url), recorded, actual)
    return actual, etag
