"""The object database of the shadow store: pack writing and fast existence checks.

New objects are always written as a pack (one ``.pack`` + ``.idx`` per write batch) instead of
loose files: one file create and two fsyncs instead of tens of thousands of small files, and no
loose-object explosion. Objects are deflated once, by the caller's threads (ISA-L and zlib release
the GIL), at level 1, or stored uncompressed when a sample shows the data is incompressible
(:mod:`narrative.zstream`).

Whole (undeltified) objects, which is all this module ever writes, are read directly (inflated
by ISA-L, :func:`inflater`). Deltified objects (packs written by stock ``git gc``/``git
repack`` in the store) go to a library, loaded lazily: libgit2 (pygit2) when it imports, else
dulwich, pure Python, for platforms without a pygit2 wheel (:func:`fallback_reader` says which;
measurements in ``docs/decisions.md``). The snapshot fast path only needs
:meth:`ObjectStore.exists`, which reads pack indexes directly (:mod:`narrative.packindex`).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator

from .errors import StoreCorrupted
from .fsutil import fsync_dir, mkstemp, unlink_quiet
from .objects import hash_object, object_header, sha1
from .packentry import TYPE_CODES, pack_entry_header, parse_entry_header
from .packindex import PackIndex, encode_index
from .zstream import ISAL_MIN, deflate, deflated_bound, inflater

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import IO, Any

EMPTY_TREE_OID = bytes.fromhex("4b825dc642cb6eb9a060e54bf8d69288fbee4904")
"""The tree of no entries, which git reads without storing (``hash_object("tree", b"")``,
written out: importing this module hashes nothing, hashlib loads OpenSSL)."""

__all__ = ["EMPTY_TREE_OID", "ObjectStore", "PackWriter", "fallback_reader"]

_CODE_TYPES = {v: k for k, v in TYPE_CODES.items()}
_RUN_READ = 1 << 20
_FIRST_READ = 8192  # first pread of a packed object: the header and, often, all of its data

_fallback: dict[str, str] = {}


def fallback_reader() -> str:
    """Which library reads deltified objects in this process: ``"pygit2"`` when it imports (the
    ``fast`` extra; libgit2 reads deltas 1.1-1.3x faster, bench/bench_pack_read.py), else
    ``"dulwich"``."""
    if not _fallback:
        try:
            import pygit2  # noqa: F401
        except ImportError:
            _fallback["name"] = "dulwich"
        else:
            _fallback["name"] = "pygit2"
    return _fallback["name"]


class PackWriter:
    """Appends deflated objects to a temporary pack and publishes it atomically.

    Thread-safe: workers call :meth:`add` concurrently. Nothing is visible to readers until
    :meth:`publish` renames the finished ``.pack`` and then its ``.idx`` into ``objects/pack``
    (git ignores a pack without an index, so a crash at any point leaves only a temp file).
    """

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._opened: IO[bytes] | None = None
        self._tmp_path = ""
        self._offset = 12
        self._entries: dict[bytes, tuple[int, int]] = {}
        self._lock = threading.Lock()

    @property
    def _file(self) -> IO[bytes]:
        """The temporary pack, created with the first object (a no-op writes nothing)."""
        if self._opened is None:
            os.makedirs(self._store.tmp_dir, exist_ok=True)
            fd, self._tmp_path = mkstemp("pack-", self._store.tmp_dir)
            self._opened = os.fdopen(fd, "w+b")
            self._opened.write(b"PACK" + struct.pack(">II", 2, 0))
        return self._opened

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._entries

    def add(self, kind: str, oid: bytes, size: int, deflated: bytes) -> None:
        """Append one object whose zlib stream is ``deflated``; duplicates are dropped."""
        header = pack_entry_header(TYPE_CODES[kind], size)
        crc = zlib.crc32(deflated, zlib.crc32(header))
        with self._lock:
            if oid in self._entries:
                return
            self._file.write(header)
            self._file.write(deflated)
            self._entries[oid] = (self._offset, crc)
            self._offset += len(header) + len(deflated)

    def add_stream(self, kind: str, oid: bytes, size: int, deflated: IO[bytes]) -> None:
        """Like :meth:`add`, copying the zlib stream from a file object (large blobs)."""
        header = pack_entry_header(TYPE_CODES[kind], size)
        with self._lock:
            if oid in self._entries:
                return
            crc = zlib.crc32(header)
            self._file.write(header)
            length = len(header)
            while chunk := deflated.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
                self._file.write(chunk)
                length += len(chunk)
            self._entries[oid] = (self._offset, crc)
            self._offset += length

    def read_pending(self, oid: bytes) -> tuple[str, bytes] | None:
        """An object written to this (unpublished) pack, read back; None if not in it."""
        with self._lock:
            found = self._entries.get(oid)
            if found is None:
                return None
            self._file.flush()
            self._file.seek(found[0])
            code, size, header_len = parse_entry_header(self._file.read(32))
            self._file.seek(found[0] + header_len)
            dec = zlib.decompressobj()
            parts = []
            while not dec.eof:
                chunk = self._file.read(1 << 20)
                if not chunk:
                    break
                parts.append(dec.decompress(chunk))
            self._file.seek(0, os.SEEK_END)
        data = b"".join(parts)
        if len(data) != size:
            raise StoreCorrupted(f"pending object {oid.hex()} is damaged")
        return _CODE_TYPES[code], data

    def add_raw(self, kind: str, data: bytes, dedupe: bool = True) -> bytes:
        """Hash, deflate and append an object given as raw content; returns its oid.

        With ``dedupe`` objects the store already holds are skipped."""
        oid = hash_object(kind, data)
        if oid not in self._entries and not (dedupe and self._store.exists(oid)):
            self.add(kind, oid, len(data), deflate(data))
        return oid

    def add_entry(self, oid: bytes, entry: bytes) -> None:
        """Append a complete pack entry (header + zlib stream) copied from another pack."""
        with self._lock:
            if oid in self._entries:
                return
            self._file.write(entry)
            self._entries[oid] = (self._offset, zlib.crc32(entry))
            self._offset += len(entry)

    def abort(self) -> None:
        """Discard everything written so far (also after a failed :meth:`publish`)."""
        if self._opened is None:
            return
        with contextlib.suppress(OSError):  # on a full disk, flushing the buffer fails: drop it
            self._opened.close()
        unlink_quiet(self._tmp_path)
        unlink_quiet(self._tmp_path + ".idx")

    def publish(self, durable: bool = True, trailer: bytes | None = None) -> str | None:
        """Finish the pack and move it into the store; returns its name, or None if empty.

        ``trailer``: the pack's SHA-1, when the caller wrote, byte for byte, a pack whose
        trailer it verified (a received pack copied whole), so it is not hashed again."""
        if not self._entries:
            self.abort()
            return None
        f = self._file
        f.seek(8)
        f.write(struct.pack(">I", len(self._entries)))
        f.flush()
        if trailer is not None:
            pack_sha = trailer
        else:
            # The trailer hashes the whole file, header included, so it is computed after
            # patching the object count: one sequential re-read, mostly from the page cache.
            digest = sha1()
            f.seek(0)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            pack_sha = digest.digest()
        f.seek(0, os.SEEK_END)
        f.write(pack_sha)
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        idx_tmp = self._tmp_path + ".idx"
        with open(idx_tmp, "wb") as idx:
            idx.write(encode_index(self._entries, pack_sha))
            idx.flush()
            if durable:
                os.fsync(idx.fileno())
        name = "pack-" + pack_sha.hex()
        pack_dir = self._store.pack_dir
        os.makedirs(pack_dir, exist_ok=True)
        os.replace(self._tmp_path, os.path.join(pack_dir, name + ".pack"))
        os.replace(idx_tmp, os.path.join(pack_dir, name + ".idx"))
        if durable:
            fsync_dir(pack_dir)
        self._store.invalidate()
        return name


class ObjectStore:
    """Existence checks and raw reads over loose objects and packs of one git dir."""

    def __init__(self, git_dir: str) -> None:
        self.git_dir = git_dir
        self.objects_dir = os.path.join(git_dir, "objects")
        self.pack_dir = os.path.join(self.objects_dir, "pack")
        self.tmp_dir = os.path.join(git_dir, "narrative", "tmp")
        self._indexes: dict[str, PackIndex] | None = None
        self._order: list[PackIndex] = []
        self._order_of: dict[str, PackIndex] | None = None  # the listing _order is of
        self._loose_dirs: set[str] | None = None
        self._repo: Any = None
        self._dulwich: Any = None
        # dulwich fills its pack list lazily and unlocked: threads racing on a fresh store find
        # objects "missing" (restores read on several threads), so its reads go one at a time
        self._dulwich_lock = threading.Lock()
        self._close_dulwich: Callable[[], Any] | None = None

    def invalidate(self) -> None:
        """Forget cached pack indexes (new packs appeared or old ones were removed)."""
        if self._indexes:
            for idx in self._indexes.values():
                idx.close()
        self._indexes = None
        self._loose_dirs = None
        self._repo = None
        with self._dulwich_lock:
            if self._close_dulwich is not None:
                self._close_dulwich()
            self._dulwich = self._close_dulwich = None

    def _pack_indexes(self) -> dict[str, PackIndex]:
        if self._indexes is None:
            self._indexes = {}
            try:
                names = os.listdir(self.pack_dir)
            except FileNotFoundError:
                names = []
            for name in sorted(names):
                if name.endswith(".idx") and name[:-4] + ".pack" in names:
                    path = os.path.join(self.pack_dir, name)
                    try:
                        self._indexes[path] = PackIndex(path)
                    except (FileNotFoundError, ValueError):
                        # a pack being removed by gc at this instant; any other failure (out
                        # of descriptors, no permission) is raised: skipping the pack would
                        # report its objects missing ("unknown snapshot"), not the failure
                        continue
        return self._indexes

    def loose_path(self, oid: bytes) -> str:
        """Where ``oid`` is (or would be) stored as a loose object."""
        hexed = oid.hex()
        return os.path.join(self.objects_dir, hexed[:2], hexed[2:])

    def _loose_fanout(self) -> set[str]:
        if self._loose_dirs is None:
            try:
                self._loose_dirs = {
                    n for n in os.listdir(self.objects_dir) if len(n) == 2 and n != "pa"
                }
            except FileNotFoundError:
                self._loose_dirs = set()
        return self._loose_dirs

    def _exists_once(self, oid: bytes) -> bool:
        if any(idx.find(oid) is not None for idx in self._largest_first()):
            return True
        # Skip the stat when no loose object shares the first byte (the common case here).
        if oid[:1].hex() not in self._loose_fanout():
            return False
        return os.path.exists(self.loose_path(oid))

    def exists(self, oid: bytes) -> bool:
        """Whether the store holds ``oid``, as of the last :meth:`invalidate`.

        Packs published by other processes afterwards are not seen; the worst outcome is a
        duplicate object, never a missing one.
        """
        return self._exists_once(oid)

    def missing(self, oids: Iterable[bytes]) -> list[bytes]:
        """Those of ``oids`` the store does not hold (as :meth:`exists` sees it), looked up in
        bulk: a full export asks about every object of its packs."""
        left = list(oids)
        for idx in self._largest_first():
            if left:
                left = idx.absent(left)
        return sorted(oid for oid in left if not self._exists_once(oid))  # loose ones, or none

    def _largest_first(self) -> list[PackIndex]:
        """The pack indexes, biggest (likeliest to hold an oid) first; cached per listing."""
        indexes = self._pack_indexes()
        if self._order_of is not indexes or len(self._order) != len(indexes):
            self._order = sorted(indexes.values(), key=lambda idx: -idx.count)
            self._order_of = indexes
        return self._order

    def write_loose(self, kind: str, data: bytes) -> bytes:
        """Write one small object as a loose file (fsynced, then renamed); returns its oid."""
        oid = hash_object(kind, data)
        if self.exists(oid):
            return oid
        path = self.loose_path(oid)
        os.makedirs(self.tmp_dir, exist_ok=True)
        fd, tmp = mkstemp("obj-", self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(zlib.compress(object_header(kind, len(data)) + data, 1))
                f.flush()
                os.fsync(f.fileno())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        except BaseException:
            unlink_quiet(tmp)
            raise
        self._loose_fanout().add(oid[:1].hex())
        return oid

    def pack_count(self) -> int:
        """Number of packs currently in the store."""
        return len(self._pack_indexes())

    def repo(self) -> Any:
        """A pygit2 Repository on this git dir, loaded on first use (ImportError without pygit2;
        the store itself never needs it, see :func:`fallback_reader`)."""
        if self._repo is None:
            from ._pygit2 import open_repository

            self._repo = open_repository(self.git_dir)
        return self._repo

    def _fallback_store(self) -> Any:
        if self._dulwich is None:
            from ._dulwich import open_object_store

            store = open_object_store(self.git_dir)
            # closed with this object or at exit at the latest: an unclosed dulwich store warns
            # (ResourceWarning) when collected, and prints tracebacks at interpreter shutdown
            self._close_dulwich = weakref.finalize(self, store.close)
            self._dulwich = store
        return self._dulwich

    def read(self, oid: bytes) -> tuple[str, bytes]:
        """Type and content of an object; StoreCorrupted if missing or unreadable. The empty
        tree reads as such whether it is stored or not, as in git (an emptied directory is
        remembered as holding it before any snapshot wrote it)."""
        if oid == EMPTY_TREE_OID:
            return "tree", b""
        try:
            if oid[:1].hex() not in self._loose_fanout():
                # no loose object shares the first byte (as of the last invalidate): skip the
                # failed open; one written since is still found by the library fallback below
                raise FileNotFoundError
            with open(self.loose_path(oid), "rb") as f:
                raw = zlib.decompress(f.read())
            header, _, data = raw.partition(b"\x00")
            kind = header.split(b" ")[0].decode()
            return kind, data
        except FileNotFoundError:
            pass
        except zlib.error as exc:
            raise StoreCorrupted(f"corrupt loose object {oid.hex()}: {exc}") from exc
        for _attempt in range(2):
            try:
                found = self._read_whole_packed(oid)
            except FileNotFoundError:
                # the pack was merged into another and removed since our listing (a concurrent
                # snapshot consolidated small packs): list the packs again
                self.invalidate()
                continue
            if found is not None:
                return found
            break
        return self._read_with_library(oid)

    def _read_whole_packed(self, oid: bytes) -> tuple[str, bytes] | None:
        """An undeltified packed object; None when it is not packed whole in a known pack."""
        for idx in self._largest_first():
            i = idx.find(oid)
            if i is not None:
                return self._read_packed(idx, i)
        return None

    def _read_packed(self, idx: PackIndex, i: int) -> tuple[str, bytes] | None:
        """Read an undeltified packed object directly; None for deltas (read by a library).

        zlib and ISA-L release the GIL, so restores can inflate on several threads at once.
        """
        start = idx.offset(i)
        first = idx.pread(_FIRST_READ, start)
        try:
            code, size, header_len = parse_entry_header(first[:32])
        except ValueError:
            raise StoreCorrupted(
                f"corrupt object {idx.oid_at(i).hex()} in {idx.pack_path}"
            ) from None
        if code not in _CODE_TYPES:
            return None
        # the whole stream, without locating the next object (see deflated_bound)
        data_start = start + header_len
        end = min(data_start + deflated_bound(size), idx.pack_size - 20)
        if end <= start + len(first):
            stream = first[header_len : end - start]  # small objects: one read, not two
        else:
            stream = idx.pread(end - data_start, data_start)
        module, errors = (zlib, (zlib.error,)) if size < ISAL_MIN else inflater()
        try:
            # one call, into a buffer of the known size (capped against forged headers)
            data: bytes = module.decompress(stream, 15, min(size, 1032 * len(stream)) or 1)
        except errors as exc:
            raise StoreCorrupted(
                f"corrupt object {idx.oid_at(i).hex()} in {idx.pack_path}"
            ) from exc
        if len(data) != size:
            raise StoreCorrupted(f"corrupt object {idx.oid_at(i).hex()} in {idx.pack_path}")
        return _CODE_TYPES[code], data

    def raw_entry(self, oid: bytes) -> bytes | None:
        """The undeltified pack entry of ``oid`` verbatim, for copying without recompression."""
        try:
            return self._raw_entry_once(oid)
        except FileNotFoundError:  # its pack was removed since our listing: list them again
            self.invalidate()
            return self._raw_entry_once(oid)

    def _raw_entry_once(self, oid: bytes) -> bytes | None:
        for idx in self._pack_indexes().values():
            i = idx.find(oid)
            if i is None:
                continue
            start = idx.offset(i)
            if ((idx.pread(1, start)[0] >> 4) & 7) not in _CODE_TYPES:
                return None
            return idx.pread(idx.next_offset(i, idx.pack_size - 20) - start, start)
        return None

    def raw_runs(self, oids: Iterable[bytes]) -> Iterator[tuple[list[bytes], bytes]]:
        """Stored pack entries of ``oids``, in pack order, as runs: (the oids of a run of
        neighbouring undeltified entries, those entries back to back, verbatim). One positional
        read of up to 1 MiB per run and no per-entry slices, so a full export copies each byte
        once on its way out. Objects left out (loose, deltified, or in a pack removed
        meanwhile) are for :meth:`raw_entry` / :meth:`read`.

        Raises:
            StoreCorrupted: A pack is shorter than its index says.
        """
        by_pack: list[tuple[PackIndex, list[tuple[int, int, bytes]]]] = []
        left = list(oids)
        for idx in self._largest_first():
            if not left:
                break
            wanted, rest = [], []
            offsets = idx.offsets()
            for oid, i in zip(left, idx.find_many(left), strict=True):
                if i is None:
                    rest.append(oid)
                else:
                    wanted.append((offsets[i], i, oid))
            if wanted:
                by_pack.append((idx, wanted))
            left = rest
        try:
            for idx, wanted in by_pack:
                idx.pread(0, 0)  # opens the pack, which sets its size
                wanted.sort()
                run: list[tuple[int, int, bytes]] = []
                for item in wanted:
                    end = idx.next_offset(item[1], idx.pack_size - 20)
                    if run and (run[-1][1] != item[0] or end - run[0][0] > _RUN_READ):
                        yield from self._whole_parts(idx, run)
                        run = []
                    run.append((item[0], end, item[2]))
                yield from self._whole_parts(idx, run)
        except FileNotFoundError:  # a pack removed under us: the rest goes one by one
            self.invalidate()

    @staticmethod
    def _whole_parts(
        idx: PackIndex, run: list[tuple[int, int, bytes]]
    ) -> Iterator[tuple[list[bytes], bytes]]:
        """One read of a run of neighbouring entries, split around its deltified ones."""
        if not run:
            return
        base = run[0][0]
        data = idx.pread(run[-1][1] - base, base)
        if len(data) != run[-1][1] - base:
            raise StoreCorrupted(f"{idx.pack_path} is truncated")
        part: list[bytes] = []
        part_start = part_end = 0
        for start, end, oid in run:
            if ((data[start - base] >> 4) & 7) in _CODE_TYPES:
                if not part:
                    part_start = start - base
                part.append(oid)
                part_end = end - base
            elif part:  # a delta: the run so far goes out whole, the delta is left out
                yield part, data[part_start:part_end]
                part = []
        if part:
            whole = part_start == 0 and part_end == len(data)  # the common case: no copy
            yield part, data if whole else data[part_start:part_end]

    def _read_with_library(self, oid: bytes) -> tuple[str, bytes]:
        try:
            if fallback_reader() == "pygit2":
                from ._pygit2 import read_object

                return read_object(self.repo(), oid)
            from ._dulwich import read_object as dulwich_read_object

            with self._dulwich_lock:
                return dulwich_read_object(self._fallback_store(), oid)
        except KeyError:
            raise StoreCorrupted(f"object {oid.hex()} is missing from the store") from None

    def locate_packed(self, oid: bytes) -> tuple[str, int] | None:
        """The pack file holding ``oid`` and the offset of its entry there, as of the last
        :meth:`invalidate`; None when no known pack has it (it may be loose, or packed since)."""
        for idx in list(self._pack_indexes().values()):
            i = idx.find(oid)
            if i is not None:
                return idx.pack_path, idx.offset(i)
        return None

    def pack_index_paths(self) -> list[str]:
        """Index paths of the packs known as of the last :meth:`invalidate`."""
        return list(self._pack_indexes())

    def pack_oids(self, idx_path: str) -> list[bytes]:
        """Every oid in one pack, by the path of its index."""
        idx = self._pack_indexes().get(idx_path)
        return list(idx.oids()) if idx is not None else []
