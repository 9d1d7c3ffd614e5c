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

The cache is one marshal file per workspace, replaced atomically; an unreadable cache is ignored.
It is an optimisation only: deleting it never changes a snapshot's result.

``journal`` is the file watcher's ``(generation, offset)`` the records are complete as of
(:mod:`narrative.watch`); None when they were not taken with a live watcher.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from dataclasses import dataclass, field
from typing import Any

from .fsutil import write_atomic

__all__ = ["RACY_WINDOW_NS", "DirRecord", "FileDetail", "StatCache", "StatKey", "cache_path"]

StatKey = tuple[int, int, int, int, int]
FileDetail = tuple[StatKey, bytes, bool]
"""(stat key, blob id, racy)."""
DirRecord = tuple[int | None, bytes, int, int, list[dict[str, Any]], bytes]
"""(signature, tree id or b"" when empty, file count, byte count, skipped, details)."""
RACY_WINDOW_NS = 2_000_000_000
_VERSION = 4


def cache_path(store_dir: str, workspace: str) -> str:
    """Where the cache for ``workspace`` lives inside the store."""
    digest = hashlib.sha1(os.path.abspath(workspace).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(store_dir, "narrative", "cache", f"stat-{digest[:16]}")


def encode_details(details: dict[str, FileDetail]) -> bytes:
    return marshal.dumps(details)


def decode_details(raw: bytes) -> dict[str, FileDetail]:
    try:
        value = marshal.loads(raw)
    except (EOFError, ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class StatCache:
    """Directory records of the last snapshot of one workspace."""

    dirs: dict[str, DirRecord] = field(default_factory=dict)
    head: tuple[bytes, bytes, str] | None = None
    """(commit, tree, snapshot id) of the snapshot the cache was saved with (skips a read)."""
    max_file_size: int = 0
    journal: tuple[str, int] | None = None
    """The watcher's journal position the records are complete as of (see the module doc)."""

    @classmethod
    def load(cls, path: str, max_file_size: int) -> StatCache:
        try:
            with open(path, "rb") as f:
                version, size_cap, dirs, head, journal = marshal.load(f)
        except (OSError, EOFError, ValueError, TypeError):
            return cls(max_file_size=max_file_size)
        if version != _VERSION or size_cap != max_file_size or not isinstance(dirs, dict):
            return cls(max_file_size=max_file_size)
        head = head if isinstance(head, tuple) else None
        return cls(dirs, head, max_file_size, journal if isinstance(journal, tuple) else None)

    def save(self, path: str) -> None:
        # Not fsynced: after a power cut a stale or missing cache only costs a re-hash.
        data = marshal.dumps((_VERSION, self.max_file_size, self.dirs, self.head, self.journal))
        write_atomic(path, data, durable=False)

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
