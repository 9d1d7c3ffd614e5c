"""Pack indexes (``.idx`` version 2): encoding one for a freshly written pack, and the
read-only, mmapped view through which the object database finds packed objects.

Lookups are the snapshot fast path (an existence check per file), so :meth:`PackIndex.find`
avoids Python-level bisection for small fan-out buckets.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Iterator

from .errors import StoreCorrupted
from .objects import sha1

__all__ = ["PackIndex", "encode_index"]

_SCAN_BUCKET = 256  # fan-out buckets up to this many oids are searched, not bisected


def encode_index(entries: dict[bytes, tuple[int, int]], pack_sha: bytes) -> bytes:
    """A version 2 ``.idx`` for a pack: ``entries`` maps each oid to (offset, crc32)."""
    oids = sorted(entries)
    fanout = [0] * 256
    for oid in oids:
        fanout[oid[0]] += 1
    total = 0
    for i in range(256):
        total += fanout[i]
        fanout[i] = total
    large: list[int] = []
    offsets = bytearray()
    for oid in oids:
        off = entries[oid][0]
        if off < 0x80000000:
            offsets += struct.pack(">I", off)
        else:
            offsets += struct.pack(">I", 0x80000000 | len(large))
            large.append(off)
    body = b"".join(
        [
            b"\xfftOc",
            struct.pack(">I", 2),
            struct.pack(">256I", *fanout),
            b"".join(oids),
            b"".join(struct.pack(">I", entries[o][1]) for o in oids),
            bytes(offsets),
            b"".join(struct.pack(">Q", off) for off in large),
            pack_sha,
        ]
    )
    return body + sha1(body).digest()


class PackIndex:
    """Read-only view of one ``.idx`` (version 2) for lookups."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:8] != b"\xfftOc\x00\x00\x00\x02":
            raise StoreCorrupted(f"unsupported pack index {path}")
        self.pack_path = path[:-4] + ".pack"
        self._fanout: tuple[int, ...] = struct.unpack_from(">256I", self._map, 8)
        self.count: int = self._fanout[255]
        self._oid_base = 8 + 1024
        self._pack_fd = -1
        self._close_pack: weakref.finalize[[int], PackIndex] | None = None
        self._open_lock = threading.Lock()
        self.pack_size = 0
        self._sorted_offsets: list[int] | None = None
        self._positions: dict[bytes, int] | None = None
        self._offsets: tuple[int, ...] | None = None

    def _oid_at(self, i: int) -> bytes:
        start = self._oid_base + 20 * i
        return self._map[start : start + 20]

    def find(self, oid: bytes) -> int | None:
        """Position of ``oid`` in the index, or None."""
        lo = self._fanout[oid[0] - 1] if oid[0] else 0
        hi = self._fanout[oid[0]]
        if hi - lo <= _SCAN_BUCKET:
            # A small fan-out bucket: one slice and a C-speed substring search beat a bisection
            # through Python-level __getitem__ calls. A hit must sit on a 20-byte boundary.
            start = self._oid_base + 20 * lo
            bucket = self._map[start : start + 20 * (hi - lo)]
            pos = bucket.find(oid)
            while pos >= 0:
                if pos % 20 == 0:
                    return lo + pos // 20
                pos = bucket.find(oid, pos + 1)
            return None
        i = bisect.bisect_left(_OidView(self), oid, lo, hi)
        if i < hi and self._oid_at(i) == oid:
            return i
        return None

    def _bulk(self, asked: int) -> dict[bytes, int] | None:
        """oid → position of every object in the pack, when ``asked`` lookups are a large share
        of it (a full export): one dict, built once, beats a search each."""
        if self._positions is None and asked * 8 >= self.count:
            table = self._map[self._oid_base : self._oid_base + 20 * self.count]
            self._positions = {
                table[at : at + 20]: i for i, at in enumerate(range(0, len(table), 20))
            }
        return self._positions

    def find_many(self, oids: list[bytes]) -> list[int | None]:
        """Positions of ``oids`` (None where absent)."""
        positions = self._bulk(len(oids))
        if positions is None:
            return [self.find(oid) for oid in oids]
        get = positions.get
        return [get(oid) for oid in oids]

    def absent(self, oids: list[bytes]) -> list[bytes]:
        """Those of ``oids`` not in this pack (in no particular order)."""
        positions = self._bulk(len(oids))
        if positions is None:
            return [oid for oid in oids if self.find(oid) is None]
        return list(set(oids).difference(positions))

    def offsets(self) -> tuple[int, ...]:
        """The pack offset of every object, by position (read in one go, for bulk use)."""
        if self._offsets is None:
            base = self._oid_base + 24 * self.count
            small: tuple[int, ...] = struct.unpack_from(f">{self.count}I", self._map, base)
            if small and max(small) & 0x80000000:  # large offsets: rare, read one by one
                small = tuple(self.offset(j) for j in range(self.count))
            self._offsets = small
        return self._offsets

    def offset(self, i: int) -> int:
        base = self._oid_base + 24 * self.count
        off: int = struct.unpack_from(">I", self._map, base + 4 * i)[0]
        if off & 0x80000000:
            large_base = base + 4 * self.count
            off = struct.unpack_from(">Q", self._map, large_base + 8 * (off & 0x7FFFFFFF))[0]
        return off

    def oid_at(self, i: int) -> bytes:
        return self._oid_at(i)

    def oids(self) -> Iterator[bytes]:
        for i in range(self.count):
            yield self._oid_at(i)

    def pread(self, length: int, offset: int) -> bytes:
        """Bytes of the pack file. Positional reads rather than a mapping: safe on several
        threads, and restoring a 1 GB pack does not grow the process by 1 GB of mapped pages."""
        if self._pack_fd < 0:
            with self._open_lock:
                if self._pack_fd < 0:
                    fd = os.open(self.pack_path, os.O_RDONLY | os.O_CLOEXEC)
                    # closed with this view too, not only by close(): a store dropped without
                    # invalidating its packs left one descriptor per pack open for good
                    self._close_pack = weakref.finalize(self, os.close, fd)
                    self.pack_size = os.fstat(fd).st_size
                    self._pack_fd = fd
        return os.pread(self._pack_fd, length, offset)

    def next_offset(self, i: int, pack_end: int) -> int:
        """Where the object after index entry ``i`` starts (objects are contiguous)."""
        if self._sorted_offsets is None:
            self._sorted_offsets = sorted(self.offsets())
        offsets = self._sorted_offsets
        k = bisect.bisect_right(offsets, self.offsets()[i])
        return offsets[k] if k < len(offsets) else pack_end

    def close(self) -> None:
        self._map.close()
        if self._close_pack is not None:
            self._close_pack()  # at most once, whoever asks first
            self._pack_fd = -1


class _OidView:
    """Sequence adapter so :func:`bisect.bisect_left` can search the mmapped oid table."""

    def __init__(self, index: PackIndex) -> None:
        self._index = index

    def __getitem__(self, i: int) -> bytes:
        return self._index._oid_at(i)

    def __len__(self) -> int:
        return self._index.count
