"""From directory scans to the snapshot's tree: nodes for what changed, cached records for the rest.

The walker (:mod:`narrative.scan`) lists every directory and gives each a signature; this
module decides, directory by directory, what the new tree holds. A directory that was listed
exactly as the stat cache has it — complete, the same signature, and the same holds for every
directory below it — is *settled*: its cached record (tree id, counts) stands for the whole
subtree, one node is built for its top and the records below it are carried over as they are.
Only the other directories get nodes with entries, and only their files whose stat key moved
become :class:`FileJob` objects for the blob writer. A no-op snapshot of a large workspace so
builds one node, not one per directory.
"""

from __future__ import annotations

import os
import stat as stat_mod
from typing import Any

from .objects import MODE_DIR, MODE_EXEC, MODE_FILE, MODE_LINK
from .statcache import DirRecord, FileDetail, StatCache, StatKey, decode_details

__all__ = ["DirNode", "DirScan", "FileJob", "Resolver", "carried_records", "file_mode"]

DirScan = tuple[str, int, bool, list[str], list[tuple[str, StatKey]] | None]
"""(rel, signature, complete, child rels, files) — files is None when the directory's own
entries are exactly those of its cached record."""


class FileJob:
    """A file whose blob id must be computed (stat cache miss).

    (Plain classes, not dataclasses: the decorator costs import time at every snapshot.)"""

    __slots__ = ("changed", "entry", "key", "mode", "path", "rel")
    rel: str
    path: str
    key: StatKey
    mode: int
    entry: list[Any]
    """The owning directory's entry ``[name, mode, oid]``; the writer fills in the oid."""
    changed: bool
    """Set when the file changed while being read (its key must not be trusted)."""

    def __init__(
        self, rel: str, path: str, key: StatKey, mode: int, entry: list[Any], changed: bool = False
    ) -> None:
        self.rel = rel
        self.path = path
        self.key = key
        self.mode = mode
        self.entry = entry
        self.changed = changed


class DirNode:
    """One directory. ``record`` is set when its cached record is reused as is (then it has
    neither children nor entries: the record's tree stands for the whole subtree)."""

    __slots__ = (
        "byte_count",
        "children",
        "entries",
        "file_count",
        "files",
        "oid",
        "record",
        "rel",
        "sig",
        "skipped",
    )
    rel: str
    sig: int | None
    record: DirRecord | None
    entries: list[list[Any]]
    children: list[DirNode]
    files: list[tuple[str, StatKey, list[Any]]]
    file_count: int
    byte_count: int
    skipped: list[dict[str, Any]]
    oid: bytes | None

    def __init__(
        self,
        rel: str,
        sig: int | None = None,
        record: DirRecord | None = None,
        oid: bytes | None = None,
    ) -> None:
        self.rel = rel
        self.sig = sig
        self.record = record
        self.entries = []
        self.children = []
        self.files = []
        self.file_count = 0
        self.byte_count = 0
        self.skipped = []
        self.oid = oid


def file_mode(st_mode: int) -> int | None:
    """The tree mode of a non-directory entry; None for what is never content (sockets,
    fifos, devices)."""
    if stat_mod.S_ISREG(st_mode):
        return MODE_EXEC if st_mode & stat_mod.S_IXUSR else MODE_FILE
    if stat_mod.S_ISLNK(st_mode):
        return MODE_LINK
    return None


class Resolver:
    """Turns directory scans into DirNodes, reusing cached trees where nothing changed.

    ``reused`` are tops of subtrees the watcher's journal vouches for (not listed at all).
    After :meth:`resolve`, ``carried`` holds the cached records of the listed directories
    below settled tops: part of the new tree, without nodes.
    """

    def __init__(
        self,
        workspace: str,
        cache: StatCache,
        max_size: int,
        scans: dict[str, DirScan],
        reused: set[str],
    ) -> None:
        self.workspace = workspace
        self.cached = cache.dirs
        self.max_size = max_size
        self.scans = scans
        self.reused = reused
        self.settled: set[str] = set()
        self.carried: dict[str, DirRecord] = {}
        self.jobs: list[FileJob] = []
        self.dirs: list[DirNode] = []
        self.skipped: list[dict[str, Any]] = []

    def settle(self, rel: str) -> bool:
        """Mark ``rel`` and the directories below it that are settled (one post-order pass:
        listed completely, the cached signature, and every listed child settled too)."""
        _, sig, complete, children, _own = self.scans[rel]
        cached = self.cached.get(rel)
        settled = complete and cached is not None and cached[0] == sig
        for child in children:
            if child in self.reused:
                continue  # unchanged by the journal's account
            if child not in self.scans:
                settled = False  # unreadable: never reuse the parent's old tree
            elif not self.settle(child):
                settled = False
        if settled:
            self.settled.add(rel)
        return settled

    def resolve(self, rel: str) -> DirNode:
        """The node of ``rel`` (call :meth:`settle` on it first)."""
        if rel in self.settled:
            self._carry_below(rel)
            return self.reuse(rel)
        _, sig, complete, children, own = self.scans[rel]
        node = DirNode(rel, sig if complete else None)
        for child_rel in children:
            if child_rel in self.reused:
                node.children.append(self.reuse(child_rel))
            elif child_rel in self.scans:
                node.children.append(self.resolve(child_rel))
        cached = self.cached.get(rel)
        if own is None and cached is not None:
            self._fill_from_cache(node, cached)
        else:
            details = decode_details(cached[5]) if cached is not None else {}
            self._fill(node, own or [], details)
        for child in node.children:
            node.entries.append([os.fsencode(os.path.basename(child.rel)), MODE_DIR, child])
        self.dirs.append(node)
        self.skipped.extend(node.skipped)
        return node

    def reuse(self, rel: str) -> DirNode:
        """A node for an unchanged subtree: its top's record as is, nothing read."""
        record = self.cached[rel]
        node = DirNode(rel, record[0], record, oid=record[1] or None)
        node.file_count, node.byte_count, node.skipped = record[2], record[3], record[4]
        self.dirs.append(node)
        self.skipped.extend(node.skipped)
        return node

    def _carry_below(self, top: str) -> None:
        """Carry the cached records of every listed directory below the settled ``top``
        (and of the journal's reused tops among them: what is below those, :func:`carried_records`
        finds)."""
        pending = list(self.scans[top][3])
        while pending:
            rel = pending.pop()
            record = self.cached[rel]
            self.carried[rel] = record
            self.skipped.extend(record[4])
            if rel not in self.reused:
                pending.extend(self.scans[rel][3])

    @staticmethod
    def _fill_from_cache(node: DirNode, cached: DirRecord) -> None:
        """Own files unchanged (only a subdirectory moved): entries straight from the cache."""
        node.file_count, node.byte_count, node.skipped = cached[2], cached[3], cached[4]
        for name, (key, oid, _racy) in decode_details(cached[5]).items():
            item: list[Any] = [os.fsencode(name), file_mode(key[4]), oid]
            node.entries.append(item)
            node.files.append((name, key, item))

    def _fill(
        self, node: DirNode, files: list[tuple[str, StatKey]], details: dict[str, FileDetail]
    ) -> None:
        """Build the entries of a changed directory, queueing files whose stat key moved."""
        prefix = node.rel + "/" if node.rel else ""
        base = os.path.join(self.workspace, node.rel) if node.rel else self.workspace
        for name, key in files:
            mode = file_mode(key[4])
            if mode is None:
                continue  # sockets, fifos, devices: never content
            if mode != MODE_LINK and key[2] > self.max_size:
                node.skipped.append({"path": prefix + name, "size": key[2], "reason": "too-large"})
                continue
            node.file_count += 1
            node.byte_count += key[2]
            hit = details.get(name)
            item: list[Any] = [os.fsencode(name), mode, None]
            if hit is not None and tuple(hit[0]) == key and not hit[2]:
                item[2] = hit[1]
            else:
                path = os.path.join(base, name)
                self.jobs.append(FileJob(prefix + name, path, key, mode, item))
            node.entries.append(item)
            node.files.append((name, key, item))


def carried_records(
    cached: dict[str, DirRecord], tops: set[str], decided: set[str]
) -> dict[str, DirRecord]:
    """The cached records strictly below the journal's reused directories ``tops``.
    ``decided`` are the directories of the new tree already accounted for (nodes, records
    carried from the walk): a record under one of those but no top is gone (deleted, moved
    away, unreadable now). One pass over the records, each deciding by its nearest decided
    ancestor."""
    below: dict[str, bool] = {}
    carried: dict[str, DirRecord] = {}
    for rel, record in cached.items():
        if rel in decided:
            continue
        chain = [rel]
        while True:
            parent = chain[-1].rpartition("/")[0]
            if parent in tops:
                keep = True
                break
            if parent in decided or not chain[-1]:
                keep = False
                break
            known = below.get(parent)
            if known is not None:
                keep = known
                break
            chain.append(parent)
        for step in chain:
            below[step] = keep
        if keep:
            carried[rel] = record
    return carried
