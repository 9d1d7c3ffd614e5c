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

On disk (format 5): a base file ``stat-<id>`` with every record, and beside it an optional
``stat-<id>.delta`` holding the records that differ from that base (and the names it lost),
tagged with the base's random token. A snapshot that changed a few directories rewrites only
the small delta; the base is rewritten (and the delta dropped) once the delta grows past a
fraction of it. A delta whose token is not its base's (a concurrent writer replaced the base)
is ignored. Each file is marshal data read in one ``read`` and replaced atomically; format 4
(a base without token or delta) is still read. An unreadable cache is ignored: it is an
optimisation only, deleting it never changes a snapshot's result.

``journal`` is the file watcher's ``(generation, offset)`` the records are complete as of
(:mod:`narrative.watch`); None when they were not taken with a live watcher.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from dataclasses import dataclass, field
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
_VERSION = 5
_OLD_VERSION = 4
"""Base files without a token or delta, as written before; still read."""
_DELTA_SUFFIX = ".delta"
_DELTA_FRACTION = 8
"""The base is rewritten once the delta would exceed 1/8 of its size."""
_RECORD_OVERHEAD = 64
"""Rough marshal bytes of a record besides its details (for the delta's size estimate)."""


def cache_path(store_dir: str, workspace: str) -> str:
    """Where the cache for ``workspace`` lives inside the store."""
    digest = hashlib.sha1(os.path.abspath(workspace).encode("utf-8", "surrogateescape")).hexdigest()
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


def _read_marshal(path: str) -> tuple[Any, int]:
    """A marshal file's value and size, read in one call (``marshal.load`` on a file reads it
    in many small pieces); None when missing or unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return marshal.loads(raw), len(raw)
    except (OSError, EOFError, ValueError, TypeError):
        return None, 0


@dataclass
class _Base:
    """What the base file on disk holds: deltas are computed against it."""

    token: bytes
    dirs: dict[str, DirRecord]
    size: int


@dataclass
class StatCache:
    """Directory records of the last snapshot of one workspace."""

    dirs: dict[str, DirRecord] = field(default_factory=dict)
    head: tuple[bytes, bytes, str] | None = None
    """(commit, tree, snapshot id) of the snapshot the cache was saved with (skips a read)."""
    max_file_size: int = 0
    journal: tuple[str, int] | None = None
    """The watcher's journal position the records are complete as of (see the module doc)."""
    base: _Base | None = field(default=None, repr=False, compare=False)
    """The base file these records were loaded from (None: write a whole new base)."""

    @classmethod
    def load(cls, path: str, max_file_size: int) -> StatCache:
        empty = cls(max_file_size=max_file_size)
        value, size = _read_marshal(path)
        if not isinstance(value, tuple) or not value:
            return empty
        if value[0] == _VERSION and len(value) == 6 and isinstance(value[1], bytes):
            _v, token, size_cap, dirs, head, journal = value
        elif value[0] == _OLD_VERSION and len(value) == 5:
            _v, size_cap, dirs, head, journal = value
            token = None
        else:
            return empty
        if size_cap != max_file_size or not isinstance(dirs, dict):
            return empty
        base = _Base(token, dict(dirs), size) if token is not None else None
        delta = _read_marshal(path + _DELTA_SUFFIX)[0] if base is not None else None
        if (
            base is not None
            and isinstance(delta, tuple)
            and len(delta) == 6
            and delta[0] == _VERSION
            and delta[1] == base.token
            and isinstance(delta[2], dict)
            and isinstance(delta[3], list)
        ):
            _v, _token, changed, removed, head, journal = delta
            dirs.update(changed)
            for rel in removed:
                dirs.pop(rel, None)
        head = head if isinstance(head, tuple) else None
        return cls(dirs, head, max_file_size, journal if isinstance(journal, tuple) else None, base)

    def save(self, path: str) -> None:
        """Write the records: only a delta against the base on disk when that is small."""
        # Not fsynced: after a power cut a stale or missing cache only costs a re-hash.
        if self.base is not None and self._save_delta(path, self.base):
            return
        token = os.urandom(8)
        data = marshal.dumps(
            (_VERSION, token, self.max_file_size, self.dirs, self.head, self.journal)
        )
        write_atomic(path, data, durable=False)
        # a delta left beside it names the old token, so it would be ignored: drop it anyway
        unlink_quiet(path + _DELTA_SUFFIX)
        self.base = _Base(token, dict(self.dirs), len(data))

    def _save_delta(self, path: str, base: _Base) -> bool:
        changed: dict[str, DirRecord] = {}
        estimate = 0
        limit = base.size // _DELTA_FRACTION
        old = base.dirs
        for rel, record in self.dirs.items():
            before = old.get(rel)
            if before is record or before == record:
                continue
            changed[rel] = record
            estimate += len(record[5]) + _RECORD_OVERHEAD
            if estimate > limit:
                return False
        removed = [rel for rel in old if rel not in self.dirs]
        if (len(removed) * _RECORD_OVERHEAD) + estimate > limit:
            return False
        data = marshal.dumps((_VERSION, base.token, changed, removed, self.head, self.journal))
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
