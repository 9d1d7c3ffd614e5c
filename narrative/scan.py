"""Walk a workspace into an in-memory tree, deciding what a snapshot contains.

Rules: ``.gitignore`` at every level, ``.git/info/exclude`` of the workspace repo and of every
nested repo, ``.narrativeignore`` (highest precedence in its directory), the store itself, and
every ``.git`` entry are excluded. Files inside nested repos are ordinary files. Symlinks are
recorded as symlinks (never followed); only regular files, symlinks and directories are taken;
regular files over the size cap are skipped and reported.

The walk is the hot path of every snapshot, so per directory it only lists, stats and hashes the
stat keys into a signature (see :mod:`narrative.statcache`); a directory whose signature matches
and whose subdirectories are all unchanged reuses its cached tree without further work. Only
changed directories look at individual files; files whose stat key moved become
:class:`FileJob` objects that the blob writer hashes later, in parallel.
"""

from __future__ import annotations

import os
import stat as stat_mod
import zlib
from dataclasses import dataclass, field
from typing import Any

from .ignore import IgnoreRules, read_ignore_file
from .objects import MODE_DIR, MODE_EXEC, MODE_FILE, MODE_LINK
from .statcache import DirRecord, FileDetail, StatCache, StatKey, decode_details

__all__ = ["DirNode", "FileJob", "ScanResult", "scan_workspace"]

_SPECIAL = frozenset((".git", ".gitignore", ".narrativeignore"))
_PARALLEL_STAT_MIN = 2000
_STAT_THREADS = 4


@dataclass(slots=True)
class FileJob:
    """A file whose blob id must be computed (stat cache miss)."""

    rel: str
    path: str
    key: StatKey
    mode: int
    entry: list[Any]
    """The owning directory's entry ``[name, mode, oid]``; the writer fills in the oid."""
    changed: bool = False
    """Set when the file changed while being read (its key must not be trusted)."""


@dataclass(slots=True)
class DirNode:
    """One directory. ``record`` is set when its cached record is reused as is."""

    rel: str
    sig: int | None = None
    record: DirRecord | None = None
    entries: list[list[Any]] = field(default_factory=list)
    children: list[DirNode] = field(default_factory=list)
    files: list[tuple[str, StatKey, list[Any]]] = field(default_factory=list)
    file_count: int = 0
    byte_count: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    oid: bytes | None = None


@dataclass
class ScanResult:
    """Everything a snapshot needs from the walk."""

    root: DirNode
    jobs: list[FileJob]
    dirs: list[DirNode]
    skipped: list[dict[str, Any]]


def _mode_of(st_mode: int) -> int | None:
    if stat_mod.S_ISREG(st_mode):
        return MODE_EXEC if st_mode & stat_mod.S_IXUSR else MODE_FILE
    if stat_mod.S_ISLNK(st_mode):
        return MODE_LINK
    return None


@dataclass(slots=True)
class _Listing:
    """A listed directory whose entries are still to be stat'ed."""

    rel: str
    files: list[os.DirEntry[str]]
    subdirs: list[_Listing]
    names: str
    keys: list[StatKey] = field(default_factory=list)
    sig: int = 0
    complete: bool = True
    """False when a subdirectory could not be read: the cached tree must not be reused."""


def _stat_listings(listings: list[_Listing]) -> None:
    """Stat every file of ``listings`` and compute each directory's signature.

    Runs on several threads: the lstat system calls release the GIL and dominate the cost.
    """
    for listing in listings:
        try:
            stats = [e.stat(follow_symlinks=False) for e in listing.files]
        except OSError:
            listing.files, stats = _stat_slowly(listing.files)
        keys = [(s.st_mtime_ns, s.st_ctime_ns, s.st_size, s.st_ino, s.st_mode) for s in stats]
        names = "\0".join([e.name for e in listing.files]) + listing.names
        listing.keys = keys
        listing.sig = hash((tuple(keys), zlib.crc32(names.encode("utf-8", "surrogateescape"))))


def _stat_slowly(
    files: list[os.DirEntry[str]],
) -> tuple[list[os.DirEntry[str]], list[os.stat_result]]:
    """Stat one by one, dropping entries that vanished since the listing."""
    kept, stats = [], []
    for entry in files:
        try:
            stats.append(entry.stat(follow_symlinks=False))
            kept.append(entry)
        except OSError:
            continue
    return kept, stats


def _balanced_batches(listings: list[_Listing], count: int) -> list[list[_Listing]]:
    batches: list[list[_Listing]] = [[] for _ in range(count)]
    loads = [0] * count
    for listing in sorted(listings, key=lambda item: -len(item.files)):
        i = loads.index(min(loads))
        batches[i].append(listing)
        loads[i] += len(listing.files) + 1
    return batches


class _Scanner:
    def __init__(self, cache: StatCache, exclude: set[str], max_size: int) -> None:
        self.cached = cache.dirs
        self.exclude = exclude
        self.max_size = max_size
        self.jobs: list[FileJob] = []
        self.dirs: list[DirNode] = []
        self.skipped: list[dict[str, Any]] = []
        self.listings: list[_Listing] = []
        self.file_total = 0

    @staticmethod
    def _rules_for(abs_dir: str, rel_dir: str, names: set[str], rules: IgnoreRules) -> IgnoreRules:
        if ".git" in names:
            exclude = os.path.join(abs_dir, ".git", "info", "exclude")
            rules = rules.extend(read_ignore_file(exclude), rel_dir)
        for fname in (".gitignore", ".narrativeignore"):
            if fname in names:
                lines = read_ignore_file(os.path.join(abs_dir, fname), follow_symlinks=False)
                rules = rules.extend(lines, rel_dir)
        return rules

    def list_dir(self, abs_dir: str, rel_dir: str, rules: IgnoreRules) -> _Listing | None:
        """List a directory tree, applying ignore rules (no stat calls yet)."""
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except OSError as exc:
            self.skipped.append({"path": rel_dir or ".", "reason": f"unreadable: {exc.strerror}"})
            return None
        names = {e.name for e in entries}
        if not names.isdisjoint(_SPECIAL):
            rules = self._rules_for(abs_dir, rel_dir, names, rules)
        prefix = rel_dir + "/" if rel_dir else ""
        files: list[os.DirEntry[str]] = []
        subdirs: list[os.DirEntry[str]] = []
        for entry in entries:
            name = entry.name
            if name == ".git":
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if entry.path in self.exclude or (rules and rules.is_ignored(prefix + name, True)):
                    continue
                subdirs.append(entry)
            elif not (rules and rules.is_ignored(prefix + name, False)):
                files.append(entry)
        listing = _Listing(rel_dir, files, [], "\0/\0" + "\0".join(e.name for e in subdirs))
        self.listings.append(listing)
        self.file_total += len(files)
        for entry in subdirs:
            child = self.list_dir(entry.path, prefix + entry.name, rules)
            if child is not None:
                listing.subdirs.append(child)
            else:
                listing.complete = False
        return listing

    def stat_all(self) -> None:
        if self.file_total < _PARALLEL_STAT_MIN:
            _stat_listings(self.listings)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=_STAT_THREADS) as pool:
            list(pool.map(_stat_listings, _balanced_batches(self.listings, _STAT_THREADS * 2)))

    def resolve(self, listing: _Listing) -> DirNode:
        """Decide, bottom-up, which directories keep their cached tree."""
        node = DirNode(listing.rel, listing.sig if listing.complete else None)
        reusable = listing.complete
        for sub in listing.subdirs:
            child = self.resolve(sub)
            node.children.append(child)
            reusable = reusable and child.record is not None
        cached = self.cached.get(listing.rel)
        if reusable and cached is not None and cached[0] == listing.sig:
            node.record = cached
            node.oid = cached[1] or None
            node.file_count, node.byte_count = cached[2], cached[3]
            node.skipped = cached[4]
        else:
            details = decode_details(cached[5]) if cached is not None else {}
            prefix = listing.rel + "/" if listing.rel else ""
            self._fill(node, prefix, listing.files, listing.keys, details)
        self.dirs.append(node)
        self.skipped.extend(node.skipped)
        return node

    def _fill(
        self,
        node: DirNode,
        prefix: str,
        files: list[os.DirEntry[str]],
        keys: list[StatKey],
        details: dict[str, FileDetail],
    ) -> None:
        """Build the entries of a changed directory, queueing files whose stat key moved."""
        for entry, key in zip(files, keys, strict=True):
            mode = _mode_of(key[4])
            if mode is None:
                continue  # sockets, fifos, devices: never content
            name = entry.name
            if mode != MODE_LINK and key[2] > self.max_size:
                node.skipped.append({"path": prefix + name, "size": key[2], "reason": "too-large"})
                continue
            node.file_count += 1
            node.byte_count += key[2]
            hit = details.get(name)
            item: list[Any] = [os.fsencode(name), mode, None]
            if hit is not None and hit[0] == key and not hit[2]:
                item[2] = hit[1]
            else:
                self.jobs.append(FileJob(prefix + name, entry.path, key, mode, item))
            node.entries.append(item)
            node.files.append((name, key, item))
        for child in node.children:
            node.entries.append([os.fsencode(os.path.basename(child.rel)), MODE_DIR, child])


def scan_workspace(
    workspace: str, cache: StatCache, exclude: set[str], max_size: int
) -> ScanResult:
    """Walk ``workspace`` (absolute) and return its tree plus the files still to hash.

    ``exclude`` holds absolute directory paths never to enter (the store, worktrees).
    """
    scanner = _Scanner(cache, exclude, max_size)
    listing = scanner.list_dir(workspace, "", IgnoreRules.empty())
    scanner.stat_all()
    if listing is None:
        root = DirNode("")
        scanner.dirs.append(root)
    else:
        root = scanner.resolve(listing)
    return ScanResult(root, scanner.jobs, scanner.dirs, scanner.skipped)
