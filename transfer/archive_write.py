"""Writing the archive of one snapshot (:func:`write_archive`), streaming.

The compressed stream has two parts back to back — two gzip members, or two zstd frames, which
every gzip/zstd reader (and ``tar -xzf`` / ``tar --zstd -xf``) decompresses as one: the
manifest's member first, then the file members and the end of the archive. That lets the writer
compress the files before it knows the manifest: by default it makes one pass over the blobs,
hashing them while their members are compressed into an unnamed temporary file, then writes the
manifest part and copies that file (every blob is inflated once, which is what keeps the export
near ``tar | zstd``). When the store already knows the size and sha256 of most of the contents
(:mod:`narrative.blobdigests`: an earlier export hashed them), the rest are hashed first and the
archive is compressed straight into the output in one pass, without that copy; ``spool=False``
always does so (hashing what is not known, then compressing) and produces the same bytes.
Output is deterministic: fixed mtime (the snapshot's time), uid/gid 0, no owner names, gzip
headers without name or time, and compressed data that depends only on the content and the
level.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import struct
import tarfile
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from narrative.blobdigests import BlobDigests
from narrative.errors import InvalidInput, StoreCorrupted
from narrative.jsonio import parse_json
from narrative.models import Snapshot
from narrative.objects import MODE_EXEC, MODE_LINK, hash_object
from narrative.odb import ObjectStore
from narrative.store import Store
from narrative.trees import flatten_tree

from .archive import (
    ARCHIVE_FORMATS,
    CHUNK,
    DEFAULT_LEVELS,
    FILES_PREFIX,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MODE_NAMES,
    ArchiveError,
)
from .archive_blobs import BlobSource, PackFiles
from .archive_codec import CountingWriter, GzipSink, ZstdSink
from .archive_manifest import ArchiveManifest, check_header, manifest_tree
from .archive_rules import check_links
from .errors import IncompleteExport

__all__ = [
    "ArchiveStats",
    "default_workers",
    "tar_header",
    "write_archive",
]


_BATCH = 128 << 10  # tests/transfer/test_archive.py puts file sizes at this boundary
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE

logger = logging.getLogger(__name__)


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


_USTAR_LIMIT = 8**11  # largest size/mtime a plain ustar number field holds
# name, mode, uid+gid, size+mtime, checksum, type, linkname, magic ("s" pads with NULs)
_USTAR_HEAD = struct.Struct("100s8s16s24s8s1s100s8s")
_USTAR_IDS = b"0000000\x000000000\x00"
_USTAR_TAIL = b"\x00" * (_BLOCK - _USTAR_HEAD.size)


def tar_header(
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
        # The checksum is the sum of the header's bytes. adler32's low half is 1 + that sum
        # modulo 65521, exact here (at most 265 ASCII bytes: below 34,000) and 15x faster
        # than sum() over the bytes, which was a tenth of the header's cost.
        checksum = (zlib.adler32(head) & 0xFFFF) - 1
        return head[:148] + b"%06o\x00" % checksum + head[155:] + _USTAR_TAIL
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


def default_workers() -> int:
    """Compression and hashing threads: the CPUs, 2 to 8."""
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
        spool: True (default): when the store does not know the size and sha256 of more
            than a quarter of the contents (:class:`~narrative.blobdigests.BlobDigests`), one
            pass over the blobs, hashing while the file members are compressed into an
            unnamed temporary file in the store's tmp directory (as large as the compressed
            archive), then the manifest and that file are written out; else as False.
            False: the contents not known are hashed first, then everything is compressed
            straight into ``out`` — no temporary file, and a slow ``out`` (an upload)
            overlaps the compression, at the cost of inflating the blobs not known twice.
            Either way the digests hashed are kept in the store for the next export.

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
    workers = default_workers()
    counting = CountingWriter(out)
    writer = _MemberWriter(fmt, level, workers, _mtime(snapshot.created_at))

    def make_manifest(files: list[dict[str, Any]], links: dict[str, str]) -> ArchiveManifest:
        check_links(links)
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
            check_header(parse_json(json.dumps(header)))
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

    with store.lock("gc", shared=True), writer, PackFiles() as packs:
        flat = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
        digests = BlobDigests.load(store.git_dir)
        unknown = {
            path: (mode, oid)
            for path, (mode, oid) in flat.items()
            if mode == MODE_LINK or digests.get(oid) is None  # a link's target is checked
        }
        if spool and 4 * len(unknown) > len(flat):
            os.makedirs(store.odb.tmp_dir, exist_ok=True)
            # unnamed (O_TMPFILE where available): nothing is left behind, even by kill -9
            with tempfile.TemporaryFile(dir=store.odb.tmp_dir, prefix="archive-") as tmp:
                files, links = writer.members(store.odb, packs, flat, CountingWriter(tmp), None)
                manifest = make_manifest(files, links)
                writer.finish(manifest)
                writer.write_manifest(counting, manifest)
                tmp.seek(0)
                while chunk := tmp.read(CHUNK):
                    counting.write(chunk)
            hashed = files
        else:
            # known contents are not hashed again, the rest before: one pass straight out
            hashed, links = _hash_pass(store.odb, packs, unknown, workers)
            files = _entries(flat, hashed, digests)
            manifest = make_manifest(files, links)
            writer.write_manifest(counting, manifest)
            writer.members(store.odb, packs, flat, counting, manifest.files)
            writer.finish(manifest)
        for entry in hashed:
            digests.add(bytes.fromhex(entry["blob"]), entry["size"], bytes.fromhex(entry["sha256"]))
        digests.save()
    bytes_in = sum(entry["size"] for entry in files)
    logger.debug("archived %s: %d files, %d content bytes", snapshot.id, len(files), bytes_in)
    return ArchiveStats(len(files), bytes_in, counting.count)


def _entries(
    flat: dict[str, tuple[int, bytes]], hashed: list[dict[str, Any]], digests: BlobDigests
) -> list[dict[str, Any]]:
    """Manifest entries in tree order: those ``hashed``, the rest from ``digests``."""
    by_path = {entry["path"]: entry for entry in hashed}
    files: list[dict[str, Any]] = []
    for path, (mode, oid) in flat.items():
        entry = by_path.get(path)
        if entry is None:
            known = digests.get(oid)
            assert known is not None  # what is not known was hashed (or refused, a submodule)
            entry = _manifest_entry(path, mode, oid, known[0], known[1].hex())
        files.append(entry)
    return files


def _mode_name(path: str, mode: int) -> str:
    """The manifest's name of ``mode``; ArchiveError for one an archive cannot hold."""
    name = MODE_NAMES.get(mode)
    if name is None:
        raise ArchiveError(f"snapshot entry {path} has mode {mode:o}, which archives cannot hold")
    return name


def _manifest_entry(path: str, mode: int, oid: bytes, size: int, sha256: str) -> dict[str, Any]:
    return {
        "path": path,
        "mode": _mode_name(path, mode),
        "size": size,
        "sha256": sha256,
        "blob": oid.hex(),
    }


def _hash_one(
    odb: ObjectStore, packs: PackFiles, path: str, mode: int, oid: bytes
) -> tuple[dict[str, Any], str]:
    """A manifest entry (sha256 streamed chunk by chunk) and, for symlinks, the target."""
    _mode_name(path, mode)
    source = BlobSource(odb, oid, packs)
    digest = hashlib.sha256()
    target = ""
    if mode == MODE_LINK:
        data = b"".join(source.chunks())
        digest.update(data)
        target = os.fsdecode(data)
    else:
        for chunk in source.chunks():
            digest.update(chunk)
    return _manifest_entry(path, mode, oid, source.size, digest.hexdigest()), target


def _hash_pass(
    odb: ObjectStore, packs: PackFiles, flat: dict[str, tuple[int, bytes]], workers: int
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
        self._sink: GzipSink | ZstdSink | None = None
        self._offset = 0
        self._manifest: tuple[ArchiveManifest, bytes] | None = None
        # one buffer for the whole export: clearing and regrowing a bytearray costs an mremap
        # and fresh page faults per batch (thousands per export)
        self._batch = bytearray(_BATCH)
        self._batched = 0

    def __enter__(self) -> _MemberWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the member part's compressor if an error left it open."""
        if self._sink is not None and exc[0] is not None:
            self._sink.abort()
        self._sink = None

    def _open(self, target: CountingWriter) -> GzipSink | ZstdSink:
        if self.fmt == "tar.gz":
            return GzipSink(target, self.level, self.workers)
        return ZstdSink(target, self.level, self.workers)

    def _manifest_part(self, manifest: ArchiveManifest) -> bytes:
        """The manifest's tar member, encoded once (both parts need it: ~10 MB of JSON for
        50,000 files)."""
        if self._manifest is None or self._manifest[0] is not manifest:
            document = manifest.encode()
            header = tar_header(MANIFEST_NAME, 0o644, len(document), self.mtime)
            self._manifest = (manifest, header + document + _padding(len(document)))
        return self._manifest[1]

    def write_manifest(self, target: CountingWriter, manifest: ArchiveManifest) -> None:
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
        packs: PackFiles,
        flat: dict[str, tuple[int, bytes]],
        target: CountingWriter,
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
                _mode_name(path, mode)
                source = BlobSource(odb, oid, packs)
                digest = hashlib.sha256() if known is None else None
                name = FILES_PREFIX + path
                if mode == MODE_LINK:
                    data = b"".join(source.chunks())
                    links[path] = os.fsdecode(data)
                    if digest is not None:
                        digest.update(data)
                    link = tar_header(name, 0o777, 0, self.mtime, tarfile.SYMTYPE, links[path])
                    self._emit(link)
                else:
                    size = source.size if known is None else known[i]["size"]
                    file_mode = 0o755 if mode == MODE_EXEC else 0o644
                    self._emit(tar_header(name, file_mode, size, self.mtime))
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
                    files.append(_manifest_entry(path, mode, oid, source.size, digest.hexdigest()))
        except BaseException:
            sink.abort()
            raise
        return (files if known is None else known), links

    def _emit(self, data: bytes) -> None:
        """Queue bytes of the member part; small pieces (headers, small files) are batched
        into one compressor call."""
        size = len(data)
        self._offset += size
        if self._batched + size > _BATCH:
            self._flush()
        if size >= _BATCH:
            assert self._sink is not None
            self._sink.write(data)
            return
        self._batch[self._batched : self._batched + size] = data
        self._batched += size

    def _flush(self) -> None:
        if self._batched:
            assert self._sink is not None
            with memoryview(self._batch)[: self._batched] as view:
                self._sink.write(view)
            self._batched = 0

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
