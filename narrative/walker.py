"""Listing and ``lstat``-ing the directories of a workspace: what a snapshot's walk
(:mod:`narrative.scan`) does per directory, in this process or a forked worker.

Each directory is listed through a descriptor (``O_NOFOLLOW``) and its files are ``fstatat``-ed
by name; a directory whose names are all plain and that no ignore rule reaches is sorted without
per-name checks. The listing and the ``lstat`` calls are made in C (``narrative/_listing.c``)
when the package was built with it, else through ``os.scandir``, with the same results: every
naming and ignore rule is applied here, in Python, either way.
"""

from __future__ import annotations

import contextlib
import operator
import os
import zlib
from collections.abc import Callable
from typing import Any

from . import progress
from .dirtree import DirScan
from .fsutil import is_workspace_tmp, remove_stale_workspace_tmp
from .ignore import IgnoreRules, read_ignore_file
from .paths import STORE_DIR_NAME, are_plain_names, component_problem, is_plain_name
from .plain import Frozen
from .statcache import DirRecord, StatKey

__all__ = ["NATIVE_LISTER", "KnownChanges", "Listing", "Walker"]

_SPECIAL = frozenset((".git", ".gitignore", ".narrativeignore"))
_stat_key: Callable[[os.stat_result], StatKey] = operator.attrgetter(
    "st_mtime_ns", "st_ctime_ns", "st_size", "st_ino", "st_mode"
)
"""The stat key of a file (see :mod:`narrative.statcache`), taken in C."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Listing = tuple[list[str], list[StatKey], list[str], list[tuple[str, int, bool]]]
"""What the C lister returns for a directory: names of its non-directories, their stat keys,
names of its subdirectories, and (name, errno, type unknown) of the entries it could not
``lstat`` (type unknown: the listing did not say whether it is a directory)."""


def _mtime_ns(source: os.DirEntry[str] | StatKey | None) -> int:
    """An entry's mtime from what the listing gave: its ``DirEntry``, its stat key, or nothing
    (OSError: an entry of no known age, left for a later sweep)."""
    if source is None:
        raise OSError("not stat-ed")
    if isinstance(source, tuple):
        return source[0]
    return source.stat(follow_symlinks=False).st_mtime_ns


def _native_lister() -> Callable[[int], Listing] | None:
    if os.environ.get("NARRATIVE_NATIVE_LISTER") == "0":  # to rule it out, or to compare
        return None
    try:
        from ._listing import list_dir
    except ImportError:  # built without a C compiler (hatch_build.py): os.scandir it is
        return None
    return list_dir


NATIVE_LISTER = _native_lister()
"""The C lister's ``list_dir(fd)``; None when the package was built without it, or when
``NARRATIVE_NATIVE_LISTER=0`` is set."""


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


class Walker:
    """Lists and stats directories; shared by the parent and the forked workers."""

    def __init__(
        self,
        cached: dict[str, DirRecord],
        exclude: set[str],
        sweep_tmp: bool = False,
        lister: Callable[[int], Listing] | None = None,
    ) -> None:
        self.cached = cached
        self.exclude = exclude
        self.sweep_tmp = sweep_tmp
        self.lister = lister
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
            if not self._admit(abs_dir, rel_dir, name, entry):
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

    def _admit(
        self, abs_dir: str, rel_dir: str, name: str, source: os.DirEntry[str] | StatKey | None
    ) -> bool:
        """Whether an entry's name may be taken, before its type and the ignore rules are
        asked: never ``.git``, the store's marker, an unsafe name (reported) or a temporary
        file of ours (swept once stale: its age from ``source``, see :func:`_mtime_ns`)."""
        if name == ".git":
            return False
        if not rel_dir and name == STORE_DIR_NAME:
            return False  # the store's marker: never captured, whatever an agent put there
        if not is_plain_name(name):
            problem = component_problem(name, top_level=not rel_dir)
            if problem is not None:
                # e.g. ".GIT", "git~1", ".Narrative": never stored, so no restore, merge
                # or import elsewhere can write it into a .git or the store
                path = f"{rel_dir}/{name}" if rel_dir else name
                self.unreadable.append({"path": path, "reason": f"unsafe: {problem}"})
                return False
        if is_workspace_tmp(name):
            # a restore's or merge's file in flight (or left by a kill): never captured;
            # swept at once by a writer holding the workspace lock, else once stale
            path = os.path.join(abs_dir, name)
            with contextlib.suppress(OSError):
                if self.sweep_tmp:
                    os.unlink(path)
                else:
                    remove_stale_workspace_tmp(path, _mtime_ns(source))
            return False
        return True

    def _sort_listed(
        self, abs_dir: str, rel_dir: str, listed: Listing, names: set[str], rules: IgnoreRules
    ) -> tuple[list[str], list[StatKey], list[str], IgnoreRules]:
        """:meth:`_sort_entries` for the C lister's listing: the same rules, the same result."""
        files, keys, subdirs, failed = listed
        if not names.isdisjoint(_SPECIAL):
            rules = self._rules_for(abs_dir, rel_dir, names, rules)
        prefix = rel_dir + "/" if rel_dir else ""
        taken: list[str] = []
        taken_keys: list[StatKey] = []
        for name, key in zip(files, keys, strict=True):
            if self._admit(abs_dir, rel_dir, name, key) and not (
                rules and rules.is_ignored(prefix + name, False)
            ):
                taken.append(name)
                taken_keys.append(key)
        entered = [
            name
            for name in subdirs
            if self._admit(abs_dir, rel_dir, name, None)
            and os.path.join(abs_dir, name) not in self.exclude
            and not (rules and rules.is_ignored(prefix + name, True))
        ]
        for name, error, type_unknown in failed:
            # as os.scandir's path: an entry of unknown type fails at its is_dir (reported
            # whatever the rules); a non-directory is reported unless ignored
            if self._admit(abs_dir, rel_dir, name, None) and (
                type_unknown or not (rules and rules.is_ignored(prefix + name, False))
            ):
                self._unlisted(rel_dir, name, error)
        return taken, taken_keys, entered, rules

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

    def _unlisted(self, rel_dir: str, name: str, error: int) -> None:
        """:meth:`_unreadable_entry` for an entry the C lister could not ``lstat``."""
        self._unreadable_entry(rel_dir, name, OSError(error, os.strerror(error)))

    def visit(
        self, abs_dir: str, rel_dir: str, rules: IgnoreRules
    ) -> tuple[list[str], list[tuple[str, str, IgnoreRules]]] | None:
        """Scan one directory; returns its subdirectory rels and what to visit next."""
        fd = -1
        try:
            # listed through a descriptor, so each entry's lstat is an fstatat of its name
            # alone (no walk of the whole path per file); never through a symlink
            fd = os.open(abs_dir, _DIR_FLAGS)
            file_names, keys, sub_names, rules = self._list(fd, abs_dir, rel_dir, rules)
        except OSError as exc:
            self.unreadable.append(
                {"path": rel_dir or ".", "reason": f"unreadable: {exc.strerror}"}
            )
            return None
        finally:
            if fd >= 0:
                os.close(fd)
        prefix = rel_dir + "/" if rel_dir else ""
        self.advance(len(keys))
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

    def _list(
        self, fd: int, abs_dir: str, rel_dir: str, rules: IgnoreRules
    ) -> tuple[list[str], list[StatKey], list[str], IgnoreRules]:
        """Names and stat keys of the files to take, names of the subdirectories to enter, and
        the rules in force below."""
        if self.lister is not None:
            listed = self.lister(fd)
            files, keys, subdirs, failed = listed
            names = [*files, *subdirs, *(name for name, _, _ in failed)]
            if rules or not are_plain_names("\0".join(names) + "\0"):
                return self._sort_listed(abs_dir, rel_dir, listed, set(names), rules)
            # the common case (see _sort): every entry is taken as the listing typed it
            for name, error, _ in failed:
                self._unlisted(rel_dir, name, error)
            if self.exclude and subdirs:
                subdirs = [n for n in subdirs if os.path.join(abs_dir, n) not in self.exclude]
            return files, keys, subdirs, rules
        with os.scandir(fd) as it:
            entries = list(it)
        found, subdir_entries, rules = self._sort(abs_dir, rel_dir, entries, rules)
        try:
            stats = [e.stat(follow_symlinks=False) for e in found]
        except OSError:
            found, stats = self._stat_slowly(rel_dir, found)
        names = [e.name for e in found]
        return names, list(map(_stat_key, stats)), [e.name for e in subdir_entries], rules

    def walk(self, abs_dir: str, rel_dir: str, rules: IgnoreRules) -> bool:
        """Scan a whole subtree; False if its top could not be read."""
        return self._walk(abs_dir, rel_dir, rules, None)

    def walk_known(
        self, abs_dir: str, rel_dir: str, rules: IgnoreRules, visit: set[str], known: KnownChanges
    ) -> bool:
        """Like :meth:`walk`, but only into ``visit`` (the changed directories and their
        ancestors) and directories the cache does not know; every other subdirectory is left
        to be taken from the cache as is (listed in :attr:`reused`)."""
        return self._walk(abs_dir, rel_dir, rules, (visit, known))

    def _walk(
        self,
        abs_dir: str,
        rel_dir: str,
        rules: IgnoreRules,
        only: tuple[set[str], KnownChanges] | None,
    ) -> bool:
        if only is not None and (rel_dir in only[1].trees or rel_dir not in self.cached):
            only = None  # new or moved in: walked whole
        visited = self.visit(abs_dir, rel_dir, rules)
        if visited is None:
            return False
        index = len(self.scans) - 1
        complete = True
        for child_abs, child_rel, child_rules in visited[1]:
            if only is None or child_rel in only[0] or child_rel not in self.cached:
                complete = self._walk(child_abs, child_rel, child_rules, only) and complete
            else:
                self.reused.add(child_rel)
        if not complete:
            self._mark_incomplete(index)
        return True

    def _mark_incomplete(self, index: int) -> None:
        rel, sig, _c, children, own = self.scans[index]
        self.scans[index] = (rel, sig, False, children, own)
