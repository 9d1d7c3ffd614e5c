"""Taking in a received pack: parse, resolve deltas, verify every object, then store it.

The pack comes from outside (a bundle on some bucket), so nothing is trusted: the trailer
checksum is checked, every object is inflated and re-hashed, deltas are applied only to bases
that exist (in the pack or, for thin packs, in the store), sizes are bounded, and commits and
trees must parse. Only then are the objects written — as a fresh, delta-free pack of our own,
published atomically — so a refused pack leaves the store exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

from narrative.fsck import NAME_MAX, check_tree, object_problems
from narrative.objects import hash_object, object_header, parse_commit
from narrative.odb import ObjectStore, PackWriter
from narrative.packentry import parse_entry_header
from narrative.storeconfig import DEFAULT_MAX_IMPORT_SIZE
from narrative.zstream import deflate, deflated_bound, inflater

from .errors import InvalidArtifact

__all__ = ["DEFAULT_MAX_EXPANDED", "PackError", "PackTooLarge", "ReceivedPack", "receive_pack"]

DEFAULT_MAX_EXPANDED = DEFAULT_MAX_IMPORT_SIZE
"""Default limit on one object's size and on all objects' inflated size together."""
_TYPES = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}
_OFS_DELTA = 6
_REF_DELTA = 7
_CHUNK = 1 << 20
_BASE_CACHE = 64 << 20


_STREAM_BLOB = 16 << 20
"""Whole blobs larger than this are hashed and copied as streams, never held in memory."""


class _Slice:
    """Bytes ``start:end`` of a file, read as a stream."""

    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        self.f, self.pos, self.end = f, start, end

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        self.f.seek(self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


class PackError(InvalidArtifact):
    """The pack is malformed, truncated, corrupted or over a limit."""


class PackTooLarge(PackError):
    """The pack, one of its objects or all of them inflated are over a limit."""


_KEEP_SMALL = 64 << 10
_KEEP_BUDGET = 64 << 20


@dataclass
class ReceivedPack:
    """A verified pack whose objects wait in an unpublished writer.

    Nothing is visible in the store until :meth:`publish`; :meth:`abort` drops it all, so the
    caller can run its own checks (connectivity, refs, metadata) first.
    """

    objects: dict[bytes, str]
    """Type of every object in the pack."""
    links: dict[bytes, list[bytes]]
    """Objects each commit (tree, parents) and tree (entries) points to."""
    small: dict[bytes, bytes]
    """Content of commits, trees and small blobs (metadata records are read from here)."""
    writer: PackWriter
    trailer: bytes | None = None
    """The received pack's verified SHA-1 when the writer holds that very pack, byte for byte
    (every entry copied in order, none skipped): its trailer is then not computed again."""

    def publish(self) -> str | None:
        return self.writer.publish(trailer=self.trailer)

    def abort(self) -> None:
        self.writer.abort()

    def missing_below(self, tips: list[bytes], odb: ObjectStore) -> list[bytes]:
        """Objects reachable from ``tips`` that are neither in the pack nor in the store.

        An object already in the store is complete below it (the store's own invariant)."""
        missing: list[bytes] = []
        seen: set[bytes] = set()
        stack = list(tips)
        while stack:
            oid = stack.pop()
            if oid in seen:
                continue
            seen.add(oid)
            if oid in self.objects:
                stack.extend(self.links.get(oid, ()))
            elif not odb.exists(oid):
                missing.append(oid)
        return missing


class _Reader:
    """Random access to the spooled pack with a byte-bounded cache of inflated objects."""

    def __init__(self, f: BinaryIO, size: int, odb: ObjectStore, max_object: int) -> None:
        self.f = f
        self.size = size
        self.odb = odb
        self.max_object = max_object
        self.cache: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self.cached_bytes = 0
        self.by_oid: dict[bytes, int] = {}
        self.fd = f.fileno()  # positional reads: one syscall each, no seek, no buffer copy

    def header(self, offset: int) -> tuple[int, int, int]:
        """(type code, size, data offset) of the entry at ``offset``."""
        head = os.pread(self.fd, 32, offset)
        if not head:
            raise PackError("truncated pack")
        try:
            code, size, header_len = parse_entry_header(head)
        except ValueError:
            raise PackError("corrupt object header") from None
        if size > self.max_object:
            raise PackTooLarge(f"object of {size} bytes is over the limit of {self.max_object}")
        return code, size, offset + header_len

    def inflate_into(self, offset: int, size: int, sink: Callable[[bytes], object]) -> int:
        """Inflate the zlib stream at ``offset`` piece by piece into ``sink`` (memory stays
        bounded whatever the size); returns the offset after the stream."""
        self.f.seek(offset)
        module, errors = inflater()  # ISA-L: a third of an import's time was zlib's inflate
        dec = module.decompressobj()
        got = read = 0
        pending = b""
        # read (about) the object, not a whole chunk, which zlib then copied into unused_data
        # for every small object (most of an import's time, by profile); a longer stream is
        # read on in chunks
        expect = deflated_bound(size)
        while not dec.eof:
            if not pending:
                pending = self.f.read(min(_CHUNK, expect - read) if read < expect else _CHUNK)
                if not pending:
                    raise PackError("truncated object data")
                read += len(pending)
            try:
                out = dec.decompress(pending, _CHUNK)
            except errors as exc:
                raise PackError(f"corrupt object data: {exc}") from exc
            got += len(out)
            if got > size:
                raise PackError("object inflates past its declared size")
            if out:
                sink(out)
            pending = dec.unconsumed_tail
        if got != size:
            raise PackError("object is shorter than its declared size")
        return offset + read - len(dec.unused_data)

    def whole(self, offset: int, data_start: int, size: int) -> tuple[bytes, int, bytes | None]:
        """(content, end offset, the entry verbatim) of the whole object at ``offset``, read
        with one positional read and inflated with one call: the read covers any stream within
        :func:`narrative.zstream.deflated_bound` (the per-object seeks and reads of the streaming
        path were a fifth of an import).

        The entry is None for a stream longer than that bound (legal, but padded): the store's
        reader relies on the bound (:meth:`ObjectStore.read`), so such an object is deflated
        anew rather than copied."""
        bound = data_start + deflated_bound(size)
        span = os.pread(self.fd, min(bound, self.size) - offset, offset)
        module, errors = inflater()
        dec = module.decompressobj()
        try:
            # at most one byte past the declared size: a bomb stops there
            data: bytes = dec.decompress(memoryview(span)[data_start - offset :], size + 1)
        except errors as exc:
            raise PackError(f"corrupt object data: {exc}") from exc
        if len(data) > size:
            raise PackError("object inflates past its declared size")
        if not dec.eof:
            # truncated, or a legal but padded stream longer than the bound: the streaming
            # path reads on (and raises on what is really wrong)
            data, end = self._inflate(data_start, size)
            return data, end, None
        if len(data) != size:
            raise PackError("object is shorter than its declared size")
        end = len(span) - len(dec.unused_data)
        return data, offset + end, span[:end]

    def _inflate(self, offset: int, size: int) -> tuple[bytes, int]:
        """Inflate a zlib stream at ``offset``; returns data and the offset after it."""
        parts: list[bytes] = []
        end = self.inflate_into(offset, size, parts.append)
        return b"".join(parts), end

    def entry(self, offset: int, depth: int = 0) -> tuple[str, bytes, int]:
        """(type, content, end offset) of the object at ``offset``, deltas resolved."""
        if depth > 64:
            raise PackError("delta chain too deep")
        code, size, pos = self.header(offset)
        if code in _TYPES:
            data, end = self._inflate(pos, size)
            return _TYPES[code], data, end
        if code == _OFS_DELTA:
            self.f.seek(pos)
            raw = self.f.read(10)
            byte = raw[0]
            back, i = byte & 0x7F, 0
            while byte & 0x80:
                i += 1
                if i >= len(raw):
                    raise PackError("corrupt delta offset")
                byte = raw[i]
                back = ((back + 1) << 7) | (byte & 0x7F)
            base_offset = offset - back
            if base_offset < 12 or base_offset >= offset:
                raise PackError("delta base offset out of range")
            delta, end = self._inflate(pos + i + 1, size)
            kind, base = self._cached(base_offset, depth)
        elif code == _REF_DELTA:
            self.f.seek(pos)
            base_oid = self.f.read(20)
            delta, end = self._inflate(pos + 20, size)
            kind, base = self._base_by_oid(base_oid, depth)
        else:
            raise PackError(f"unknown object type {code}")
        return kind, _apply_delta(base, delta, self.max_object), end

    def _cached(self, offset: int, depth: int) -> tuple[str, bytes]:
        hit = self.cache.get(offset)
        if hit is not None:
            self.cache.move_to_end(offset)
            return hit
        kind, data, _end = self.entry(offset, depth + 1)
        self.cache[offset] = (kind, data)
        self.cached_bytes += len(data)
        while self.cached_bytes > _BASE_CACHE and len(self.cache) > 1:
            _off, (_k, old) = self.cache.popitem(last=False)
            self.cached_bytes -= len(old)
        return kind, data

    def _base_by_oid(self, oid: bytes, depth: int) -> tuple[str, bytes]:
        offset = self.by_oid.get(oid)
        if offset is not None:
            return self._cached(offset, depth)
        if self.odb.exists(oid):  # a thin pack: the base is one we already hold
            return self.odb.read(oid)
        raise PackError(f"delta base {oid.hex()} is neither in the pack nor in the store")


def _varint(delta: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(delta):
            raise PackError("truncated delta")
        byte = delta[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _apply_delta(base: bytes, delta: bytes, limit: int) -> bytes:
    source_size, pos = _varint(delta, 0)
    target_size, pos = _varint(delta, pos)
    if source_size != len(base):
        raise PackError("delta does not fit its base")
    if target_size > limit:
        raise PackTooLarge(f"object of {target_size} bytes is over the limit of {limit}")
    out = bytearray()
    end = len(delta)
    while pos < end:
        op = delta[pos]
        pos += 1
        if op & 0x80:
            offset = size = 0
            for bit in range(4):
                if op & (1 << bit):
                    offset |= delta[pos] << (8 * bit)
                    pos += 1
            for bit in range(3):
                if op & (0x10 << bit):
                    size |= delta[pos] << (8 * bit)
                    pos += 1
            size = size or 0x10000
            if offset + size > len(base):
                raise PackError("delta copies past the end of its base")
            out += base[offset : offset + size]
        elif op:
            out += delta[pos : pos + op]
            pos += op
        else:
            raise PackError("invalid delta opcode 0")
    if len(out) != target_size:
        raise PackError("delta result has the wrong size")
    return bytes(out)


def _links(kind: str, data: bytes, oid: bytes) -> list[bytes]:
    """What a commit or tree points to; PackError if ``git fsck --strict`` would reject it."""
    if kind == "tree":
        problems, links, too_long = check_tree(data)  # one parse, not three
    else:
        problems, links, too_long = object_problems(kind, data), [], []
    if problems:
        raise PackError(f"malformed {kind} {oid.hex()}: {'; '.join(problems)}")
    if kind == "commit":
        commit = parse_commit(data)
        return [commit.tree, *commit.parents]
    if kind == "tree":
        if too_long:
            raise PackError(
                f"tree {oid.hex()} holds a name of {len(too_long[0])} bytes, longer than file "
                f"systems allow ({NAME_MAX})"
            )
        return links
    return []


def receive_pack(
    stream: BinaryIO,
    odb: ObjectStore,
    max_object: int = DEFAULT_MAX_EXPANDED,
    max_total: int = 64 << 30,
    max_expanded: int = DEFAULT_MAX_EXPANDED,
) -> ReceivedPack:
    """Read a pack from ``stream`` and verify every object; nothing is stored until the
    caller publishes the returned :class:`ReceivedPack`.

    ``max_object`` bounds each object's size, ``max_total`` the pack's bytes and
    ``max_expanded`` the sum of every object's inflated size (decompression bombs). Large
    blobs are streamed: memory stays bounded whatever their size.

    Raises PackError (nothing stored) on any problem. Objects are checked individually here;
    whether the received history is complete is for the caller to check with
    :meth:`ReceivedPack.missing_below` (it knows the refs).
    """
    with tempfile.TemporaryFile(dir=odb.tmp_dir if os.path.isdir(odb.tmp_dir) else None) as spool:
        digest = hashlib.sha1()
        total = 0
        tail = b""
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            if total > max_total:
                raise PackTooLarge(f"pack is over the limit of {max_total} bytes")
            spool.write(chunk)
            data = tail + chunk
            digest_part, tail = data[:-20], data[-20:]
            digest.update(digest_part)
        if total < 32 or digest.digest() != tail:
            raise PackError("pack checksum mismatch (truncated or corrupted)")
        spool.seek(0)
        head = spool.read(12)
        if head[:4] != b"PACK" or struct.unpack(">I", head[4:8])[0] not in (2, 3):
            raise PackError("not a git pack")
        count = struct.unpack(">I", head[8:12])[0]
        reader = _Reader(spool, total - 20, odb, max_object)
        writer = PackWriter(odb)
        objects: dict[bytes, str] = {}
        links: dict[bytes, list[bytes]] = {}
        small: dict[bytes, bytes] = {}
        kept = expanded = 0
        # whether the writer holds the received pack byte for byte so far (version 2 header,
        # every entry copied in order: offsets then match, and so does the trailer)
        verbatim = head[4:8] == struct.pack(">I", 2)
        try:
            offset = 12
            for _ in range(count):
                if offset >= total - 20:
                    raise PackError("pack holds fewer objects than it declares")
                code, size, data_start = reader.header(offset)
                expanded += size
                if expanded > max_expanded:
                    raise PackTooLarge(
                        f"pack expands to more than the limit of {max_expanded} bytes"
                    )
                if _TYPES.get(code) == "blob" and size > _STREAM_BLOB:
                    digest_blob = hashlib.sha1(object_header("blob", size))
                    end = reader.inflate_into(data_start, size, digest_blob.update)
                    oid = digest_blob.digest()
                    reader.by_oid[oid] = offset
                    objects[oid] = "blob"
                    verbatim = False  # its header is written anew
                    if oid not in writer and not odb.exists(oid):
                        writer.add_stream(
                            "blob", oid, size, cast(IO[bytes], _Slice(spool, data_start, end))
                        )
                    offset = end
                    continue
                entry: bytes | None = None
                if code in _TYPES:
                    data, end, entry = reader.whole(offset, data_start, size)
                    kind = _TYPES[code]
                else:
                    kind, data, end = reader.entry(offset)
                oid = hash_object(kind, data)
                if kind != "blob":
                    links[oid] = _links(kind, data, oid)
                if kind != "blob" or (len(data) <= _KEEP_SMALL and kept < _KEEP_BUDGET):
                    small[oid] = data
                    kept += len(data)
                reader.by_oid[oid] = offset
                objects[oid] = kind
                if oid in writer or odb.exists(oid):
                    verbatim = False
                elif entry is not None:
                    # stored whole and verified: copy the entry as it is, no recompression
                    writer.add_entry(oid, entry)
                else:
                    verbatim = False
                    writer.add(kind, oid, len(data), deflate(data))
                offset = end
            if offset != total - 20:
                raise PackError("unexpected data after the last object")
        except BaseException:
            writer.abort()
            raise
    return ReceivedPack(objects, links, small, writer, tail if verbatim else None)
