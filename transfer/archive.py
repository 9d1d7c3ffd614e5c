"""Archives of one snapshot (``tar.gz`` / ``tar.zst``): a streaming writer and a verified reader.

Layout of an archive (a POSIX pax tar stream, compressed)::

    narrative.json          the manifest (always the first member): snapshot, records, tree id
                            and one entry per file {path, mode, size, sha256, blob}
    files/<path>            every file of the snapshot, in tree order: regular members (mode
                            0644/0755) and symlink members (linkname = target); no directories

The compressed stream has two parts back to back — two gzip members, or two zstd frames, which
every gzip/zstd reader (and ``tar -xzf`` / ``tar --zstd -xf``) decompresses as one: the
manifest's member first, then the file members and the end of the archive. That lets the writer
compress the files before it knows the manifest: by default it makes one pass over the blobs,
hashing them while their members are compressed into an unnamed temporary file, then writes the
manifest part and copies that file (every blob is inflated once, which is what keeps the export
near ``tar | zstd``). ``spool=False`` makes two passes instead (hash, then compress straight into
the output) and produces the same bytes. Output is deterministic: fixed mtime (the snapshot's
time), uid/gid 0, no owner names, gzip headers without name or time, and compressed data that
depends only on the content and the level.

Memory stays flat whatever the file sizes: blobs are read straight from their pack in chunks.
gzip is compressed in independent 512 KiB pieces on a few threads (pigz style: each piece primed
with the 32 KiB before it, joined by sync flushes into one deflate stream), and pieces whose
samples do not compress are stored; zstd uses libzstd's own worker threads.

The reader trusts nothing: the compression is sniffed from magic bytes, the manifest is
validated before any data is touched, every member must be listed, typed and sized as the
manifest says, and its content must hash to both the manifest's sha256 and git blob id. Hard
links, devices, fifos, directories, sparse members, paths outside ``files/`` and symlinks whose
target is absolute or resolves outside the tree (following the archive's other symlinks) are
refused: git itself would store such links, but the archive is hostile input and a restore
would materialise them. Decompressed bytes are counted against limits derived from the
manifest, so a decompression bomb stops early. Objects go into one pack that is published only
once the whole archive, including the rebuilt root tree, has been verified; any failure aborts
it and leaves the store exactly as it was. Nothing else is written to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import re
import struct
import tarfile
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

import zstandard

from narrative.errors import InvalidInput, NarrativeError, StoreCorrupted
from narrative.fsck import NAME_MAX, PATH_MAX, object_problems
from narrative.ids import is_id
from narrative.jsonio import parse_json
from narrative.models import AgentRun, Objective, Snapshot, Thread
from narrative.objects import (
    MODE_DIR,
    MODE_EXEC,
    MODE_FILE,
    MODE_LINK,
    TreeEntry,
    encode_tree,
    hash_object,
    object_header,
)
from narrative.odb import ObjectStore, PackWriter, deflate, parse_entry_header
from narrative.paths import path_problem
from narrative.store import Store
from narrative.trees import flatten_tree

from .errors import IncompleteExport, InvalidArtifact
from .packin import DEFAULT_MAX_EXPANDED

__all__ = [
    "ARCHIVE_FORMATS",
    "MANIFEST_NAME",
    "ArchiveError",
    "ArchiveImport",
    "ArchiveManifest",
    "ArchiveStats",
    "read_archive",
    "write_archive",
]

ARCHIVE_FORMATS = ("tar.gz", "tar.zst")
MANIFEST_NAME = "narrative.json"
MANIFEST_VERSION = 1
FILES_PREFIX = "files/"
DEFAULT_LEVELS = {"tar.gz": 1, "tar.zst": 3}

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MODES = {"100644": MODE_FILE, "100755": MODE_EXEC, "120000": MODE_LINK}
_MODE_NAMES = {v: k for k, v in _MODES.items()}
_FILE_KEYS = frozenset({"path", "mode", "size", "sha256", "blob"})
_TOP_KEYS = frozenset({"version", "snapshot", "objective", "thread", "run", "tree", "files"})
_SNAPSHOT_KEYS = frozenset(f.name for f in dataclasses.fields(Snapshot))
_HEX_RE = re.compile("[0-9a-f]*")

_CHUNK = 1 << 20
_BATCH = 128 << 10
_GZIP_PIECE = 512 << 10
_GZIP_WINDOW = 32 << 10
_STREAM_THRESHOLD = 8 << 20  # members above this are spooled, never held whole
_TAR_BUFSIZE = 64 << 10  # tarfile's read-ahead: the slack every read limit allows
_MAX_TRAILING = 1 << 20  # zero padding tolerated after the end-of-archive blocks
_MAX_LINK_HOPS = 40
_MAX_GZIP_WORKERS = 4
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE

logger = logging.getLogger(__name__)


class ArchiveError(InvalidArtifact):
    """An archive is malformed, corrupted, truncated, over a limit or hostile.

    Part of the transfer error tree (``TransferError`` → ``InvalidArtifact``, also a
    ``ValueError``); the message names the member or field at fault.
    """


@dataclass(frozen=True)
class ArchiveStats:
    """What :func:`write_archive` wrote.

    Attributes:
        files: Members below ``files/`` (regular files and symlinks).
        bytes_in: Content bytes of those files (symlink targets included).
        bytes_out: Compressed bytes written to the output.
    """

    files: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class ArchiveManifest:
    """The content of ``narrative.json`` (version 1).

    Attributes:
        version: Format version, always 1.
        snapshot: ``Snapshot.to_dict()`` of the archived snapshot.
        objective: The objective record, or None.
        thread: The thread record, or None.
        run: The run record when the snapshot belongs to a run, else None.
        tree: Hex id of the snapshot's root tree.
        files: One entry per non-directory tree entry, in tree order: ``{"path", "mode"
            ("100644" | "100755" | "120000"), "size", "sha256", "blob"}``.
    """

    version: int
    snapshot: dict[str, Any]
    objective: dict[str, Any] | None
    thread: dict[str, Any] | None
    run: dict[str, Any] | None
    tree: str
    files: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the manifest."""
        return {
            "version": self.version,
            "snapshot": self.snapshot,
            "objective": self.objective,
            "thread": self.thread,
            "run": self.run,
            "tree": self.tree,
            "files": self.files,
        }

    def encode(self) -> bytes:
        """Canonical bytes of ``narrative.json`` (sorted keys, ASCII, compact)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> ArchiveManifest:
        """Validate a decoded manifest strictly; ArchiveError names the first problem."""
        tree, snapshot, objective, thread, run = _check_header(data)
        files = data["files"]
        if not isinstance(files, list):
            raise ArchiveError("archive manifest 'files' is not a list")
        checked = [_check_file_entry(entry) for entry in files]
        _check_layout([entry["path"] for entry in checked])
        return cls(MANIFEST_VERSION, snapshot, objective, thread, run, tree, checked)


@dataclass(frozen=True)
class ArchiveImport:
    """What :func:`read_archive` took in.

    Attributes:
        manifest: The validated manifest.
        tree: Binary id of the root tree, verified equal to ``manifest.tree`` and now stored.
        objects: Objects newly written to the store (the rest were already there).
    """

    manifest: ArchiveManifest
    tree: bytes
    objects: int = 0


# ----------------------------------------------------------------------------- validation


def _check_header(
    data: Any,
) -> tuple[
    str, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None
]:
    """Everything in a manifest but the file list: (tree, snapshot, objective, thread, run)."""
    if not isinstance(data, dict):
        raise ArchiveError("archive manifest is not a JSON object")
    _exact_keys(data, _TOP_KEYS, "archive manifest")
    version = data["version"]
    if type(version) is not int or version != MANIFEST_VERSION:
        raise ArchiveError(f"unsupported archive manifest version {version!r}")
    tree = data["tree"]
    if not _is_hex(tree, 40):
        raise ArchiveError(f"archive manifest has an invalid tree id {tree!r}")
    snapshot = _check_snapshot(data["snapshot"], tree)
    objective, thread, run = _check_records(
        snapshot, data["objective"], data["thread"], data["run"]
    )
    return tree, snapshot, objective, thread, run


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and _HEX_RE.fullmatch(value) is not None


def _exact_keys(data: dict[str, Any], expected: frozenset[str], what: str) -> None:
    if data.keys() == expected:
        return
    if not all(isinstance(k, str) for k in data):
        raise ArchiveError(f"{what} has a non-string key")
    missing = sorted(expected - data.keys())
    if missing:
        raise ArchiveError(f"{what} lacks {missing[0]!r}")
    extra = sorted(data.keys() - expected)
    if extra:
        raise ArchiveError(f"{what} has an unknown field {extra[0]!r}")


def _check_snapshot(value: Any, tree: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArchiveError("archive manifest 'snapshot' is not an object")
    _exact_keys(value, _SNAPSHOT_KEYS, "archive manifest snapshot")

    def bad(key: str) -> ArchiveError:
        return ArchiveError(f"archive manifest snapshot has an invalid {key!r}: {value[key]!r}")

    ids = {"id": "snapshot", "thread": "thread", "run": "run", "parent": "snapshot"}
    for key, kind in ids.items():
        item = value[key]
        if item is None and key in ("run", "parent"):
            continue
        if not isinstance(item, str) or not is_id(item, kind):
            raise bad(key)
    for key in ("commit", "parent_commit"):
        if not (value[key] is None and key == "parent_commit") and not _is_hex(value[key], 40):
            raise bad(key)
    if value["tree"] != tree:
        raise ArchiveError(
            f"archive manifest snapshot tree {value['tree']!r} differs from its tree {tree!r}"
        )
    for key in ("message", "created_at"):
        if not isinstance(value[key], str):
            raise bad(key)
    try:  # checked here, before any object is written, not when the commit is rebuilt
        dt.datetime.strptime(value["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise bad("created_at") from None
    stats = value["stats"]
    if not isinstance(stats, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in stats.items()
    ):
        raise bad("stats")
    skipped = value["skipped"]
    if not isinstance(skipped, list) or not all(isinstance(s, dict) for s in skipped):
        raise bad("skipped")
    return value


def _check_records(
    snapshot: dict[str, Any], objective: Any, thread: Any, run: Any
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    parsers: dict[str, Any] = {
        "objective": Objective.from_dict,
        "thread": Thread.from_dict,
        "run": AgentRun.from_dict,
    }
    parsed: dict[str, Any] = {}
    for name, value in (("objective", objective), ("thread", thread), ("run", run)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ArchiveError(f"archive manifest {name!r} is not an object")
        try:
            parsed[name] = parsers[name](value)
        except (NarrativeError, KeyError, TypeError, ValueError) as exc:
            raise ArchiveError(f"archive manifest has an invalid {name} record: {exc}") from None
    if "thread" in parsed and parsed["thread"].id != snapshot["thread"]:
        raise ArchiveError("archive manifest thread record is not the snapshot's thread")
    if "run" in parsed and parsed["run"].id != snapshot["run"]:
        raise ArchiveError("archive manifest run record is not the snapshot's run")
    if (
        "objective" in parsed
        and "thread" in parsed
        and parsed["thread"].objective_id != parsed["objective"].id
    ):
        raise ArchiveError("archive manifest objective record is not the thread's objective")
    return objective, thread, run


def _path_bytes(path: str) -> bytes:
    """Paths are str; names that are not UTF-8 travel as surrogate escapes, like os.fsdecode."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ArchiveError(f"archive path {path!r} is not encodable") from None


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise ArchiveError(f"archive manifest has an invalid path {path!r}")
    if path.startswith("/"):
        raise ArchiveError(f"archive path {path!r} is absolute")
    if "\x00" in path:
        raise ArchiveError(f"archive path {path!r} contains a NUL byte")
    encoded = _path_bytes(path)
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise ArchiveError(
            f"archive path {path[:80]!r}... is longer than file systems allow "
            f"({NAME_MAX} bytes a name, {PATH_MAX} a path)"
        )
    if ".." in path.split("/"):
        raise ArchiveError(f"archive path {path!r} escapes the tree")
    problem = path_problem(path)  # the one path rule: .git look-alikes, .narrative, ...
    if problem is not None:
        raise ArchiveError(f"archive path {path!r} is refused: {problem}")
    return path


def _check_file_entry(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ArchiveError("archive manifest has a file entry that is not an object")
    _exact_keys(entry, _FILE_KEYS, "archive manifest file entry")
    path = _check_path(entry["path"])
    if entry["mode"] not in _MODES:
        raise ArchiveError(f"archive file {path!r} has an invalid mode {entry['mode']!r}")
    size = entry["size"]
    if type(size) is not int or size < 0:
        raise ArchiveError(f"archive file {path!r} has an invalid size {size!r}")
    if entry["mode"] == "120000" and size == 0:
        raise ArchiveError(f"archive symlink {path!r} has an empty target")
    if entry["mode"] == "120000" and size > PATH_MAX:
        # also bounds the tar header bytes allowed per member (see _header_allowance)
        raise ArchiveError(
            f"archive symlink {path!r} has a {size}-byte target, longer than file systems "
            f"allow ({PATH_MAX})"
        )
    if not _is_hex(entry["sha256"], 64):
        raise ArchiveError(f"archive file {path!r} has an invalid sha256 {entry['sha256']!r}")
    if not _is_hex(entry["blob"], 40):
        raise ArchiveError(f"archive file {path!r} has an invalid blob id {entry['blob']!r}")
    return entry


def _check_layout(paths: list[str]) -> None:
    """No duplicates, and no path that is both a file and a directory of another."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise ArchiveError(f"archive manifest lists {path!r} twice")
        seen.add(path)
    for path in paths:
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in seen:
                raise ArchiveError(f"archive path {parent!r} is both a file and a directory")


def _link_escapes(path: str, target: str, links: Mapping[str, str]) -> bool:
    """Whether the symlink at ``path`` resolves outside the tree: absolute, or ``..`` past the
    root, following the tree's other symlinks as the kernel would."""
    if target.startswith("/") or "\x00" in target:
        return True
    stack = path.split("/")[:-1]
    pending = deque(target.split("/"))
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(part)
        inner = links.get("/".join(stack))
        if inner is not None:
            hops += 1
            if hops > _MAX_LINK_HOPS:
                return False  # a loop: resolving fails (ELOOP), so it reaches nothing
            if inner.startswith("/") or "\x00" in inner:
                return True
            stack.pop()
            pending.extendleft(reversed(inner.split("/")))
    return False


def _check_links(links: Mapping[str, str]) -> None:
    for path, target in links.items():
        if _link_escapes(path, target, links):
            raise ArchiveError(
                f"symlink {path} -> {target} points outside the tree "
                "(archives refuse absolute and escaping symlinks)"
            )


# ----------------------------------------------------------------------------- reading blobs


def _inflate(read: Any, size: int, oid: bytes) -> Iterator[bytes]:
    """Chunks of a zlib stream (``read(n)`` gives compressed bytes), never more than
    :data:`_CHUNK` decompressed at a time, checked to total ``size``."""
    dec = zlib.decompressobj()
    produced = 0
    # Deflate grows data by at most 5 bytes per 16 KiB block plus a few header bytes: never
    # read (much) past the end of the object, small blobs would otherwise cost a 1 MiB read.
    left = size + 5 * (size // 16000 + 1) + 64
    while not dec.eof:
        if dec.unconsumed_tail:
            data = dec.decompress(dec.unconsumed_tail, _CHUNK)
        else:
            want = min(_CHUNK, left) if left > 0 else _CHUNK
            raw = read(want)
            left -= len(raw)
            if not raw:
                raise StoreCorrupted(f"object {oid.hex()} is truncated")
            data = dec.decompress(raw, _CHUNK)
        produced += len(data)
        if produced > size:
            raise StoreCorrupted(f"object {oid.hex()} is longer than its header says")
        if data:
            yield data
    if produced != size:
        raise StoreCorrupted(f"object {oid.hex()} is shorter than its header says")


class _PackFiles:
    """Read-only descriptors of the packs blobs are read from, opened once per export and
    shared by threads (positional reads). Our own descriptors: gc may unlink a pack under us,
    and ObjectStore.invalidate() closes the store's."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def __enter__(self) -> _PackFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class _BlobSource:
    """A blob of the store read in chunks: from its pack, as a loose object, or (deltas,
    objects only libgit2 can read) whole."""

    def __init__(self, odb: ObjectStore, oid: bytes, packs: _PackFiles) -> None:
        self.oid = oid
        self._packs = packs
        self._pack: tuple[int, int] | None = None
        self._loose: str | None = None
        self._data: bytes | None = None
        self.size = self._locate(odb)

    def _locate(self, odb: ObjectStore) -> int:
        for attempt in range(2):
            # Private access on purpose: narrative.odb has no chunked reader yet.
            for idx in list(odb._pack_indexes().values()):
                i = idx.find(self.oid)
                if i is None:
                    continue
                start = idx.offset(i)
                try:
                    fd = self._packs.fd(idx.pack_path)
                except FileNotFoundError:
                    break  # repacked away since the index was read: look again
                code, size, hlen = parse_entry_header(os.pread(fd, 32, start))
                if code == 3:
                    self._pack = (fd, start + hlen)
                    return size
                if code in (6, 7):
                    return self._whole(odb)
                raise StoreCorrupted(f"object {self.oid.hex()} is not a blob")
            else:
                loose = odb._loose_path(self.oid)
                if os.path.exists(loose):
                    self._loose = loose
                    return self._loose_size(loose)
                return self._whole(odb)
            if attempt == 0:
                odb.invalidate()
        return self._whole(odb)

    def _whole(self, odb: ObjectStore) -> int:
        kind, data = odb.read(self.oid)
        if kind != "blob":
            raise StoreCorrupted(f"object {self.oid.hex()} is not a blob")
        self._data = data
        return len(data)

    def _loose_size(self, path: str) -> int:
        dec = zlib.decompressobj()
        head = b""
        with open(path, "rb") as f:
            while b"\x00" not in head and len(head) < 64:
                raw = f.read(64)
                if not raw:
                    break
                head += dec.decompress(raw, 64 - len(head))
        kind, _, size = head.partition(b"\x00")[0].partition(b" ")
        if kind != b"blob" or not size.isdigit():
            raise StoreCorrupted(f"object {self.oid.hex()} is not a blob")
        return int(size)

    def chunks(self) -> Iterator[bytes]:
        """The blob's content, in chunks of at most 1 MiB."""
        if self._data is not None:
            view = memoryview(self._data)
            for pos in range(0, len(view), _CHUNK):
                yield bytes(view[pos : pos + _CHUNK])
            return
        if self._pack is not None:
            fd, pos = self._pack

            def read(n: int) -> bytes:
                nonlocal pos
                data = os.pread(fd, n, pos)
                pos += len(data)
                return data

            yield from _inflate(read, self.size, self.oid)
            return
        assert self._loose is not None
        header = object_header("blob", self.size)
        skip = len(header)
        with open(self._loose, "rb") as f:
            for raw in _inflate(f.read, skip + self.size, self.oid):
                cut = min(skip, len(raw))
                skip -= cut
                if cut < len(raw):
                    yield raw[cut:]


# ----------------------------------------------------------------------------- writing


class _CountingWriter:
    """Counts the compressed bytes going to the caller's stream."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass  # the caller owns the stream and decides when to flush it


def _incompressible(piece: bytes) -> bool:
    """Whether samples of ``piece`` do not deflate (then it is stored, at memcpy speed)."""
    if len(piece) < 64 << 10:
        return False
    sample = 4096
    for start in (0, len(piece) // 2, len(piece) - sample):
        if len(zlib.compress(piece[start : start + sample], 1)) < sample * 0.94:
            return False
    return True


def _deflate_piece(piece: bytes, window: bytes, level: int) -> tuple[bytes, bytes]:
    """Raw deflate of one piece, primed with the preceding window, ending on a sync flush so
    pieces concatenate into one valid stream (never final: the writer ends the stream)."""
    if level > 0 and _incompressible(piece):
        level = 0
    if level > 0 and window:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, window)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8)
    return comp.compress(piece), comp.flush(zlib.Z_SYNC_FLUSH)


class _GzipSink:
    """A gzip member compressed in parallel pieces; output depends only on data and level."""

    def __init__(self, out: _CountingWriter, level: int, workers: int) -> None:
        workers = min(workers, _MAX_GZIP_WORKERS)
        self._out = out
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="archive-gz")
        self._pending: deque[Future[tuple[bytes, bytes]]] = deque()
        # pieces in flight (each holds its input and output): bounds memory at a few MiB
        self._max_pending = workers + 1
        self._buf = bytearray()
        self._window = b""
        self._crc = 0
        self._size = 0
        # magic, deflate, no flags, mtime 0, no extra flags, OS unknown: no name, no time
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _GZIP_PIECE:
            view = memoryview(self._buf)
            pos = 0
            while len(self._buf) - pos >= _GZIP_PIECE:
                self._submit(bytes(view[pos : pos + _GZIP_PIECE]))
                pos += _GZIP_PIECE
            view.release()
            del self._buf[:pos]

    def _submit(self, piece: bytes) -> None:
        self._crc = zlib.crc32(piece, self._crc)
        self._size += len(piece)
        window, self._window = self._window, piece[-_GZIP_WINDOW:]
        self._pending.append(self._pool.submit(_deflate_piece, piece, window, self._level))
        while len(self._pending) > self._max_pending:
            self._write_next()

    def _write_next(self) -> None:
        for part in self._pending.popleft().result():
            self._out.write(part)

    def close(self) -> None:
        if self._buf:
            self._submit(bytes(self._buf))
            self._buf.clear()
        while self._pending:
            self._write_next()
        self._pool.shutdown()
        self._out.write(zlib.compressobj(self._level, zlib.DEFLATED, -15).flush())
        self._out.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown()


class _ZstdSink:
    """One zstd frame with a content checksum, compressed by libzstd's worker threads."""

    def __init__(self, out: _CountingWriter, level: int, workers: int) -> None:
        cctx = zstandard.ZstdCompressor(level=level, threads=workers, write_checksum=True)
        self._writer: Any = cctx.stream_writer(
            cast("IO[bytes]", out), closefd=False, write_return_read=True
        )

    def write(self, data: bytes | memoryview) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


_USTAR_LIMIT = 8**11  # largest size/mtime a plain ustar number field holds
# name, mode, uid+gid, size+mtime, checksum, type, linkname, magic ("s" pads with NULs)
_USTAR_HEAD = struct.Struct("100s8s16s24s8s1s100s8s")
_USTAR_IDS = b"0000000\x000000000\x00"
_USTAR_TAIL = b"\x00" * (_BLOCK - _USTAR_HEAD.size)


def _tar_header(
    name: str, mode: int, size: int, mtime: int, kind: bytes = tarfile.REGTYPE, linkname: str = ""
) -> bytes:
    """A pax-format tar header, byte for byte what ``TarInfo.tobuf(PAX_FORMAT)`` gives (uid/gid
    0, no owner names). Plain ASCII names that fit are encoded directly: tarfile takes about
    0.1 ms per member, which adds seconds to workspaces of tens of thousands of files."""
    if (
        len(name) <= 100
        and len(linkname) <= 100
        and name.isascii()
        and linkname.isascii()
        and size < _USTAR_LIMIT
        and 0 <= mtime < _USTAR_LIMIT
    ):
        head = _USTAR_HEAD.pack(
            name.encode(),
            b"%07o\x00" % (mode & 0o7777),
            _USTAR_IDS,
            b"%011o\x00%011o\x00" % (size, mtime),
            b"        ",  # the checksum is computed with its own field as spaces
            kind,
            linkname.encode(),
            tarfile.POSIX_MAGIC,
        )
        return head[:148] + b"%06o\x00" % sum(head) + head[155:] + _USTAR_TAIL
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = mode
    info.type = kind
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _mtime(created_at: str) -> int:
    try:
        stamp = dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return max(0, int(stamp.timestamp()))


def _records(records: dict[str, Any] | None) -> dict[str, Any]:
    records = dict(records or {})
    unknown = sorted(set(records) - {"objective", "thread", "run"})
    if unknown:
        raise InvalidInput(f"unknown archive record {unknown[0]!r}")
    return {key: records.get(key) for key in ("objective", "thread", "run")}


def _default_workers() -> int:
    return max(2, min(os.cpu_count() or 2, 8))


def write_archive(
    store: Store,
    snapshot: Snapshot,
    out: BinaryIO,
    fmt: str,
    *,
    records: dict[str, Any] | None = None,
    level: int | None = None,
    spool: bool = True,
) -> ArchiveStats:
    """Write an archive of ``snapshot`` into ``out``.

    The output is two compressed parts back to back (two gzip members, or two zstd frames),
    which every gzip/zstd reader decompresses as one stream: the manifest's tar member, then
    the file members and the end of the archive. Both strategies below produce the same bytes.

    Args:
        store: The store holding the snapshot's objects.
        snapshot: The snapshot to archive.
        out: A binary stream; only ``write`` is used (it need not seek), and it is not closed.
        fmt: ``"tar.gz"`` or ``"tar.zst"``.
        records: ``{"objective": ..., "thread": ..., "run": ...}`` records (dicts or None),
            already looked up by the caller; stored in the manifest.
        level: Compression level (gzip 0-9, default 1; zstd 1-22, default 3).
        spool: True (default): one pass over the blobs, hashing while the file members are
            compressed into an unnamed temporary file in the store's tmp directory (as large
            as the compressed archive), then the manifest and that file are written out. Every
            blob is inflated once, and nothing reaches ``out`` unless the export succeeds.
            False: two passes, hashing first, then compressing straight into ``out`` — no
            temporary file, and a slow ``out`` (an upload) overlaps the compression, at the
            cost of inflating every blob twice.

    Returns:
        Files archived, their content bytes and the compressed bytes written.

    Raises:
        InvalidInput: Unknown format, level out of range, or malformed ``records``.
        ArchiveError: The snapshot holds an entry an archive cannot carry: a symlink that is
            absolute or points outside the tree (the reader would refuse it), or a submodule.
    """
    if fmt not in ARCHIVE_FORMATS:
        raise InvalidInput(f"unknown archive format {fmt!r} (use {' or '.join(ARCHIVE_FORMATS)})")
    level = DEFAULT_LEVELS[fmt] if level is None else level
    low, high = (0, 9) if fmt == "tar.gz" else (1, 22)
    if type(level) is not int or not low <= level <= high:
        raise InvalidInput(f"{fmt} compression level must be {low}..{high}, not {level!r}")
    recs = _records(records)
    workers = _default_workers()
    counting = _CountingWriter(out)
    writer = _MemberWriter(fmt, level, workers, _mtime(snapshot.created_at))

    def make_manifest(files: list[dict[str, Any]], links: dict[str, str]) -> ArchiveManifest:
        _check_links(links)
        manifest = ArchiveManifest(
            MANIFEST_VERSION,
            snapshot.to_dict(),
            recs["objective"],
            recs["thread"],
            recs["run"],
            snapshot.tree,
            files,
        )
        # Entries come from flatten_tree, which already refuses unsafe names: check the rest,
        # as JSON would carry it, so every archive written here is one the reader accepts.
        header = manifest.to_dict() | {"files": []}
        try:
            _check_header(parse_json(json.dumps(header)))
        except ArchiveError as exc:
            raise InvalidInput(f"cannot archive snapshot {snapshot.id}: {exc}") from None
        # Connectivity check before anything is published: the files as hashed while being
        # archived must rebuild exactly the snapshot's tree.
        built = manifest_tree(files, lambda data: hash_object("tree", data)).hex()
        if built != snapshot.tree:
            raise IncompleteExport(
                f"archive of snapshot {snapshot.id} would build tree {built}, not {snapshot.tree}"
            )
        return manifest

    with store.lock("gc", shared=True), writer, _PackFiles() as packs:
        flat = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
        if spool:
            os.makedirs(store.odb.tmp_dir, exist_ok=True)
            # unnamed (O_TMPFILE where available): nothing is left behind, even by kill -9
            with tempfile.TemporaryFile(dir=store.odb.tmp_dir, prefix="archive-") as tmp:
                files, links = writer.members(store.odb, packs, flat, _CountingWriter(tmp), None)
                manifest = make_manifest(files, links)
                writer.finish(manifest)
                writer.write_manifest(counting, manifest)
                tmp.seek(0)
                while chunk := tmp.read(_CHUNK):
                    counting.write(chunk)
        else:
            files, links = _hash_pass(store.odb, packs, flat, workers)
            manifest = make_manifest(files, links)
            writer.write_manifest(counting, manifest)
            writer.members(store.odb, packs, flat, counting, manifest.files)
            writer.finish(manifest)
    bytes_in = sum(entry["size"] for entry in files)
    logger.debug("archived %s: %d files, %d content bytes", snapshot.id, len(files), bytes_in)
    return ArchiveStats(len(files), bytes_in, counting.count)


def _hash_one(
    odb: ObjectStore, packs: _PackFiles, path: str, mode: int, oid: bytes
) -> tuple[dict[str, Any], str]:
    """A manifest entry (sha256 streamed chunk by chunk) and, for symlinks, the target."""
    if mode not in _MODE_NAMES:
        raise ArchiveError(f"snapshot entry {path} has mode {mode:o}, which archives cannot hold")
    source = _BlobSource(odb, oid, packs)
    digest = hashlib.sha256()
    target = ""
    if mode == MODE_LINK:
        data = b"".join(source.chunks())
        digest.update(data)
        target = os.fsdecode(data)
    else:
        for chunk in source.chunks():
            digest.update(chunk)
    entry = {
        "path": path,
        "mode": _MODE_NAMES[mode],
        "size": source.size,
        "sha256": digest.hexdigest(),
        "blob": oid.hex(),
    }
    return entry, target


def _hash_pass(
    odb: ObjectStore, packs: _PackFiles, flat: dict[str, tuple[int, bytes]], workers: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Manifest entries and symlink targets, in tree order.

    Inflating and hashing release the GIL, so batches of blobs are hashed on ``workers``
    threads; each holds one chunk at a time."""
    items = list(flat.items())
    results: list[tuple[dict[str, Any], str] | None] = [None] * len(items)

    def run(batch: range) -> None:
        for i in batch:
            path, (mode, oid) = items[i]
            results[i] = _hash_one(odb, packs, path, mode, oid)

    if workers < 2 or len(items) < 2:
        run(range(len(items)))
    else:
        # interleaved batches: neighbours in tree order tend to have similar sizes
        step = workers * 8
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="archive-hash") as pool:
            list(pool.map(run, [range(k, len(items), step) for k in range(step)]))
    files: list[dict[str, Any]] = []
    links: dict[str, str] = {}
    for result in results:
        assert result is not None
        entry, target = result
        files.append(entry)
        if entry["mode"] == "120000":
            links[entry["path"]] = target
    return files, links


class _MemberWriter:
    """Builds the tar stream in its two compressed parts: the manifest part, and the members
    part (files, end-of-archive blocks, zero padding to a whole tar record)."""

    def __init__(self, fmt: str, level: int, workers: int, mtime: int) -> None:
        self.fmt = fmt
        self.level = level
        self.workers = workers
        self.mtime = mtime
        self._sink: _GzipSink | _ZstdSink | None = None
        self._offset = 0
        self._batch = bytearray()

    def __enter__(self) -> _MemberWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the member part's compressor if an error left it open."""
        if self._sink is not None and exc[0] is not None:
            self._sink.abort()
        self._sink = None

    def _open(self, target: _CountingWriter) -> _GzipSink | _ZstdSink:
        if self.fmt == "tar.gz":
            return _GzipSink(target, self.level, self.workers)
        return _ZstdSink(target, self.level, self.workers)

    def _manifest_part(self, manifest: ArchiveManifest) -> bytes:
        document = manifest.encode()
        header = _tar_header(MANIFEST_NAME, 0o644, len(document), self.mtime)
        return header + document + _padding(len(document))

    def write_manifest(self, target: _CountingWriter, manifest: ArchiveManifest) -> None:
        sink = self._open(target)
        try:
            sink.write(self._manifest_part(manifest))
        except BaseException:
            sink.abort()
            raise
        sink.close()

    def members(
        self,
        odb: ObjectStore,
        packs: _PackFiles,
        flat: dict[str, tuple[int, bytes]],
        target: _CountingWriter,
        known: list[dict[str, Any]] | None,
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Write every file member into a new compressed part (left open for :meth:`finish`).

        With ``known`` entries (two-pass mode) sizes are checked against them; without, each
        file's sha256 is computed as it streams by. Returns the entries and symlink targets."""
        sink = self._sink = self._open(target)
        files: list[dict[str, Any]] = []
        links: dict[str, str] = {}
        try:
            for i, (path, (mode, oid)) in enumerate(flat.items()):
                if mode not in _MODE_NAMES:
                    raise ArchiveError(
                        f"snapshot entry {path} has mode {mode:o}, which archives cannot hold"
                    )
                source = _BlobSource(odb, oid, packs)
                digest = hashlib.sha256() if known is None else None
                name = FILES_PREFIX + path
                if mode == MODE_LINK:
                    data = b"".join(source.chunks())
                    links[path] = os.fsdecode(data)
                    if digest is not None:
                        digest.update(data)
                    link = _tar_header(name, 0o777, 0, self.mtime, tarfile.SYMTYPE, links[path])
                    self._emit(link)
                else:
                    size = source.size if known is None else known[i]["size"]
                    file_mode = 0o755 if mode == MODE_EXEC else 0o644
                    self._emit(_tar_header(name, file_mode, size, self.mtime))
                    written = 0
                    for chunk in source.chunks():
                        written += len(chunk)
                        if digest is not None:
                            digest.update(chunk)
                        self._emit(chunk)
                    if written != size:
                        raise StoreCorrupted(f"blob {oid.hex()} changed size while archived")
                    self._emit(_padding(size))
                if known is None:
                    assert digest is not None
                    files.append(
                        {
                            "path": path,
                            "mode": _MODE_NAMES[mode],
                            "size": source.size,
                            "sha256": digest.hexdigest(),
                            "blob": oid.hex(),
                        }
                    )
        except BaseException:
            sink.abort()
            raise
        return (files if known is None else known), links

    def _emit(self, data: bytes) -> None:
        """Queue bytes of the member part; small pieces (headers, small files) are batched
        into one compressor call."""
        self._offset += len(data)
        if len(data) >= _BATCH:
            self._flush()
            assert self._sink is not None
            self._sink.write(data)
            return
        self._batch += data
        if len(self._batch) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            assert self._sink is not None
            self._sink.write(bytes(self._batch))
            self._batch.clear()

    def finish(self, manifest: ArchiveManifest) -> None:
        """End the archive: two zero blocks, then zeros up to a whole record (as tar does)."""
        sink = self._sink
        assert sink is not None
        try:
            end = len(self._manifest_part(manifest)) + self._offset + 2 * _BLOCK
            self._emit(b"\x00" * (2 * _BLOCK + (-end) % _RECORD))
            self._flush()
        except BaseException:
            sink.abort()
            raise
        sink.close()


def _padding(size: int) -> bytes:
    return b"\x00" * (-size % _BLOCK)


# ----------------------------------------------------------------------------- reading


class _LimitExceeded(Exception):
    """The decompressed stream went past what the manifest allows."""


class _Prefixed:
    """A stream with the magic bytes already read put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0 or n >= len(self._head):
                head, self._head = self._head, b""
                rest = self._stream.read(-1 if n is None or n < 0 else n - len(head))
                return head + rest
            head, self._head = self._head[:n], self._head[n:]
            return head
        return self._stream.read(n)


class _ZstdFrames:
    """Follows the zstd frame layout of the raw input (headers only), so a stream cut short
    is told from a complete one: libzstd's streaming reader ends silently on truncation."""

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._after = "magic"
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._goto(self._after)
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += data[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._step(field)

    def _goto(self, state: str) -> None:
        self._state = state
        self._need = {"magic": 4, "skipsize": 4, "fhd": 1, "block": 3}[state]

    def _then(self, skip: int, state: str) -> None:
        if skip:
            self._skip, self._after = skip, state
        else:
            self._goto(state)

    def _step(self, field: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(field, "little")
            if field == _ZSTD_MAGIC:
                self._goto("fhd")
            elif 0x184D2A50 <= magic <= 0x184D2A5F:
                self._goto("skipsize")
            else:
                raise ArchiveError("archive is corrupt: bad zstd frame magic")
        elif self._state == "skipsize":
            self._then(int.from_bytes(field, "little"), "magic")
        elif self._state == "fhd":
            fhd = field[0]
            if fhd & 0x08:
                raise ArchiveError("archive is corrupt: bad zstd frame header")
            single = (fhd >> 5) & 1
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            self._then((0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs, "block")
        else:
            header = int.from_bytes(field, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise ArchiveError("archive is corrupt: bad zstd block")
            content = 1 if kind == 1 else size
            if last:
                self.frames += 1
                self._then(content + (4 if self._checksum else 0), "magic")
            else:
                self._then(content, "block")

    def finish(self) -> None:
        if self._state != "magic" or self._buf or self._skip or not self.frames:
            raise ArchiveError("archive is truncated (zstd stream ends inside a frame)")


class _ZstdTee:
    def __init__(self, raw: _Prefixed, frames: _ZstdFrames) -> None:
        self._raw = raw
        self._frames = frames

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._frames.feed(data)
        return data


class _Limited:
    """Counts decompressed bytes and refuses to deliver more than the current limit."""

    def __init__(self, source: Any, hard_limit: int) -> None:
        self._source = source
        self.count = 0
        self.hard_limit = hard_limit
        self.limit = hard_limit

    def allow(self, extra: int) -> None:
        """Let at most ``extra`` more bytes through (never past the hard limit)."""
        self.limit = min(self.count + extra, self.hard_limit)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK
        room = self.limit - self.count
        if room <= 0:
            if self._source.read(1):
                raise _LimitExceeded
            return b""
        data: bytes = self._source.read(min(n, room))
        self.count += len(data)
        return data


def _read_exact(stream: Any, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """Why a member type is refused, or None for regular files and symlinks."""
    if info.islnk():
        return "is a hard link"
    if info.ischr() or info.isblk():
        return "is a device file"
    if info.isfifo():
        return "is a fifo"
    if info.isdir():
        return "is a directory"
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.SYMTYPE) or info.sparse:
        return "has an unsupported member type"
    return None


def _check_member_name(name: str) -> str:
    """The manifest path a member name stands for, or ArchiveError."""
    if name.startswith("/"):
        raise ArchiveError(f"archive member {name} has an absolute name")
    if ".." in name.split("/"):
        raise ArchiveError(f"archive member {name} escapes the tree")
    if not name.startswith(FILES_PREFIX):
        raise ArchiveError(f"archive member {name} is outside {FILES_PREFIX}")
    return name[len(FILES_PREFIX) :]


class _Dir(dict[str, Any]):
    """A directory while trees are rebuilt (values: manifest entries or _Dir)."""


def manifest_tree(files: Iterable[dict[str, Any]], store_tree: Callable[[bytes], bytes]) -> bytes:
    """The root tree id that manifest file entries build. ``store_tree`` receives each encoded
    tree, deepest first, and returns its id (hash it, or write it to a pack). Iterative: a
    hostile manifest's deep paths cannot exhaust the interpreter's stack."""
    root = _Dir()
    for entry in files:
        node = root
        *dirs, leaf = entry["path"].split("/")
        for part in dirs:
            node = node.setdefault(part, _Dir())
        node[leaf] = entry
    ids: dict[int, bytes] = {}
    stack: list[tuple[_Dir, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in node.values() if isinstance(child, _Dir))
            continue
        entries: list[TreeEntry] = [
            (_path_bytes(name), MODE_DIR, ids[id(value)])
            if isinstance(value, _Dir)
            else (_path_bytes(name), _MODES[value["mode"]], bytes.fromhex(value["blob"]))
            for name, value in node.items()
        ]
        ids[id(node)] = store_tree(encode_tree(entries))
    return ids[id(root)]


class _Intake:
    """Verifies members against the manifest and writes their blobs into one pack."""

    def __init__(self, odb: ObjectStore, manifest: ArchiveManifest) -> None:
        self.odb = odb
        self.expected = {entry["path"]: entry for entry in manifest.files}
        self.seen: set[str] = set()
        self.links: dict[str, str] = {}
        self.writer = PackWriter(odb)

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, reader: _Limited) -> None:
        path = _check_member_name(info.name)
        refusal = _member_kind(info)
        if refusal is not None:
            raise ArchiveError(f"archive member {info.name} {refusal}")
        entry = self.expected.get(path)
        if entry is None:
            raise ArchiveError(f"archive member {info.name} is not listed in the manifest")
        if path in self.seen:
            raise ArchiveError(f"archive member {info.name} appears twice")
        self.seen.add(path)
        is_link = entry["mode"] == "120000"
        if info.issym() != is_link:
            kind = "a symlink" if info.issym() else "a regular file"
            raise ArchiveError(
                f"archive member {info.name} is {kind} but the manifest says mode {entry['mode']}"
            )
        if is_link:
            target = info.linkname
            data = _path_bytes(target)
            if len(data) != entry["size"]:
                raise ArchiveError(
                    f"archive member {info.name}: symlink target is {len(data)} bytes, the "
                    f"manifest says {entry['size']}"
                )
            if target.startswith("/") or "\x00" in target:
                raise ArchiveError(
                    f"symlink {path} -> {target} points outside the tree "
                    "(archives refuse absolute and escaping symlinks)"
                )
            self.links[path] = target
            self._store_small(info.name, entry, data)
            return
        if bool(info.mode & 0o100) != (entry["mode"] == "100755"):
            raise ArchiveError(
                f"archive member {info.name} has permissions {info.mode:o}, the manifest says "
                f"mode {entry['mode']}"
            )
        if info.size != entry["size"]:
            raise ArchiveError(
                f"archive member {info.name} is {info.size} bytes, the manifest says "
                f"{entry['size']}"
            )
        reader.allow(info.size + _BLOCK + 2 * _TAR_BUFSIZE)
        f = tar.extractfile(info)
        assert f is not None  # a regular member always has a file object
        if info.size <= _STREAM_THRESHOLD:
            data = _read_exact(f, info.size)
            if len(data) != info.size:
                raise ArchiveError(f"archive is truncated inside member {info.name}")
            self._store_small(info.name, entry, data)
        else:
            self._store_large(info.name, entry, f)

    def _verify(self, name: str, entry: dict[str, Any], sha256: str, oid: bytes) -> None:
        if sha256 != entry["sha256"]:
            raise ArchiveError(f"archive member {name}: content does not match its sha256")
        if oid.hex() != entry["blob"]:
            raise ArchiveError(f"archive member {name}: content does not match its blob id")

    def _store_small(self, name: str, entry: dict[str, Any], data: bytes) -> None:
        sha1 = hashlib.sha1(object_header("blob", len(data)))
        sha1.update(data)
        oid = sha1.digest()
        self._verify(name, entry, hashlib.sha256(data).hexdigest(), oid)
        if oid not in self.writer and not self.odb.exists(oid):
            self.writer.add("blob", oid, len(data), deflate(data))

    def _store_large(self, name: str, entry: dict[str, Any], f: Any) -> None:
        size = entry["size"]
        sha1 = hashlib.sha1(object_header("blob", size))
        sha256 = hashlib.sha256()
        comp = zlib.compressobj(1)
        got = 0
        with tempfile.SpooledTemporaryFile(max_size=4 * _CHUNK) as spool:
            while got < size:
                chunk = f.read(min(_CHUNK, size - got))
                if not chunk:
                    raise ArchiveError(f"archive is truncated inside member {name}")
                got += len(chunk)
                sha1.update(chunk)
                sha256.update(chunk)
                spool.write(comp.compress(chunk))
            spool.write(comp.flush())
            oid = sha1.digest()
            self._verify(name, entry, sha256.hexdigest(), oid)
            if oid not in self.writer and not self.odb.exists(oid):
                spool.seek(0)
                self.writer.add_stream("blob", oid, size, spool)

    def finish(self, manifest: ArchiveManifest) -> bytes:
        """Check completeness and links, then write the trees; returns the root tree id."""
        for path in self.expected:
            if path not in self.seen:
                raise ArchiveError(f"archive is missing member {FILES_PREFIX}{path}")
        _check_links(self.links)
        tree = manifest_tree(self.expected.values(), self._add_tree)
        if tree.hex() != manifest.tree:
            raise ArchiveError(
                f"archive content builds tree {tree.hex()}, the manifest says {manifest.tree}"
            )
        return tree

    def _add_tree(self, data: bytes) -> bytes:
        problems = object_problems("tree", data)
        if problems:  # names git refuses on checkout (".GIT", "git~1", ...) or fsck rejects
            raise ArchiveError(f"archive builds a tree git rejects: {'; '.join(problems)}")
        return self.writer.add_raw("tree", data)


def _decompressor(stream: BinaryIO) -> tuple[Any, _ZstdFrames | None]:
    head = _read_exact(stream, 4)
    raw = _Prefixed(head, stream)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=cast(Any, raw), mode="rb"), None
    if head == _ZSTD_MAGIC:
        frames = _ZstdFrames()
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(cast(Any, _ZstdTee(raw, frames)), read_across_frames=True)
        return reader, frames
    raise ArchiveError("not a narrative archive (neither gzip nor zstd data)")


def _read_manifest(tar: tarfile.TarFile, max_manifest: int) -> ArchiveManifest:
    info = tar.next()
    if info is None:
        raise ArchiveError("archive is empty")
    if info.name != MANIFEST_NAME:
        raise ArchiveError(f"archive does not start with {MANIFEST_NAME} (found {info.name})")
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse:
        raise ArchiveError(f"archive member {MANIFEST_NAME} is not a regular file")
    if info.size > max_manifest:
        raise ArchiveError(
            f"archive manifest is {info.size} bytes, over the limit of {max_manifest}"
        )
    f = tar.extractfile(info)
    assert f is not None
    document = _read_exact(f, info.size)
    if len(document) != info.size:
        raise ArchiveError("archive is truncated inside its manifest")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _v in pairs]
        if len(set(keys)) != len(keys):
            raise ArchiveError("archive manifest repeats a key")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise ArchiveError(f"archive manifest holds {name}")

    try:
        data = parse_json(
            document.decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=no_constants,
        )
    except ValueError as exc:
        raise ArchiveError(f"archive manifest is not valid JSON: {exc}") from None
    return ArchiveManifest.from_dict(data)


def _header_allowance(manifest: ArchiveManifest) -> int:
    """Decompressed bytes one member header may take: ustar blocks plus a pax record with
    the path and, for symlinks, the target (each possibly twice, as tar writes them)."""
    longest = 0
    for entry in manifest.files:
        link = entry["size"] if entry["mode"] == "120000" else 0
        longest = max(longest, len(_path_bytes(entry["path"])) + link)
    return 4 * _BLOCK + 2 * longest


def read_archive(
    stream: BinaryIO,
    store: Store,
    *,
    max_total: int = DEFAULT_MAX_EXPANDED,
    max_files: int = 1_000_000,
    max_manifest: int = 16 << 20,
) -> ArchiveImport:
    """Verify an archive and take its files into ``store`` as blobs and trees.

    Nothing is created on disk besides the store's new pack, published only when every member
    and the rebuilt root tree have been verified. Symlinks are stored as blobs (never created),
    but targets that are absolute or resolve outside the tree are refused as hostile.

    Args:
        stream: The archive; only ``read`` is used (no seeking). Read to its end.
        store: The store to write objects into.
        max_total: Most content bytes (sum of member sizes) accepted.
        max_files: Most files accepted.
        max_manifest: Largest ``narrative.json`` accepted.

    Returns:
        The manifest and the binary root tree id (equal to ``manifest.tree``).

    Raises:
        ArchiveError: Anything malformed, corrupted, truncated, over a limit or hostile; the
            store is left exactly as it was.
    """
    decompressed, frames = _decompressor(stream)
    limited = _Limited(decompressed, max_manifest + 16 * _BLOCK + 2 * _TAR_BUFSIZE)
    try:
        with tarfile.open(
            fileobj=cast(Any, limited),
            mode="r|",
            bufsize=_TAR_BUFSIZE,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            manifest = _read_manifest(tar, max_manifest)
            _check_limits(manifest, max_total, max_files)
            per_header = _header_allowance(manifest)
            total = sum(entry["size"] for entry in manifest.files)
            limited.hard_limit = (
                limited.count
                + total
                + len(manifest.files) * (per_header + _BLOCK)
                + 2 * _TAR_BUFSIZE
                + _MAX_TRAILING
            )
            with store.lock("gc", shared=True):
                tree, objects = _take_in(store, tar, manifest, limited, per_header, frames)
    except _LimitExceeded:
        raise ArchiveError(
            f"archive decompresses to more than its manifest declares (stopped after "
            f"{limited.count} bytes; limit {max_total} bytes of files)"
        ) from None
    except ArchiveError:
        raise
    except (
        tarfile.TarError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        zstandard.ZstdError,
        ValueError,
        struct.error,
    ) as exc:
        raise ArchiveError(f"archive is corrupt or truncated: {exc}") from None
    return ArchiveImport(manifest, tree, objects)


def _check_limits(manifest: ArchiveManifest, max_total: int, max_files: int) -> None:
    if len(manifest.files) > max_files:
        raise ArchiveError(
            f"archive holds {len(manifest.files)} files, over the limit of {max_files}"
        )
    total = sum(entry["size"] for entry in manifest.files)
    if total > max_total:
        raise ArchiveError(f"archive holds {total} bytes of files, over the limit of {max_total}")


def _take_in(
    store: Store,
    tar: tarfile.TarFile,
    manifest: ArchiveManifest,
    limited: _Limited,
    per_header: int,
    frames: _ZstdFrames | None,
) -> tuple[bytes, int]:
    """Every member after the manifest into one pack, published only once all is verified."""
    intake = _Intake(store.odb, manifest)
    try:
        while True:
            limited.allow(per_header + 2 * _TAR_BUFSIZE)
            info = tar.next()
            if info is None:
                break
            cast(Any, tar).members.clear()  # stream mode would otherwise keep every TarInfo
            intake.member(tar, info, limited)
        tree = intake.finish(manifest)
        _drain(tar, limited)
        if frames is not None:
            frames.finish()
        objects = len(intake.writer)
    except BaseException:
        intake.writer.abort()
        raise
    intake.writer.publish()
    return tree, objects


def _drain(tar: tarfile.TarFile, limited: _Limited) -> None:
    """Read what follows the end-of-archive blocks to the end of the compressed stream (this
    checks the gzip CRC, or that the zstd frame is complete): zero padding only, bounded."""
    # what tarfile already read ahead (its stream buffer) counts as trailing data too
    buffered = getattr(getattr(tar, "fileobj", None), "buf", b"")
    if isinstance(buffered, bytes) and buffered.count(0) != len(buffered):
        raise ArchiveError("archive has data after its end")
    limited.allow(_MAX_TRAILING + 2 * _TAR_BUFSIZE)
    while chunk := limited.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            raise ArchiveError("archive has data after its end")
