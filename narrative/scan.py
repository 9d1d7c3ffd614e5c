"""Walk a workspace into an in-memory tree, deciding what a snapshot contains.

Rules: ``.gitignore`` at every level, ``.git/info/exclude`` of the workspace repo and of every
nested repo, ``.narrativeignore`` (highest precedence in its directory), the store itself, and
every ``.git`` entry are excluded. Files inside nested repos are ordinary files. Symlinks are
recorded as symlinks (never followed); only regular files, symlinks and directories are taken;
regular files over the size cap are skipped and reported.

The walk is the hot path of every snapshot. Per directory it lists, stats, and hashes the stat
keys and names into a signature (see :mod:`narrative.statcache`); :mod:`narrative.dirtree` then
reuses the cached tree of every subtree whose signatures all match, and looks at individual
files only in changed directories; files whose stat key moved become :class:`FileJob` objects
that the blob writer hashes later, in parallel.

``lstat`` dominates and scales across processes (not threads: here they contend), so large
workspaces are walked by this process and forked worker processes, each taking a share of the
subtrees; the workers send back only signatures, plus file listings of the directories that
changed. Listing and ``lstat``-ing one directory is :mod:`narrative.walker`'s.
"""

from __future__ import annotations

import marshal
import os
from typing import Any

from . import progress
from .dirtree import DirNode, FileJob, Resolver, carried_records
from .errors import WorkspaceUnreadable
from .ignore import IgnoreRules
from .statcache import DirRecord, StatCache
from .walker import NATIVE_LISTER, KnownChanges, Walker

__all__ = ["DirNode", "FileJob", "KnownChanges", "ScanResult", "scan_workspace"]

_PARALLEL_MIN_DIRS = 200
"""Fork workers only for workspaces whose last snapshot had at least this many directories."""
_UNITS_PER_WORKER = 8
_MAX_BATCHES = 1024
"""Units are queued in at most this many batches (two bytes a batch number: PIPE_BUF holds them)."""


class ScanResult:
    """Everything a snapshot needs from the walk.

    (The scan's records are plain classes, not dataclasses: the decorator costs import time at
    every snapshot's start.)"""

    root: DirNode
    jobs: list[FileJob]
    dirs: list[DirNode]
    skipped: list[dict[str, Any]]
    listed: int
    """Directories listed and stat'ed (the rest came from the cache untouched)."""
    journal: tuple[str, int] | None
    """The watcher's journal position this scan is complete as of (:mod:`narrative.watch`)."""
    carried: dict[str, DirRecord]
    """Records of the directories below those reused from the cache as they are (settled
    subtrees, a journal's unchanged ones): part of the tree, but not in ``dirs`` (no node is
    built for them)."""
    unchanged: bool
    """Nothing was listed: the journal shows no change since the stat cache was taken, whose
    records and tree stand as they are (``root``, ``dirs`` and ``jobs`` are left empty)."""

    def __init__(
        self,
        root: DirNode,
        jobs: list[FileJob],
        dirs: list[DirNode],
        skipped: list[dict[str, Any]],
        listed: int = 0,
        journal: tuple[str, int] | None = None,
        carried: dict[str, DirRecord] | None = None,
        unchanged: bool = False,
    ) -> None:
        self.root = root
        self.jobs = jobs
        self.dirs = dirs
        self.skipped = skipped
        self.listed = listed
        self.journal = journal
        self.carried = {} if carried is None else carried
        self.unchanged = unchanged


def _walk_in_workers(
    walker: Walker, units: list[tuple[str, str, IgnoreRules]], workers: int
) -> None:
    """Walk ``units`` in ``workers`` processes: this one and forked ones (as many as it can
    fork), each taking the next batch of units from a shared queue until it is empty, so one
    that drew small subtrees takes more of them. Unreadable units are left out of the scans."""
    size = -(-len(units) // _MAX_BATCHES)
    batches = [units[i : i + size] for i in range(0, len(units), size)]
    try:
        queue, filler = os.pipe()
    except OSError:  # no queue to share: this process walks every unit
        for path, rel, rules in units:
            walker.walk(path, rel, rules)
        return
    # every batch number at once: at most PIPE_BUF bytes, so this never blocks; with the write
    # end closed before any fork, a read of the empty queue says the work is done
    os.write(filler, b"".join(i.to_bytes(2, "big") for i in range(len(batches))))
    os.close(filler)
    results: list[tuple[int, int]] = []
    try:
        for _ in range(workers - 1):
            try:
                read_fd, write_fd = os.pipe()
            except OSError:
                break
            try:
                pid = os.fork()
            except OSError:
                os.close(read_fd)
                os.close(write_fd)
                break
            if pid == 0:  # pragma: no cover - runs in the child
                os.close(read_fd)
                code = 0
                try:
                    child = Walker(walker.cached, walker.exclude, walker.sweep_tmp, walker.lister)
                    _walk_queued(child, queue, batches)
                    payload = marshal.dumps((child.scans, child.unreadable))
                    with os.fdopen(write_fd, "wb") as out:
                        out.write(payload)
                except BaseException:
                    code = 1
                os._exit(code)
            os.close(write_fd)
            results.append((pid, read_fd))
        # meanwhile: this process is one of the workers
        _walk_queued(walker, queue, batches)
    finally:
        os.close(queue)
        returned = [(_read_all(read_fd), os.waitpid(pid, 0)[1]) for pid, read_fd in results]
    broken = False
    for data, status in returned:
        if status != 0 or not data:
            broken = True
            continue
        scans, unreadable = marshal.loads(data)
        walker.advance(sum(len(scan[4]) for scan in scans if scan[4] is not None))
        walker.scans.extend(scans)
        walker.unreadable.extend(unreadable)
    if broken:
        raise OSError("a workspace scanning worker failed")


def _walk_queued(
    walker: Walker, queue: int, batches: list[list[tuple[str, str, IgnoreRules]]]
) -> None:
    """Walk batches of units by the numbers read from ``queue`` until it is empty."""
    # each number is two bytes and the queue holds whole numbers only: a read of two bytes
    # takes one whole number (readers of a pipe take turns), or none at the end
    while number := os.read(queue, 2):
        for path, rel, rules in batches[int.from_bytes(number, "big")]:
            walker.walk(path, rel, rules)


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as inp:
        return inp.read()


def _units(walker: Walker, workspace: str, want: int) -> list[tuple[str, str, IgnoreRules]] | None:
    """Scan the top of the tree in this process until there are ``want`` subtrees to share."""
    frontier: list[tuple[str, str, IgnoreRules]] = [(workspace, "", IgnoreRules.empty())]
    top = True
    while frontier and (top or len(frontier) < want):
        expanded: list[tuple[str, str, IgnoreRules]] = []
        for path, rel, rules in frontier:
            visited = walker.visit(path, rel, rules)
            if visited is None:
                if top:
                    return None
                continue
            expanded.extend(visited[1])
        frontier = expanded
        top = False
        if len(walker.scans) > 64:
            break
    return frontier


def _to_visit(known: KnownChanges, cached: dict[str, DirRecord]) -> set[str]:
    """The changed directories, those the cache cannot vouch for (racy or incomplete, stored
    without a signature), and all their ancestors."""
    targets = set(known.dirs) | known.trees
    targets.update(rel for rel, record in cached.items() if record[0] is None)
    visit = {""}
    for target in targets:
        rel = target
        while rel not in visit:
            visit.add(rel)
            rel = rel.rpartition("/")[0]
    return visit


def scan_workspace(
    workspace: str,
    cache: StatCache,
    exclude: set[str],
    max_size: int,
    sweep_tmp: bool = False,
    known: KnownChanges | None = None,
    native: bool = True,
) -> ScanResult:
    """Walk ``workspace`` (absolute) and return its tree plus the files still to hash.

    ``exclude`` holds absolute directory paths never to enter (the store, worktrees).
    ``sweep_tmp``: remove every temporary file of ours found (the caller holds the workspace
    lock, so none of them belongs to a live writer). ``known``: a complete account of what
    changed since ``cache`` was written (the watcher's journal); only those directories are
    listed, the rest is taken from the cache. ``native``: list with the C lister when it is
    built (:data:`NATIVE_LISTER`); False lists through ``os.scandir``, with the same result.
    """
    walker = Walker(cache.dirs, exclude, sweep_tmp, NATIVE_LISTER if native else None)
    workers = min(os.cpu_count() or 1, 4)
    with progress.stage("scanning", None, "files") as walker.advance:
        if known is not None:
            visit = _to_visit(known, cache.dirs)
            walker.walk_known(workspace, "", IgnoreRules.empty(), visit, known)
        elif workers > 1 and len(cache.dirs) >= _PARALLEL_MIN_DIRS:
            units = _units(walker, workspace, workers * _UNITS_PER_WORKER)
            if units:
                # unreadable units are absent from the scans; resolve() handles that
                _walk_in_workers(walker, units, workers)
        else:
            walker.walk(workspace, "", IgnoreRules.empty())
    scans = {scan[0]: scan for scan in walker.scans}
    resolver = Resolver(workspace, cache, max_size, scans, walker.reused)
    if "" not in scans:  # the top could not be listed: an empty tree would say all was deleted
        why = next((u["reason"] for u in walker.unreadable if u["path"] == "."), "unreadable")
        raise WorkspaceUnreadable(workspace, why)
    resolver.settle("")
    root = resolver.resolve("")
    carried = resolver.carried
    if walker.reused:
        decided = {node.rel for node in resolver.dirs}.union(carried)
        below_reused = carried_records(cache.dirs, walker.reused, decided)
        for record in below_reused.values():
            resolver.skipped.extend(record[4])
        carried.update(below_reused)
    # in path order: the same report whichever worker listed what, and whatever was reused
    skipped = sorted(walker.unreadable + resolver.skipped, key=lambda s: str(s["path"]))
    return ScanResult(
        root, resolver.jobs, resolver.dirs, skipped, len(walker.scans), carried=carried
    )
