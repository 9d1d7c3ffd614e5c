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
changed. Each directory is listed through a descriptor and its files are ``fstatat``-ed by
name; a directory whose names are all plain and that no ignore rule reaches is sorted without
per-name checks.
"""

from __future__ import annotations

import contextlib
import marshal
import operator
import os
import zlib
from collections.abc import Callable
from typing import Any

from . import progress
from .dirtree import DirNode, DirScan, FileJob, Resolver, carried_records
from .errors import WorkspaceUnreadable
from .fsutil import is_workspace_tmp, remove_stale_workspace_tmp
from .ignore import IgnoreRules, read_ignore_file
from .paths import STORE_DIR_NAME, are_plain_names, component_problem, is_plain_name
from .plain import Frozen
from .statcache import DirRecord, StatCache, StatKey

__all__ = ["DirNode", "FileJob", "KnownChanges", "ScanResult", "scan_workspace"]

_SPECIAL = frozenset((".git", ".gitignore", ".narrativeignore"))
_PARALLEL_MIN_DIRS = 200
"""Fork workers only for workspaces whose last snapshot had at least this many directories."""
_UNITS_PER_WORKER = 8
_MAX_BATCHES = 1024
"""Units are queued in at most this many batches (two bytes a batch number: PIPE_BUF holds them)."""
_stat_key: Callable[[os.stat_result], StatKey] = operator.attrgetter(
    "st_mtime_ns", "st_ctime_ns", "st_size", "st_ino", "st_mode"
)
"""The stat key of a file (see :mod:`narrative.statcache`), taken in C."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


class KnownChanges(Frozen):
    """What a complete journal says changed since the cache was written."""

    __slots__ = ("dirs", "trees")
    FIELDS = ("dirs", "trees")
    dirs: frozenset[str]
    """Directories whose entries, or an entry's content or metadata, may have changed."""
    trees: frozenset[str]
    """Directories (new or moved in) to walk entirely."""

    def __init__(self, dirs: frozenset[str], trees: frozenset[str]) -> None:
        self.set_fields(dirs, trees)


class _Walker:
    """Lists and stats directories; shared by the parent and the forked workers."""

    def __init__(
        self, cached: dict[str, DirRecord], exclude: set[str], sweep_tmp: bool = False
    ) -> None:
        self.cached = cached
        self.exclude = exclude
        self.sweep_tmp = sweep_tmp
        self.scans: list[DirScan] = []
        self.reused: set[str] = set()
        self.unreadable: list[dict[str, Any]] = []
        #: counts the files listed (a no-op in forked workers: the parent counts theirs)
        self.advance: Callable[[int], None] = progress.ignore

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

    def _sort(
        self, abs_dir: str, rel_dir: str, entries: list[os.DirEntry[str]], rules: IgnoreRules
    ) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]], IgnoreRules]:
        """Files and subdirectories to take, and the rules in force below."""
        names = [e.name for e in entries]
        if rules or not are_plain_names("\0".join(names) + "\0"):
            return self._sort_entries(abs_dir, rel_dir, entries, set(names), rules)
        # the common case, decided in one match: no special, unsafe or temporary name and no
        # ignore rule, so each entry only needs its type (from the listing, no syscall)
        files: list[os.DirEntry[str]] = []
        subdirs: list[os.DirEntry[str]] = []
        for entry in entries:
            try:
                (subdirs if entry.is_dir(follow_symlinks=False) else files).append(entry)
            except OSError as exc:
                self._unreadable_entry(rel_dir, entry.name, exc)
        if self.exclude and subdirs:
            subdirs = [e for e in subdirs if os.path.join(abs_dir, e.name) not in self.exclude]
        return files, subdirs, rules

    def _sort_entries(
        self,
        abs_dir: str,
        rel_dir: str,
        entries: list[os.DirEntry[str]],
        names: set[str],
        rules: IgnoreRules,
    ) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]], IgnoreRules]:
        """Files and subdirectories to take, applying every naming and ignore rule; returns
        them with the rules in force below (this directory's ignore files added)."""
        if not names.isdisjoint(_SPECIAL):
            rules = self._rules_for(abs_dir, rel_dir, names, rules)
        prefix = rel_dir + "/" if rel_dir else ""
        files: list[os.DirEntry[str]] = []
        subdirs: list[os.DirEntry[str]] = []
        for entry in entries:
            name = entry.name
            if name == ".git":
                continue
            if not rel_dir and name == STORE_DIR_NAME:
                continue  # the store's marker: never captured, whatever an agent put there
            if not is_plain_name(name):
                problem = component_problem(name, top_level=not rel_dir)
                if problem is not None:
                    # e.g. ".GIT", "git~1", ".Narrative": never stored, so no restore, merge
                    # or import elsewhere can write it into a .git or the store
                    self.unreadable.append({"path": prefix + name, "reason": f"unsafe: {problem}"})
                    continue
            if is_workspace_tmp(name):
                # a restore's or merge's file in flight (or left by a kill): never captured;
                # swept at once by a writer holding the workspace lock, else once stale
                path = os.path.join(abs_dir, name)
                with contextlib.suppress(OSError):
                    if self.sweep_tmp:
                        os.unlink(path)
                    else:
                        remove_stale_workspace_tmp(path, entry.stat(follow_symlinks=False))
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                self._unreadable_entry(rel_dir, name, exc)
                continue
            if is_dir:
                if os.path.join(abs_dir, name) in self.exclude or (
                    rules and rules.is_ignored(prefix + name, True)
                ):
                    continue
                subdirs.append(entry)
            elif not (rules and rules.is_ignored(prefix + name, False)):
                files.append(entry)
        return files, subdirs, rules

    def _stat_slowly(
        self, rel_dir: str, files: list[os.DirEntry[str]]
    ) -> tuple[list[os.DirEntry[str]], list[os.stat_result]]:
        """Stat one by one: entries that vanished since the listing are left out, those that
        fail otherwise are left out and reported."""
        kept, stats = [], []
        for entry in files:
            try:
                stats.append(entry.stat(follow_symlinks=False))
                kept.append(entry)
            except OSError as exc:
                self._unreadable_entry(rel_dir, entry.name, exc)
        return kept, stats

    def _unreadable_entry(self, rel_dir: str, name: str, exc: OSError) -> None:
        """An entry of a listing that cannot be looked at: gone since (nothing to say), or
        reported with the snapshot's skipped paths, as an unreadable directory is (a file
        dropped without a word would read as deleted in the snapshot)."""
        if not isinstance(exc, FileNotFoundError):
            path = f"{rel_dir}/{name}" if rel_dir else name
            self.unreadable.append({"path": path, "reason": f"unreadable: {exc.strerror}"})

    def visit(
        self, abs_dir: str, rel_dir: str, rules: IgnoreRules
    ) -> tuple[list[str], list[tuple[str, str, IgnoreRules]]] | None:
        """Scan one directory; returns its subdirectory rels and what to visit next."""
        try:
            # listed through a descriptor, so each entry's lstat is an fstatat of its name
            # alone (no walk of the whole path per file); never through a symlink
            fd = os.open(abs_dir, _DIR_FLAGS)
        except OSError as exc:
            self.unreadable.append(
                {"path": rel_dir or ".", "reason": f"unreadable: {exc.strerror}"}
            )
            return None
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            files, subdirs, rules = self._sort(abs_dir, rel_dir, entries, rules)
            try:
                stats = [e.stat(follow_symlinks=False) for e in files]
            except OSError:
                files, stats = self._stat_slowly(rel_dir, files)
        except OSError as exc:
            self.unreadable.append(
                {"path": rel_dir or ".", "reason": f"unreadable: {exc.strerror}"}
            )
            return None
        finally:
            os.close(fd)
        prefix = rel_dir + "/" if rel_dir else ""
        keys: list[StatKey] = list(map(_stat_key, stats))
        self.advance(len(keys))
        file_names = [e.name for e in files]
        sub_names = [e.name for e in subdirs]
        listing = "\0".join(file_names) + "\0/\0" + "\0".join(sub_names)
        sig = hash((tuple(keys), zlib.crc32(listing.encode("utf-8", "surrogateescape"))))
        cached = self.cached.get(rel_dir)
        own = (
            None
            if cached is not None and cached[0] == sig
            else list(zip(file_names, keys, strict=True))
        )
        children = [prefix + n for n in sub_names]
        self.scans.append((rel_dir, sig, True, children, own))
        return children, [(os.path.join(abs_dir, name), prefix + name, rules) for name in sub_names]

    def walk(self, abs_dir: str, rel_dir: str, rules: IgnoreRules) -> bool:
        """Scan a whole subtree; False if its top could not be read."""
        visited = self.visit(abs_dir, rel_dir, rules)
        if visited is None:
            return False
        index = len(self.scans) - 1
        complete = True
        for child_abs, child_rel, child_rules in visited[1]:
            complete = self.walk(child_abs, child_rel, child_rules) and complete
        if not complete:
            self._mark_incomplete(index)
        return True

    def _mark_incomplete(self, index: int) -> None:
        rel, sig, _c, children, own = self.scans[index]
        self.scans[index] = (rel, sig, False, children, own)

    def walk_known(
        self, abs_dir: str, rel_dir: str, rules: IgnoreRules, visit: set[str], known: KnownChanges
    ) -> bool:
        """Like :meth:`walk`, but only into ``visit`` (the changed directories and their
        ancestors) and directories the cache does not know; every other subdirectory is left
        to be taken from the cache as is (listed in :attr:`reused`)."""
        if rel_dir in known.trees or rel_dir not in self.cached:
            return self.walk(abs_dir, rel_dir, rules)
        visited = self.visit(abs_dir, rel_dir, rules)
        if visited is None:
            return False
        index = len(self.scans) - 1
        complete = True
        for child_abs, child_rel, child_rules in visited[1]:
            if child_rel in visit or child_rel not in self.cached:
                walked = self.walk_known(child_abs, child_rel, child_rules, visit, known)
                complete = walked and complete
            else:
                self.reused.add(child_rel)
        if not complete:
            self._mark_incomplete(index)
        return True


def _walk_in_workers(
    walker: _Walker, units: list[tuple[str, str, IgnoreRules]], workers: int
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
                    child = _Walker(walker.cached, walker.exclude, walker.sweep_tmp)
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
    walker: _Walker, queue: int, batches: list[list[tuple[str, str, IgnoreRules]]]
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


def _units(walker: _Walker, workspace: str, want: int) -> list[tuple[str, str, IgnoreRules]] | None:
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
) -> ScanResult:
    """Walk ``workspace`` (absolute) and return its tree plus the files still to hash.

    ``exclude`` holds absolute directory paths never to enter (the store, worktrees).
    ``sweep_tmp``: remove every temporary file of ours found (the caller holds the workspace
    lock, so none of them belongs to a live writer). ``known``: a complete account of what
    changed since ``cache`` was written (the watcher's journal); only those directories are
    listed, the rest is taken from the cache.
    """
    walker = _Walker(cache.dirs, exclude, sweep_tmp)
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
