"""Writing git bundles (v2) straight from the store, without the ``git`` CLI.

A bundle is a short text header (prerequisite commits the receiver must already have, then the
refs it carries) followed by one pack. Objects are chosen by walking the selected commits back to
the prerequisites and diffing each commit's tree against its parent's, so an incremental bundle
after a one-file change holds one blob, the trees on its path and one commit. Pack entries are
copied verbatim from the store's packs (no recompression, no delta search): exporting is mostly
sequential I/O, and stock git reads the result (``git bundle verify``, ``git fetch``).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from narrative.objects import MODE_DIR, hash_object, parse_commit, parse_tree
from narrative.odb import ObjectStore, deflate, pack_entry_header, pack_object_header

from .errors import InvalidArtifact

__all__ = [
    "BUNDLE_SIGNATURE",
    "BundleFormatError",
    "BundleHeader",
    "BundleStats",
    "collect_objects",
    "read_bundle_header",
    "write_bundle",
]

BUNDLE_SIGNATURE = b"# v2 git bundle\n"
_GITLINK = 0o160000


@dataclass(frozen=True)
class BundleStats:
    """What a written bundle holds."""

    refs: dict[str, str]
    prerequisites: list[str]
    objects: int
    size: int


def _tree_entries(odb: ObjectStore, oid: bytes | None) -> dict[bytes, tuple[int, bytes]]:
    if oid is None:
        return {}
    kind, data = odb.read(oid)
    if kind != "tree":
        raise ValueError(f"{oid.hex()} is not a tree")
    return {name: (mode, child) for name, mode, child in parse_tree(data)}


def _new_tree_objects(
    odb: ObjectStore,
    new: bytes,
    old: bytes | None,
    out: dict[bytes, None],
    bases: dict[bytes, bytes] | None,
) -> None:
    """Add ``new`` and everything below it that is not also in ``old`` at the same place.

    With ``bases`` (the old tree is known to the receiver), a changed file's previous blob is
    remembered as a delta base for it.
    """
    if new == old or new in out:
        return
    out[new] = None
    before = _tree_entries(odb, old)
    for name, (mode, oid) in _tree_entries(odb, new).items():
        prev = before.get(name)
        if prev is not None and prev[1] == oid:
            continue
        if mode == MODE_DIR:
            old_sub = prev[1] if prev is not None and prev[0] == MODE_DIR else None
            _new_tree_objects(odb, oid, old_sub, out, bases)
        elif mode != _GITLINK:
            out.setdefault(oid, None)
            if bases is not None and prev is not None and prev[0] == mode:
                bases.setdefault(oid, prev[1])


def collect_objects(
    odb: ObjectStore,
    tips: Iterable[bytes],
    haves: Iterable[bytes],
    bases: dict[bytes, bytes] | None = None,
) -> list[bytes]:
    """Every object reachable from ``tips`` and not from ``haves`` (commits the receiver has).

    Trees are diffed against the first parent's tree; a blob that moved between directories may
    be sent again, which the receiver tolerates (it already holds it). When ``bases`` is given,
    it is filled with new blob → previous version, for commits whose parent the receiver has.
    """
    have = set(haves)
    out: dict[bytes, None] = {}
    stack = [t for t in tips if t not in have]
    seen: set[bytes] = set()
    while stack:
        oid = stack.pop()
        if oid in seen or oid in have:
            continue
        seen.add(oid)
        kind, data = odb.read(oid)
        if kind != "commit":
            raise ValueError(f"{oid.hex()} is not a commit")
        commit = parse_commit(data)
        out[oid] = None
        parent_tree = None
        if commit.parents:
            parent_tree = parse_commit(odb.read(commit.parents[0])[1]).tree
        known = bases if commit.parents and commit.parents[0] in have else None
        _new_tree_objects(odb, commit.tree, parent_tree, out, known)
        stack.extend(commit.parents)
    return list(out)


_DELTA_MIN = 1024
_COPY_MAX = 0x10000


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _copy_op(offset: int, size: int) -> bytes:
    op = 0x80
    args = bytearray()
    for i in range(4):
        byte = (offset >> (8 * i)) & 0xFF
        if byte:
            op |= 1 << i
            args.append(byte)
    for i in range(2):
        byte = (size >> (8 * i)) & 0xFF
        if byte:
            op |= 0x10 << i
            args.append(byte)
    return bytes([op]) + bytes(args)


def prefix_suffix_delta(base: bytes, target: bytes) -> bytes:
    """A git delta turning ``base`` into ``target``: copy the common prefix and suffix, insert
    the middle. Cheap, and exact for the usual edit: a few changed lines in a big file."""
    limit = min(len(base), len(target))
    prefix = 0
    while prefix < limit and base[prefix] == target[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < limit - prefix and base[len(base) - 1 - suffix] == target[len(target) - 1 - suffix]
    ):
        suffix += 1
    ops = bytearray(_varint(len(base)) + _varint(len(target)))
    for start in range(0, prefix, _COPY_MAX):
        ops += _copy_op(start, min(_COPY_MAX, prefix - start))
    middle = target[prefix : len(target) - suffix]
    for start in range(0, len(middle), 127):
        chunk = middle[start : start + 127]
        ops += bytes([len(chunk)]) + chunk
    tail = len(base) - suffix
    for start in range(0, suffix, _COPY_MAX):
        size = min(_COPY_MAX, suffix - start)
        ops += _copy_op(tail + start, size)
    return bytes(ops)


class Sink(Protocol):
    """Anything bytes can be written to (a file, an fsspec publish stream)."""

    def write(self, data: bytes, /) -> object: ...


def _delta_entry(odb: ObjectStore, oid: bytes, base_oid: bytes) -> bytes | None:
    """A REF_DELTA pack entry for ``oid`` against ``base_oid`` (which the receiver holds),
    or None when a delta would not pay."""
    _kind, target = odb.read(oid)
    if len(target) < _DELTA_MIN:
        return None
    _base_kind, base = odb.read(base_oid)
    delta = prefix_suffix_delta(base, target)
    if len(delta) > len(target) // 2:
        return None
    return pack_entry_header(7, len(delta)) + base_oid + zlib.compress(delta, 6)


class _HashingWriter:
    def __init__(self, out: Sink) -> None:
        self.out = out
        self.sha = hashlib.sha1()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.out.write(data)
        self.size += len(data)


def write_bundle(
    odb: ObjectStore,
    out: Sink,
    refs: dict[str, bytes],
    prerequisites: dict[bytes, str] | None = None,
    extra: list[tuple[str, bytes]] | None = None,
) -> BundleStats:
    """Stream a v2 bundle of ``refs`` to ``out``; ``prerequisites`` maps commit → comment.

    ``extra`` objects (kind, content) are built by the caller in memory and shipped as well
    (their refs must be in ``refs``); they are never written to the store.
    """
    prerequisites = prerequisites or {}
    in_memory = {hash_object(kind, data): (kind, data) for kind, data in extra or []}
    tips = [oid for oid in refs.values() if oid not in in_memory]
    bases: dict[bytes, bytes] = {}
    objects = collect_objects(odb, tips, prerequisites, bases)
    objects += [oid for oid in in_memory if oid not in set(objects)]
    header = bytearray(BUNDLE_SIGNATURE)
    for oid, comment in sorted(prerequisites.items()):
        header += b"-" + oid.hex().encode() + (b" " + comment.encode() if comment else b"") + b"\n"
    for name, oid in sorted(refs.items()):
        header += oid.hex().encode() + b" " + name.encode() + b"\n"
    header += b"\n"
    out.write(bytes(header))
    pack = _HashingWriter(out)
    pack.write(b"PACK" + struct.pack(">II", 2, len(objects)))
    for oid in objects:
        base = bases.get(oid)
        if base is not None:
            entry = _delta_entry(odb, oid, base)
            if entry is not None:
                pack.write(entry)
                continue
        entry = None if oid in in_memory else odb.raw_entry(oid)
        if entry is None:
            kind, data = in_memory[oid] if oid in in_memory else odb.read(oid)
            entry = pack_object_header(kind, len(data)) + deflate(data)
        pack.write(entry)
    out.write(pack.sha.digest())
    return BundleStats(
        {name: oid.hex() for name, oid in refs.items()},
        [oid.hex() for oid in prerequisites],
        len(objects),
        len(header) + pack.size + 20,
    )


@dataclass(frozen=True)
class BundleHeader:
    """The parsed text header of a bundle; the pack follows at ``pack_offset``."""

    prerequisites: dict[bytes, str]
    refs: dict[str, bytes]
    pack_offset: int


_MAX_HEADER = 1 << 20


def read_bundle_header(stream: BinaryIO, ref_prefix: str = "refs/narrative/") -> BundleHeader:
    """Parse and validate a v2 bundle header, leaving ``stream`` at the start of the pack.

    Refuses (BundleFormatError) anything but v2, malformed lines, duplicate refs, and refs outside
    ``ref_prefix`` — a bundle may never move a ref the narrative namespace does not own.
    """
    from narrative.errors import InvalidInput
    from narrative.refs import validate_ref_name

    first = stream.readline(len(BUNDLE_SIGNATURE) + 1)
    if first != BUNDLE_SIGNATURE:
        raise BundleFormatError("not a v2 git bundle")
    consumed = len(first)
    prerequisites: dict[bytes, str] = {}
    refs: dict[str, bytes] = {}
    while True:
        line = stream.readline(_MAX_HEADER)
        consumed += len(line)
        if consumed > _MAX_HEADER or not line.endswith(b"\n"):
            raise BundleFormatError("bundle header is truncated or too long")
        if line == b"\n":
            break
        text = line[:-1].decode("utf-8", "replace")
        if text.startswith("-"):
            oid_hex, _, comment = text[1:].partition(" ")
            prerequisites[_oid(oid_hex)] = comment
            continue
        oid_hex, sep, name = text.partition(" ")
        if not sep:
            raise BundleFormatError(f"malformed bundle header line {text[:80]!r}")
        try:
            validate_ref_name(name)
        except InvalidInput as exc:
            raise BundleFormatError(str(exc)) from None
        if not name.startswith(ref_prefix):
            raise BundleFormatError(f"bundle ref {name} is outside {ref_prefix}")
        if name in refs:
            raise BundleFormatError(f"bundle names ref {name} twice")
        refs[name] = _oid(oid_hex)
    if not refs:
        raise BundleFormatError("bundle carries no refs")
    return BundleHeader(prerequisites, refs, consumed)


def _oid(text: str) -> bytes:
    if len(text) != 40 or any(c not in "0123456789abcdef" for c in text):
        raise BundleFormatError(f"malformed object id {text[:50]!r} in bundle header")
    return bytes.fromhex(text)


class BundleFormatError(InvalidArtifact):
    """The bundle header is malformed or names refs it may not."""
