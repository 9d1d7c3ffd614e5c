"""The private stat cache that makes repeated snapshots cheap.

One record per directory of the last snapshot of a workspace::

    rel dir -> (signature, tree id, file count, byte count, skipped, details)

``signature`` hashes the names and ``(mtime_ns, ctime_ns, size, inode, mode)`` of every entry
the directory contributes; when it is unchanged and every subdirectory is reusable, the cached
tree id is taken as is, without looking at a single file record. ``details`` (marshal bytes,
decoded only for directories that changed) maps each file name to ``(stat key, blob id, racy)``
so that only files whose stat key moved are read again.

Racy entries — files modified within :data:`RACY_WINDOW_NS` of the scan — are never trusted
next time (their directory's signature is stored as None): a change landing in the same
timestamp tick as the read would otherwise go unnoticed (git's "racy clean" problem).

On disk (format 6): a base file ``stat-<id>`` with every record, and beside it an optional
``stat-<id>.delta`` holding the records that differ from that base (and the names it lost),
tagged with the base's random token. A snapshot that changed a few directories rewrites only
the small delta; the base is rewritten (and the delta dropped) once the delta grows past a
fraction of it. A delta whose token is not its base's (a concurrent writer replaced the base)
is ignored. The base starts with a small header (token, size cap, head, journal mark and the
directories whose records are not trusted) before the records: a snapshot whose watcher
journal shows no change reads only that and the delta, and never decodes the records. Each
file is replaced atomically; formats 4 and 5 (one marshal tuple) are still read. An
unreadable cache is ignored: it is an optimisation only, deleting it never changes a
snapshot's result.

``journal`` is the file watcher's ``(generation, offset)`` the records are complete as of
(:mod:`narrative.watch`); None when they were not taken with a live watcher.
"""

from __future__ import annotations

import importlib
import marshal
import os
import struct
from typing import Any

from .fsutil import unlink_quiet, write_atomic

__all__ = [
    "RACY_WINDOW_NS",
    "DirRecord",
    "FileDetail",
    "StatCache",
    "StatKey",
    "cache_path",
    "is_delta_file",
]

StatKey = tuple[int, int, int, int, int]
FileDetail = tuple[StatKey, bytes, bool]
"""(stat key, blob id, racy)."""
DirRecord = tuple[int | None, bytes, int, int, list[dict[str, Any]], bytes]
"""(signature, tree id or b"" when empty, file count, byte count, skipped, details)."""
RACY_WINDOW_NS = 2_000_000_000
_VERSION = 6
_MAGIC = b"NSC\x06"
_PREFIX = struct.Struct("<4sI")
"""Format 6 base: magic, then the header's length; the header, then the records (marshal)."""
_HEADER_READ = 4096
_DELTA_SUFFIX = ".delta"
_DELTA_FRACTION = 8
"""The base is rewritten once the delta would exceed 1/8 of its size."""
_RECORD_OVERHEAD = 64
"""Rough marshal bytes of a record besides its details (for the delta's size estimate)."""


def _path_sha1(data: bytes) -> str:
    """sha1 hex digest of a path, through CPython's own SHA-1 when it is built: importing
    hashlib loads OpenSSL, ~3 ms of the ~65 ms of a no-op snapshot with the watcher (which
    hashes nothing else). Same digest either way."""
    try:
        module = importlib.import_module("_sha1")
    except ImportError:  # pragma: no cover - an interpreter built without it
        module = importlib.import_module("hashlib")
    return str(module.sha1(data).hexdigest())


def cache_path(store_dir: str, workspace: str) -> str:
    """Where the cache for ``workspace`` lives inside the store."""
    digest = _path_sha1(os.path.abspath(workspace).encode("utf-8", "surrogateescape"))
    return os.path.join(store_dir, "narrative", "cache", f"stat-{digest[:16]}")


def is_delta_file(name: str) -> bool:
    """Whether a file name in the cache directory is a delta (not a cache of its own)."""
    return name.endswith(_DELTA_SUFFIX)


def encode_details(details: dict[str, FileDetail]) -> bytes:
    return marshal.dumps(details)


def decode_details(raw: bytes) -> dict[str, FileDetail]:
    try:
        value = marshal.loads(raw)
    except (EOFError, ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_marshal(path: str) -> Any:
    """A marshal file's value (read in one call: ``marshal.load`` on a file reads it in many
    small pieces); None when missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return marshal.loads(f.read())
    except (OSError, EOFError, ValueError, TypeError):
        return None


def _unvouched(dirs: dict[str, DirRecord]) -> list[str]:
    """Directories whose records a snapshot must list again whatever the journal says."""
    return [rel for rel, record in dirs.items() if record[0] is None]


class _Base:
    """What the base file on disk holds: deltas are computed against it."""

    __slots__ = ("dirs", "size", "token")
    token: bytes
    dirs: dict[str, DirRecord] | None
    """None until the records are decoded (a delta is then never computed against them)."""
    size: int

    def __init__(self, token: bytes, dirs: dict[str, DirRecord] | None, size: int) -> None:
        self.token = token
        self.dirs = dirs
        self.size = size


_Pending = tuple[str, bytes, tuple[dict[str, DirRecord], list[str]] | None]
"""Where a format 6 cache's records are until first used: (path, the base's token, the
delta's (changed, removed) to apply over them)."""


def _read_header(path: str) -> tuple[Any, int, int] | None:
    """A format 6 base's header, where its records start and the file's size; None for an
    older format (or no file). Raises what reading and ``marshal`` raise on a damaged one."""
    with open(path, "rb") as f:
        first = f.read(_HEADER_READ)
        if first[:4] != _MAGIC or len(first) < _PREFIX.size:
            return None
        length = _PREFIX.unpack_from(first)[1]
        end = _PREFIX.size + length
        if len(first) < end:
            first += f.read(end - len(first))
        return marshal.loads(first[_PREFIX.size : end]), end, os.fstat(f.fileno()).st_size


class StatCache:
    """Directory records of the last snapshot of one workspace.

    Loaded from a format 6 file, the records (:attr:`dirs`) are decoded on first use: the
    head, journal mark and :attr:`unvouched` come from the header and the delta alone.
    """

    def __init__(
        self,
        dirs: dict[str, DirRecord] | None = None,
        head: tuple[bytes, bytes, str] | None = None,
        max_file_size: int = 0,
        journal: tuple[str, int] | None = None,
        base: _Base | None = None,
    ) -> None:
        self._dirs: dict[str, DirRecord] = {} if dirs is None else dirs
        self.head = head
        """(commit, tree, snapshot id) of the snapshot the cache was saved with (skips a
        read); its tree is the one the records describe."""
        self.max_file_size = max_file_size
        self.journal = journal
        """The watcher's journal position the records are complete as of (module doc)."""
        self.base = base
        """The base file these records were loaded from (None: write a whole new base)."""
        self._pending: _Pending | None = None
        self._unvouched: list[str] | None = None

    def __repr__(self) -> str:
        return f"StatCache(head={self.head!r}, journal={self.journal!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StatCache):
            return NotImplemented
        return (self.dirs, self.head, self.max_file_size, self.journal) == (
            other.dirs,
            other.head,
            other.max_file_size,
            other.journal,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    @property
    def dirs(self) -> dict[str, DirRecord]:
        if self._pending is not None:
            self._decode(self._pending)
        return self._dirs

    @property
    def unvouched(self) -> list[str]:
        """Directories stored without a signature (racy or incomplete when taken): a snapshot
        lists them again, whatever the journal says."""
        if self._pending is not None and self._unvouched is not None:
            return self._unvouched
        return _unvouched(self.dirs)

    @classmethod
    def load(cls, path: str, max_file_size: int) -> StatCache:
        empty = cls(max_file_size=max_file_size)
        try:
            found = _read_header(path)
        except (OSError, EOFError, ValueError, TypeError, struct.error):
            return empty
        if found is None:
            return cls._load_old(path, max_file_size)
        header, _end, size = found
        if not isinstance(header, tuple) or len(header) != 5 or not isinstance(header[0], bytes):
            return empty
        token, size_cap, head, journal, unvouched = header
        if size_cap != max_file_size:
            return empty
        delta = _read_marshal(path + _DELTA_SUFFIX)
        changes = None
        if (
            isinstance(delta, tuple)
            and len(delta) == 7
            and delta[0] == _VERSION
            and delta[1] == token
            and isinstance(delta[2], dict)
            and isinstance(delta[3], list)
        ):
            _v, _token, changed, removed, head, journal, unvouched = delta
            changes = (changed, removed)
        cache = cls(
            None,
            head if isinstance(head, tuple) else None,
            max_file_size,
            journal if isinstance(journal, tuple) else None,
            _Base(token, None, size),
        )
        cache._pending = (path, token, changes)
        cache._unvouched = unvouched if isinstance(unvouched, list) else None
        return cache

    def _decode(self, pending: _Pending) -> None:
        """Read the records; none at all when the base was replaced or damaged since its header
        was read (the snapshot is then slower, never wrong)."""
        self._pending = None
        path, token, delta = pending
        dirs: Any = None
        try:
            found = _read_header(path)
            if found is not None and isinstance(found[0], tuple) and found[0][0] == token:
                with open(path, "rb") as f:
                    f.seek(found[1])
                    dirs = marshal.loads(f.read())
        except (OSError, EOFError, ValueError, TypeError, IndexError, struct.error):
            dirs = None
        if not isinstance(dirs, dict) or self.base is None:
            self.base = None
            self._dirs = {}
            return
        self.base.dirs = dict(dirs)
        if delta is not None:
            changed, removed = delta
            dirs.update(changed)
            for rel in removed:
                dirs.pop(rel, None)
        self._dirs = dirs

    @classmethod
    def _load_old(cls, path: str, max_file_size: int) -> StatCache:
        """A format 4 or 5 cache (one marshal tuple: 4 without token or delta), decoded whole."""
        empty = cls(max_file_size=max_file_size)
        value = _read_marshal(path)
        if not isinstance(value, tuple) or not value:
            return empty
        if value[0] == 5 and len(value) == 6 and isinstance(value[1], bytes):
            _v, _token, size_cap, dirs, head, journal = value
        elif value[0] == 4 and len(value) == 5:
            _v, size_cap, dirs, head, journal = value
        else:
            return empty
        if size_cap != max_file_size or not isinstance(dirs, dict):
            return empty
        # a format 5 delta is not applied: the next save writes a whole format 6 base
        head = head if isinstance(head, tuple) else None
        return cls(dirs, head, max_file_size, journal if isinstance(journal, tuple) else None)

    def save(self, path: str) -> None:
        """Write the records: only a delta against the base on disk when that is small."""
        # Not fsynced: after a power cut a stale or missing cache only costs a re-hash.
        dirs = self.dirs
        unvouched = _unvouched(dirs)
        if self.base is not None and self._save_delta(path, self.base, unvouched):
            return
        token = os.urandom(8)
        header = marshal.dumps((token, self.max_file_size, self.head, self.journal, unvouched))
        data = _PREFIX.pack(_MAGIC, len(header)) + header + marshal.dumps(dirs)
        write_atomic(path, data, durable=False)
        # a delta left beside it names the old token, so it would be ignored: drop it anyway
        unlink_quiet(path + _DELTA_SUFFIX)
        self.base = _Base(token, dict(dirs), len(data))

    def _save_delta(self, path: str, base: _Base, unvouched: list[str]) -> bool:
        old = base.dirs
        if old is None:
            return False
        changed: dict[str, DirRecord] = {}
        estimate = 0
        limit = base.size // _DELTA_FRACTION
        for rel, record in self.dirs.items():
            before = old.get(rel)
            if before is record or before == record:
                continue
            changed[rel] = record
            estimate += len(record[5]) + _RECORD_OVERHEAD
            if estimate > limit:
                return False
        removed = [rel for rel in old if rel not in self.dirs]
        if (len(removed) + len(unvouched)) * _RECORD_OVERHEAD + estimate > limit:
            return False
        data = marshal.dumps(
            (_VERSION, base.token, changed, removed, self.head, self.journal, unvouched)
        )
        write_atomic(path + _DELTA_SUFFIX, data, durable=False)
        return True

    @staticmethod
    def remove(path: str) -> None:
        """Delete a cache (its base and delta)."""
        unlink_quiet(path + _DELTA_SUFFIX)
        unlink_quiet(path)

    def file_keys(self) -> dict[str, StatKey]:
        """Stat key of every file, as read by the snapshot that saved the cache."""
        keys: dict[str, StatKey] = {}
        for rel, record in self.dirs.items():
            prefix = rel + "/" if rel else ""
            for name, detail in decode_details(record[5]).items():
                keys[prefix + name] = detail[0]
        return keys

    def oids(self) -> set[bytes]:
        """Every tree and blob id the cache refers to."""
        found: set[bytes] = set()
        for record in self.dirs.values():
            if record[1]:
                found.add(record[1])
            found.update(detail[1] for detail in decode_details(record[5]).values())
        return found
