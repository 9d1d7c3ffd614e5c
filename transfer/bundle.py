"""Writing git bundles (v2) straight from the store, without the ``git`` CLI.

A bundle is a short text header (prerequisite commits the receiver must already have, then the
refs it carries) followed by one pack. Objects are chosen much as ``git rev-list --objects``
chooses them (everything reachable from the tips, minus what the trees of the prerequisites the
walk meets hold at the same paths), so an incremental bundle after a one-file change holds one
blob, the trees on its path and one commit; the selection is checked to be closed before a byte
is written. Pack entries are copied verbatim from the store's packs (no recompression, no delta
search); a changed blob of an incremental bundle is sent as a delta against its previous version
at the same path. Exporting is mostly sequential I/O, and stock git reads the result (``git
bundle verify``, ``git fetch``).
"""

from __future__ import annotations

import hashlib
import queue
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from narrative.errors import StoreCorrupted
from narrative.objects import MODE_DIR, Commit, hash_object, parse_commit, parse_tree
from narrative.odb import ObjectStore
from narrative.packentry import pack_entry_header, pack_object_header
from narrative.zstream import deflate

from .errors import IncompleteExport, InvalidArtifact

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


def _tree_entries(odb: ObjectStore, oid: bytes) -> list[tuple[bytes, int, bytes]]:
    kind, data = odb.read(oid)
    if kind != "tree":
        raise StoreCorrupted(f"object {oid.hex()} is a {kind}, where a tree was expected")
    return parse_tree(data)


def _read_commit(odb: ObjectStore, oid: bytes) -> Commit:
    kind, data = odb.read(oid)
    if kind != "commit":
        raise StoreCorrupted(f"object {oid.hex()} is a {kind}, where a commit was expected")
    return parse_commit(data)


class _ObjectWalk:
    """Object selection close to ``git rev-list --objects TIPS --not HAVES``.

    Every sent commit's tree is walked in full, pruned by objects already selected and by
    objects *known* to the receiver: an entry whose id equals the entry at the same path in the
    tree of a boundary commit (a commit the receiver has, met as a parent of a commit being
    sent) is known, with everything below it, so only the paths that changed are read on both
    sides — not the boundary's whole tree, which dominated an incremental export. (Content the
    receiver holds at another path, e.g. after a rename, is sent again: more bytes, never too
    few.) A tree is added to the selection only while being walked to the end, so a selected
    tree always implies its whole content is selected or known; per-commit tree diffs, which
    made that untrue, are not used for selection (issue 12, bug 1).
    """

    def __init__(self, odb: ObjectStore, boundary_trees: list[bytes]) -> None:
        self.odb = odb
        self.boundary_trees = tuple(dict.fromkeys(boundary_trees))
        self.known: set[bytes] = set(self.boundary_trees)
        self.selected: dict[bytes, None] = {}
        # tree → the oids its entries name, for the connectivity check
        self.children: dict[bytes, list[bytes]] = {}

    def _same_path(self, trees: tuple[bytes, ...]) -> dict[bytes, list[tuple[int, bytes]]]:
        """name → (mode, oid) of that name in each of ``trees`` (the receiver's side)."""
        theirs: dict[bytes, list[tuple[int, bytes]]] = {}
        for tree in trees:
            for name, mode, oid in _tree_entries(self.odb, tree):
                theirs.setdefault(name, []).append((mode, oid))
        return theirs

    def select_tree(self, tree: bytes) -> None:
        stack = [(tree, self.boundary_trees)]
        while stack:
            oid, their_trees = stack.pop()
            if oid in self.known or oid in self.selected:
                continue
            self.selected[oid] = None
            entries = _tree_entries(self.odb, oid)
            self.children[oid] = [child for _n, mode, child in entries if mode != _GITLINK]
            if not their_trees:  # the receiver has nothing at this path (a full export)
                for _name, mode, child in reversed(entries):
                    if mode == MODE_DIR:
                        stack.append((child, ()))
                    elif mode != _GITLINK and child not in self.known:
                        self.selected.setdefault(child, None)
                continue
            theirs = self._same_path(their_trees)
            for name, mode, child in reversed(entries):
                if mode == _GITLINK:
                    continue
                same = theirs.get(name, ())
                if same and any(their_oid == child for _m, their_oid in same):
                    self.known.add(child)  # the receiver has it, and all below it
                elif mode == MODE_DIR:
                    below = tuple(their_oid for m, their_oid in same if m == MODE_DIR)
                    stack.append((child, below))
                elif child not in self.known:
                    self.selected.setdefault(child, None)


def _pair_delta_bases(
    odb: ObjectStore,
    new: bytes,
    old: bytes,
    selected: dict[bytes, None],
    bases: dict[bytes, bytes],
) -> None:
    """Remember, for each tree and blob of ``new`` that is being sent, the object at the same
    path in ``old`` (a tree the receiver holds) as its delta base: a changed tree differs from
    its previous version by an entry or two, which is what keeps a one-file change small (as
    git's thin packs do). Only an optimisation: selection never depends on it."""
    pairs = [(new, old)]
    while pairs:
        new_tree, old_tree = pairs.pop()
        if new_tree == old_tree:
            continue
        if new_tree in selected:
            bases.setdefault(new_tree, old_tree)
        before = {name: (mode, oid) for name, mode, oid in _tree_entries(odb, old_tree)}
        for name, mode, oid in _tree_entries(odb, new_tree):
            prev = before.get(name)
            if prev is None or prev[1] == oid or prev[0] != mode:
                continue
            if mode == MODE_DIR:
                pairs.append((oid, prev[1]))
            elif mode != _GITLINK and oid in selected:
                bases.setdefault(oid, prev[1])


def collect_objects(
    odb: ObjectStore,
    tips: Iterable[bytes],
    haves: Iterable[bytes],
    bases: dict[bytes, bytes] | None = None,
) -> list[bytes]:
    """Every object reachable from ``tips`` and not from ``haves`` (commits the receiver has,
    with all their history and content), checked to be closed before it is returned.

    When ``bases`` is given, it is filled with new object → its previous version (the parent
    commit, the tree or blob at the same path), for commits whose parent the receiver has
    (delta bases; see :func:`write_bundle`).

    Raises:
        IncompleteExport: An object the selection needs is missing from the store, or the
            selection is not closed (a bug: nothing may be published then).
    """
    have = set(haves)
    commits: dict[bytes, Commit] = {}
    boundary: dict[bytes, None] = {}
    stack = list(tips)
    try:
        while stack:
            oid = stack.pop()
            if oid in have:
                boundary[oid] = None
                continue
            if oid in commits:
                continue
            commit = _read_commit(odb, oid)
            commits[oid] = commit
            stack.extend(commit.parents)
        walk = _ObjectWalk(odb, [_read_commit(odb, oid).tree for oid in boundary])
        ordered: dict[bytes, None] = {}
        for oid, commit in commits.items():
            ordered[oid] = None
            walk.select_tree(commit.tree)
            if bases is not None and commit.parents and commit.parents[0] in boundary:
                parent_tree = _read_commit(odb, commit.parents[0]).tree
                _pair_delta_bases(odb, commit.tree, parent_tree, walk.selected, bases)
                bases.setdefault(oid, commit.parents[0])
    except StoreCorrupted as exc:
        raise IncompleteExport(f"cannot export: {exc}") from exc
    ordered.update(walk.selected)
    _check_closed(odb, commits, walk, boundary)
    return list(ordered)


def _check_closed(
    odb: ObjectStore, commits: dict[bytes, Commit], walk: _ObjectWalk, boundary: dict[bytes, None]
) -> None:
    """Connectivity check: everything a selected object names is selected or held by the
    receiver, and every selected object exists in the store."""
    selected = walk.selected

    def present(oid: bytes) -> bool:
        return oid in selected or oid in walk.known or oid in commits

    for oid, commit in commits.items():
        missing = [p for p in commit.parents if p not in commits and p not in boundary]
        if not present(commit.tree):
            missing.append(commit.tree)
        if missing:
            raise IncompleteExport(f"commit {oid.hex()} names {missing[0].hex()}, not sent")
    # every name in every selected tree, checked as sets (C loops): thousands of entries
    named = set().union(*walk.children.values())
    unsent = named.difference(selected, walk.known, commits)
    for tree, children in walk.children.items() if unsent else ():
        for child in children:
            if child in unsent:
                raise IncompleteExport(f"tree {tree.hex()} names {child.hex()}, not sent")
    absent = odb.missing(oid for oid in selected if oid not in walk.children)
    if absent:
        raise IncompleteExport(f"object {absent[0].hex()} is missing from the store")


_DELTA_MIN = 64
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


_MATCH_BLOCK = 16
"""Bytes of the base indexed per entry (at block-aligned offsets) when looking for copies."""
_DELTA_BASE_MAX = 64 << 20
"""Bases above this size are not indexed (the index would cost more than it saves)."""
_DELTA_LITERAL_MAX = 128 << 10
"""Literal bytes after which a delta is given up (the blob is sent whole)."""


def _common_length(a: bytes, a_at: int, b: bytes, b_at: int) -> int:
    """How many bytes ``a[a_at:]`` and ``b[b_at:]`` share at their start: galloping slice
    comparisons (memcmp), never a Python loop per byte."""
    limit = min(len(a) - a_at, len(b) - b_at)
    length, step, growing = 0, 64, True
    while step:
        size = min(step, limit - length)
        if (
            size > 0
            and a[a_at + length : a_at + length + size] == b[b_at + length : b_at + length + size]
        ):
            length += size
            if growing:
                step *= 2
        else:
            growing = False
            step //= 2
    return length


def make_delta(base: bytes, target: bytes, max_insert: int) -> bytes | None:
    """A git delta turning ``base`` into ``target``, or None when it would insert more than
    ``max_insert`` literal bytes.

    Every block-aligned 16-byte piece of the base is indexed; the target is scanned for those
    pieces and each hit is extended both ways into one copy, so an edit anywhere (an overwrite
    in the middle, an append, a truncation, moved text) costs about the bytes it changed."""
    if len(base) > _DELTA_BASE_MAX:
        return None
    block = _MATCH_BLOCK
    index: dict[bytes, int] = {}
    for offset in range(len(base) - block, -1, -block):  # backwards: the first offset wins
        index[base[offset : offset + block]] = offset
    ops = bytearray(_varint(len(base)) + _varint(len(target)))
    inserted = 0
    literal_from = 0  # target bytes from here to ``at`` are not covered by a copy yet
    at = 0
    last = len(target) - block
    while at <= last:
        found = index.get(target[at : at + block])
        if found is None:
            at += 1
            if at - literal_from + inserted > max_insert:
                return None
            continue
        # extend backwards over the pending literal, then forwards as far as both agree
        back = 0
        while at - back > literal_from and found - back > 0:
            if base[found - back - 1] != target[at - back - 1]:
                break
            back += 1
        start, source = at - back, found - back
        length = _common_length(base, source, target, start)
        inserted += _insert_ops(ops, target[literal_from:start])
        for piece in range(0, length, _COPY_MAX):
            ops += _copy_op(source + piece, min(_COPY_MAX, length - piece))
        at = literal_from = start + length
    inserted += _insert_ops(ops, target[literal_from:])
    return bytes(ops) if inserted <= max_insert else None


def _insert_ops(ops: bytearray, literal: bytes) -> int:
    """Append insert instructions for ``literal`` (at most 127 bytes each); its length."""
    for start in range(0, len(literal), 127):
        chunk = literal[start : start + 127]
        ops += bytes([len(chunk)]) + chunk
    return len(literal)


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
    # the literal budget also bounds the time spent on a blob that was rewritten wholesale
    delta = make_delta(base, target, min(len(target) // 2, _DELTA_LITERAL_MAX))
    if delta is None or len(delta) > len(target) // 2:
        return None
    entry = pack_entry_header(7, len(delta)) + base_oid + zlib.compress(delta, 6)
    whole = odb.raw_entry(oid)
    return None if whole is not None and len(whole) <= len(entry) else entry


_WRITE_BATCH = 1 << 20
_WRITE_DIRECT = 64 << 10
"""Data this big (a run of stored entries) goes to the sink as it is, not copied into a batch."""
_QUEUED = 8
"""Chunks (up to about 1 MiB each) handed to the sink's thread and not yet written: bounds the
memory the overlap costs."""


class _PackStream:
    """Hashes (SHA-1, the pack's trailer) and counts the pack on the caller's thread, and feeds
    the sink from a second thread once the pack is big enough to pay for one: the sink's write
    and its own hashing (the publish stream's sha256) then overlap with the SHA-1 and the pack
    reads, as hashlib, file writes and ``pread`` all release the GIL. Small entries are gathered
    into writes of about 1 MiB (a write per object cost more than the copying). Use as a
    context manager; :meth:`finish` writes out the rest before the trailer goes out."""

    def __init__(self, out: Sink) -> None:
        self.out = out
        self.sha = hashlib.sha1()
        self.size = 0
        self._batch = bytearray()
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> _PackStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if len(data) < _WRITE_DIRECT:
            self._batch += data
            if len(self._batch) >= _WRITE_BATCH:
                self._send_batch()
            return
        self._send_batch()
        self._send(data)

    def _send_batch(self) -> None:
        if self._batch:
            data, self._batch = bytes(self._batch), bytearray()
            self._send(data)

    def _send(self, data: bytes) -> None:
        self.sha.update(data)
        if self._queue is None:
            self._queue = queue.Queue(_QUEUED)
            self._thread = threading.Thread(target=self._drain, name="bundle-writer", daemon=True)
            self._thread.start()
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def _drain(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.out.write(data)
                except BaseException as exc:  # re-raised on the caller's thread
                    self._error = exc

    def _stop(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Write out everything (the sink's thread is done after this); errors surface here."""
        if self._thread is None:  # a small pack: one write, no thread
            data, self._batch = bytes(self._batch), bytearray()
            self.sha.update(data)
            if data:
                self.out.write(data)
            return
        self._send_batch()
        self._stop()
        if self._error is not None:
            raise self._error


def _entry(
    odb: ObjectStore,
    oid: bytes,
    base: bytes | None,
    in_memory: dict[bytes, tuple[str, bytes]],
) -> bytes:
    """The pack entry of one object that is not copied in a run: a delta against ``base``
    when that pays, else the stored entry, else the object deflated anew."""
    if base is not None:
        entry = _delta_entry(odb, oid, base)
        if entry is not None:
            return entry
    stored = None if oid in in_memory else odb.raw_entry(oid)
    if stored is not None:
        return stored
    kind, data = in_memory[oid] if oid in in_memory else odb.read(oid)
    return pack_object_header(kind, len(data)) + deflate(data)


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
    chosen = set(objects)
    objects += [oid for oid in in_memory if oid not in chosen]
    header = bytearray(BUNDLE_SIGNATURE)
    for oid, comment in sorted(prerequisites.items()):
        header += b"-" + oid.hex().encode() + (b" " + comment.encode() if comment else b"") + b"\n"
    for name, oid in sorted(refs.items()):
        header += oid.hex().encode() + b" " + name.encode() + b"\n"
    header += b"\n"
    out.write(bytes(header))
    with _PackStream(out) as pack:
        pack.write(b"PACK" + struct.pack(">II", 2, len(objects)))
        # Stored entries first, whole runs of neighbours in pack order; deltas, loose and
        # in-memory objects after them, one by one (git does not care about the order).
        copied: set[bytes] = set()
        plain = (o for o in objects if o not in bases and o not in in_memory)
        for oids, stored in odb.raw_runs(plain):
            pack.write(stored)
            copied.update(oids)
        for oid in objects:
            if oid not in copied:
                pack.write(_entry(odb, oid, bases.get(oid), in_memory))
        pack.finish()
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
