"""The private stat cache that makes repeated snapshots cheap.

For every file of the last snapshot it remembers ``(mtime_ns, ctime_ns, size, inode, mode)`` and
the blob id, and for every directory the tree id and entry count. A file whose stat key is
unchanged is not read again; a directory whose entries all hit and whose count is unchanged keeps
its tree id without re-encoding.

Racy entries — files modified within :data:`RACY_WINDOW_NS` of the scan — are stored with an
empty key so they are re-read next time: a change landing in the same timestamp tick as the read
would otherwise go unnoticed (git's "racy clean" problem).

The cache is one marshal file per workspace, replaced atomically; any unreadable cache is simply
ignored. It is an optimisation only: deleting it never changes a snapshot's result.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from dataclasses import dataclass, field

from .fsutil import write_atomic

__all__ = ["RACY_KEY", "RACY_WINDOW_NS", "StatCache", "StatKey", "cache_path"]

StatKey = tuple[int, ...]
RACY_KEY: StatKey = ()
RACY_WINDOW_NS = 2_000_000_000
_VERSION = 2


def cache_path(store_dir: str, workspace: str) -> str:
    """Where the cache for ``workspace`` lives inside the store."""
    digest = hashlib.sha1(os.path.abspath(workspace).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(store_dir, "narrative", "cache", f"stat-{digest[:16]}")


@dataclass
class StatCache:
    """File and tree entries of the last snapshot of one workspace."""

    files: dict[str, tuple[StatKey, bytes]] = field(default_factory=dict)
    trees: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    head: tuple[bytes, bytes, str] | None = None
    """(commit, tree, snapshot id) of the snapshot the cache was saved with (skips a read)."""

    @classmethod
    def load(cls, path: str) -> StatCache:
        try:
            with open(path, "rb") as f:
                data = marshal.load(f)
            version, files, trees, head = data
            if version != _VERSION or not isinstance(files, dict) or not isinstance(trees, dict):
                return cls()
            return cls(files, trees, head if isinstance(head, tuple) else None)
        except (OSError, EOFError, ValueError, TypeError):
            return cls()

    def save(self, path: str) -> None:
        # Not fsynced: after a power cut a stale or missing cache only costs a re-hash.
        data = marshal.dumps((_VERSION, self.files, self.trees, self.head))
        write_atomic(path, data, durable=False)
