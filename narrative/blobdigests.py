"""The size and sha256 of blob contents, by blob id, kept in the store.

An archive's manifest names every file's size and sha256 before the files themselves (the
reader checks them as it extracts). Hashing the contents first, then compressing them, would
inflate every blob twice; hashing while compressing means spooling the compressed files aside
and copying them out after the manifest, which on this project's bench machine costs as much
as a fifth of the export. A blob's content never changes for its id, so what one export
hashed holds for every later one: an export of a workspace that mostly did not change (the
usual case: each run ships the current snapshot) hashes only what is new, and writes the
archive in one pass straight to its destination.

The file (``narrative/cache/blob-digests``) is a cache: replaced whole (readers see the old or
the new one), checksummed, and ignored when it is not one this version wrote whole, which only
costs the hashing again. Entries are never wrong for a store that still holds the blob, and
harmless for one that does not (a blob with that id that comes back has that content). Only
the store's owner writes it: an environment's agent never reaches the store.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import zlib

from .fsutil import write_atomic

__all__ = ["MAX_ENTRIES", "BlobDigests"]

_FILE = ("narrative", "cache", "blob-digests")
_VERSION = 1
MAX_ENTRIES = 1 << 20
"""Entries kept at most (~60 MB of file): past it, a save keeps only this process's."""


class BlobDigests:
    """``blob id -> (size, sha256)``, as loaded from a store plus what :meth:`add` was given;
    :meth:`save` writes it back when something was added."""

    def __init__(self, path: str, kept: dict[bytes, tuple[int, bytes]]) -> None:
        self._path = path
        self._entries = kept
        self._added: dict[bytes, tuple[int, bytes]] = {}

    @classmethod
    def load(cls, git_dir: str) -> BlobDigests:
        """The store's kept digests; none when there is no file or it is not one this version
        wrote whole (torn, damaged, another version)."""
        path = os.path.join(git_dir, *_FILE)
        return cls(path, _read(path))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, oid: bytes) -> tuple[int, bytes] | None:
        """The size and raw sha256 of blob ``oid``'s content, when known."""
        return self._entries.get(oid)

    def add(self, oid: bytes, size: int, sha256: bytes) -> None:
        """Note what hashing blob ``oid``'s content gave."""
        if self._entries.get(oid) != (size, sha256):
            self._entries[oid] = self._added[oid] = (size, sha256)

    def save(self) -> None:
        """Write the entries back when some were added (a store that cannot be written keeps
        its old file, or none: exports then hash again)."""
        if not self._added:
            return
        entries = self._added if len(self._entries) > MAX_ENTRIES else self._entries
        oids = b"".join(entries)
        digests = b"".join(digest for _, digest in entries.values())
        sizes = [size for size, _ in entries.values()]
        payload = marshal.dumps((oids, digests, sizes))
        with contextlib.suppress(OSError):
            write_atomic(
                self._path,
                marshal.dumps((_VERSION, zlib.crc32(payload), payload)),
                durable=False,  # a cache: a torn file is refused when loaded
            )
        self._added = {}


def _read(path: str) -> dict[bytes, tuple[int, bytes]]:
    try:
        with open(path, "rb") as f:
            version, crc, payload = marshal.loads(f.read())
        if version != _VERSION or not isinstance(payload, bytes) or zlib.crc32(payload) != crc:
            return {}
        oids, digests, sizes = marshal.loads(payload)
        count = len(sizes)
        if (
            not isinstance(oids, bytes)
            or not isinstance(digests, bytes)
            or len(oids) != 20 * count
            or len(digests) != 32 * count
            or not all(type(size) is int and size >= 0 for size in sizes)
        ):
            return {}
        return {
            oids[20 * i : 20 * i + 20]: (sizes[i], digests[32 * i : 32 * i + 32])
            for i in range(count)
        }
    except (OSError, EOFError, ValueError, TypeError):
        return {}
