"""Reading an archive into the store (:func:`read_archive`), trusting nothing.

The manifest is validated before any data is touched; every member must be listed, typed and
sized as the manifest says, obey the rules of :mod:`transfer.archive_rules`, and its content
must hash to both the manifest's sha256 and git blob id. Decompressed bytes are counted against
limits derived from the manifest, so a decompression bomb stops early. Objects go into one pack
that is published only once the whole archive, including the rebuilt root tree, has been
verified; any failure aborts it and leaves the store exactly as it was. Nothing else is written
to disk.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import zstandard

from narrative.fsck import object_problems
from narrative.jsonio import parse_json
from narrative.objects import object_header
from narrative.odb import ObjectStore, PackWriter
from narrative.store import Store
from narrative.zstream import deflate

from .archive import CHUNK, FILES_PREFIX, MANIFEST_NAME, ArchiveError
from .archive_codec import Limited, LimitExceeded, ZstdFrames, decompressor, read_exact
from .archive_manifest import ArchiveManifest, manifest_tree
from .archive_rules import check_links, check_member_name, member_kind, path_bytes
from .packin import DEFAULT_MAX_EXPANDED

__all__ = [
    "ArchiveImport",
    "read_archive",
]


_STREAM_THRESHOLD = 8 << 20  # members above this are spooled, never held whole
_TAR_BUFSIZE = 64 << 10  # tarfile's read-ahead: the slack every read limit allows
_MAX_TRAILING = 1 << 20  # zero padding tolerated after the end-of-archive blocks
_BLOCK = tarfile.BLOCKSIZE


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


class _Intake:
    """Verifies members against the manifest and writes their blobs into one pack."""

    def __init__(self, odb: ObjectStore, manifest: ArchiveManifest) -> None:
        self.odb = odb
        self.expected = {entry["path"]: entry for entry in manifest.files}
        self.seen: set[str] = set()
        self.links: dict[str, str] = {}
        self.writer = PackWriter(odb)

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, reader: Limited) -> None:
        path = check_member_name(info.name)
        refusal = member_kind(info)
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
            data = path_bytes(target)
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
            data = read_exact(f, info.size)
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
        with tempfile.SpooledTemporaryFile(max_size=4 * CHUNK) as spool:
            while got < size:
                chunk = f.read(min(CHUNK, size - got))
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
        check_links(self.links)
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
    document = read_exact(f, info.size)
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
        longest = max(longest, len(path_bytes(entry["path"])) + link)
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
    decompressed, frames = decompressor(stream)
    limited = Limited(decompressed, max_manifest + 16 * _BLOCK + 2 * _TAR_BUFSIZE)
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
    except LimitExceeded:
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
    limited: Limited,
    per_header: int,
    frames: ZstdFrames | None,
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


def _drain(tar: tarfile.TarFile, limited: Limited) -> None:
    """Read what follows the end-of-archive blocks to the end of the compressed stream (this
    checks the gzip CRC, or that the zstd frame is complete): zero padding only, bounded."""
    # what tarfile already read ahead (its stream buffer) counts as trailing data too
    buffered = getattr(getattr(tar, "fileobj", None), "buf", b"")
    if isinstance(buffered, bytes) and buffered.count(0) != len(buffered):
        raise ArchiveError("archive has data after its end")
    limited.allow(_MAX_TRAILING + 2 * _TAR_BUFSIZE)
    while chunk := limited.read(CHUNK):
        if chunk.count(0) != len(chunk):
            raise ArchiveError("archive has data after its end")
