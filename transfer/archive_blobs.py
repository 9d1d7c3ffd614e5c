"""The store's blobs read in chunks for the archive writer, so memory stays flat whatever the
file sizes: straight from their pack, inflated in place from a read-only map made once per
export and shared by threads, as loose objects, or whole (deltas, objects only libgit2 can read).
Inflating goes through :func:`narrative.zstream.inflater` (ISA-L, about twice as fast as zlib):
inflating is most of an archive export's own work besides compressing.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from typing import Any

from narrative.errors import StoreCorrupted
from narrative.objects import object_header
from narrative.odb import ObjectStore
from narrative.packentry import parse_entry_header
from narrative.zstream import deflated_bound, inflater

from .archive import CHUNK

__all__ = [
    "BlobSource",
    "PackFiles",
]


def _inflate(read: Any, size: int, oid: bytes) -> Iterator[bytes]:
    """Chunks of a zlib stream (``read(n)`` gives compressed bytes), never more than
    :data:`transfer.archive.CHUNK` decompressed at a time, checked to total ``size``."""
    module, errors = inflater()
    dec = module.decompressobj()
    produced = 0
    # never read (much) past the end of the object (a stream of ours is within the bound):
    # small blobs would otherwise cost a 1 MiB read
    left = deflated_bound(size)
    while not dec.eof:
        try:
            if dec.unconsumed_tail:
                data = dec.decompress(dec.unconsumed_tail, CHUNK)
            else:
                want = min(CHUNK, left) if left > 0 else CHUNK
                raw = read(want)
                left -= len(raw)
                if not raw:
                    raise StoreCorrupted(f"object {oid.hex()} is truncated")
                data = dec.decompress(raw, CHUNK)
        except errors as exc:
            raise StoreCorrupted(f"object {oid.hex()} is corrupt: {exc}") from None
        produced += len(data)
        if produced > size:
            raise StoreCorrupted(f"object {oid.hex()} is longer than its header says")
        if data:
            yield data
    if produced != size:
        raise StoreCorrupted(f"object {oid.hex()} is shorter than its header says")


_RELEASE_EVERY = 8 << 20


class PackFiles:
    """Read-only maps of the packs blobs are read from, made once per export and shared by
    threads. Our own maps: gc may unlink a pack under us (a map keeps its file), and
    ObjectStore.invalidate() closes the store's descriptors. Inflating reads the map in place:
    no copy of the pack through ``pread`` (a sixth of an export's main thread). Every
    :data:`_RELEASE_EVERY` bytes read, the pages mapped so far are let go (``MADV_DONTNEED``,
    which for a file's read-only map only unmaps them: a later read maps them again from the
    page cache), so the process's resident memory stays flat however large the packs."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()
        self._read = 0

    def read(self, pack: memoryview, pos: int, n: int) -> memoryview:
        """Up to ``n`` bytes of ``pack`` (a :meth:`view`) from ``pos``, in place."""
        self._read += n  # unlocked: an approximate count is enough
        if self._read >= _RELEASE_EVERY:
            self._read = 0
            with self._lock:
                for mapped, _ in self._maps.values():
                    mapped.madvise(mmap.MADV_DONTNEED)
        return pack[pos : pos + n]

    def view(self, path: str) -> memoryview:
        found = self._maps.get(path)
        if found is None:
            with self._lock:
                found = self._maps.get(path)
                if found is None:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                    except ValueError:  # an empty file cannot be mapped
                        raise StoreCorrupted(f"pack {path} is empty") from None
                    finally:
                        os.close(fd)
                    found = self._maps[path] = (mapped, memoryview(mapped))
        return found[1]

    def __enter__(self) -> PackFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        # the maps are unmapped once no slice of them is left (a blob still being read)
        with self._lock:
            self._maps.clear()


class BlobSource:
    """A blob of the store read in chunks: from its pack, as a loose object, or (deltas,
    objects only libgit2 can read) whole."""

    def __init__(self, odb: ObjectStore, oid: bytes, packs: PackFiles) -> None:
        self.oid = oid
        self._packs = packs
        self._pack: tuple[memoryview, int] | None = None
        self._loose: str | None = None
        self._data: bytes | None = None
        self.size = self._locate(odb)

    def _locate(self, odb: ObjectStore) -> int:
        for attempt in range(2):
            found = odb.locate_packed(self.oid)
            if found is None:
                loose = odb.loose_path(self.oid)
                if os.path.exists(loose):
                    self._loose = loose
                    return self._loose_size(loose)
                return self._whole(odb)
            pack_path, start = found
            try:
                pack = self._packs.view(pack_path)
            except FileNotFoundError:  # repacked away since the index was read: look again
                if attempt == 0:
                    odb.invalidate()
                continue
            try:
                code, size, hlen = parse_entry_header(pack[start : start + 32])
            except ValueError:  # a damaged header, or one past the pack's end
                raise StoreCorrupted(f"object {self.oid.hex()} has a damaged entry") from None
            if code == 3:
                self._pack = (pack, start + hlen)
                return size
            if code in (6, 7):
                return self._whole(odb)
            raise StoreCorrupted(f"object {self.oid.hex()} is not a blob")
        return self._whole(odb)

    def _whole(self, odb: ObjectStore) -> int:
        kind, data = odb.read(self.oid)
        if kind != "blob":
            raise StoreCorrupted(f"object {self.oid.hex()} is not a blob")
        self._data = data
        return len(data)

    def _loose_size(self, path: str) -> int:
        module, errors = inflater()
        dec = module.decompressobj()
        head = b""
        with open(path, "rb") as f:
            while b"\x00" not in head and len(head) < 64:
                raw = f.read(64)
                if not raw:
                    break
                try:
                    head += dec.decompress(raw, 64 - len(head))
                except errors as exc:
                    raise StoreCorrupted(f"object {self.oid.hex()} is corrupt: {exc}") from None
        kind, _, size = head.partition(b"\x00")[0].partition(b" ")
        if kind != b"blob" or not size.isdigit():
            raise StoreCorrupted(f"object {self.oid.hex()} is not a blob")
        return int(size)

    def chunks(self) -> Iterator[bytes]:
        """The blob's content, in chunks of at most 1 MiB."""
        if self._data is not None:
            view = memoryview(self._data)
            for pos in range(0, len(view), CHUNK):
                yield bytes(view[pos : pos + CHUNK])
            return
        if self._pack is not None:
            pack, pos = self._pack

            def read(n: int) -> bytes | memoryview:
                nonlocal pos
                data = self._packs.read(pack, pos, n)
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
