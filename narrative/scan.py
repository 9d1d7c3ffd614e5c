"""Walk a workspace into an in-memory tree, deciding what a snapshot contains.

Rules: ``.gitignore`` at every level, ``.git/info/exclude`` of the workspace repo and of every
nested repo, ``.narrativeignore`` (highest precedence in its directory), the store itself, and
every ``.git`` entry are excluded. Files inside nested repos are ordinary files. Symlinks are
recorded as symlinks (never followed); only regular files, symlinks and directories are taken;
regular files over the size cap are skipped and reported.

The walk compares each file's stat key with the :class:`~narrative.statcache.StatCache`; misses
become :class:`FileJob` objects that the blob writer hashes later, in parallel.
"""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any

from .ignore import IgnoreRules, read_ignore_file
from .objects import MODE_DIR, MODE_EXEC, MODE_FILE, MODE_LINK
from .statcache import StatCache, StatKey

__all__ = ["DirNode", "FileJob", "ScanResult", "scan_workspace"]

IGNORE_FILES = (".gitignore", ".narrativeignore")


@dataclass(slots=True)
class FileJob:
    """A file whose blob id must be computed (stat cache miss)."""

    rel: str
    path: str
    key: StatKey
    mode: int
    entry: list[Any]
    """The owning directory's entry ``[name, mode, oid]``; the writer fills in the oid."""


@dataclass(slots=True)
class DirNode:
    """One directory: its tree entries and whether its cached tree id is still valid."""

    rel: str
    entries: list[list[Any]] = field(default_factory=list)
    children: list[DirNode] = field(default_factory=list)
    reusable: bool = True
    oid: bytes | None = None


@dataclass
class ScanResult:
    """Everything a snapshot needs from the walk."""

    root: DirNode
    jobs: list[FileJob]
    files: dict[str, tuple[StatKey, bytes]]
    skipped: list[dict[str, Any]]
    file_count: int = 0
    byte_count: int = 0


def _mode_of(st_mode: int) -> int | None:
    if stat_mod.S_ISREG(st_mode):
        return MODE_EXEC if st_mode & stat_mod.S_IXUSR else MODE_FILE
    if stat_mod.S_ISLNK(st_mode):
        return MODE_LINK
    return None


class _Scanner:
    def __init__(self, workspace: str, cache: StatCache, exclude: set[str], max_size: int):
        self.workspace = workspace
        self.cache_files = cache.files
        self.cache_trees = cache.trees
        self.exclude = exclude
        self.max_size = max_size
        self.jobs: list[FileJob] = []
        self.files: dict[str, tuple[StatKey, bytes]] = {}
        self.skipped: list[dict[str, Any]] = []
        self.file_count = 0
        self.byte_count = 0

    def _rules_for(
        self, abs_dir: str, rel_dir: str, names: set[str], rules: IgnoreRules
    ) -> IgnoreRules:
        if ".git" in names:
            exclude = os.path.join(abs_dir, ".git", "info", "exclude")
            rules = rules.extend(read_ignore_file(exclude), rel_dir)
        for fname in IGNORE_FILES:
            if fname in names:
                rules = rules.extend(read_ignore_file(os.path.join(abs_dir, fname)), rel_dir)
        return rules

    def scan(self, abs_dir: str, rel_dir: str, rules: IgnoreRules) -> DirNode | None:
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except OSError as exc:
            self.skipped.append({"path": rel_dir or ".", "reason": f"unreadable: {exc.strerror}"})
            return None
        names = {e.name for e in entries}
        if names & {".git", ".gitignore", ".narrativeignore"}:
            rules = self._rules_for(abs_dir, rel_dir, names, rules)
        node = DirNode(rel_dir)
        prefix = rel_dir + "/" if rel_dir else ""
        cache_files = self.cache_files
        reusable = True
        for entry in entries:
            name = entry.name
            if name == ".git":
                continue
            rel = prefix + name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if entry.path in self.exclude or (rules and rules.is_ignored(rel, True)):
                    continue
                child = self.scan(entry.path, rel, rules)
                if child is None or not child.entries:
                    continue
                reusable = reusable and child.reusable
                node.children.append(child)
                node.entries.append([os.fsencode(name), MODE_DIR, child])
                continue
            if rules and rules.is_ignored(rel, False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished since the listing
            mode = _mode_of(st.st_mode)
            if mode is None:
                continue  # sockets, fifos, devices: never content
            if mode != MODE_LINK and st.st_size > self.max_size:
                self.skipped.append({"path": rel, "size": st.st_size, "reason": "too-large"})
                continue
            self.file_count += 1
            self.byte_count += st.st_size
            key = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, mode)
            hit = cache_files.get(rel)
            if hit is not None and hit[0] == key:
                node.entries.append([os.fsencode(name), mode, hit[1]])
                self.files[rel] = hit
            else:
                item: list[Any] = [os.fsencode(name), mode, None]
                node.entries.append(item)
                self.jobs.append(FileJob(rel, entry.path, key, mode, item))
                reusable = False
        if reusable:
            cached = self.cache_trees.get(rel_dir)
            if cached is not None and cached[1] == len(node.entries):
                node.oid = cached[0]
            else:
                reusable = False
        node.reusable = reusable
        return node


def scan_workspace(
    workspace: str, cache: StatCache, exclude: set[str], max_size: int
) -> ScanResult:
    """Walk ``workspace`` (absolute) and return its tree plus the files still to hash.

    ``exclude`` holds absolute directory paths never to enter (the store, worktrees).
    """
    scanner = _Scanner(workspace, cache, exclude, max_size)
    root = scanner.scan(workspace, "", IgnoreRules.empty())
    if root is None:
        root = DirNode("", reusable=False)
    return ScanResult(
        root, scanner.jobs, scanner.files, scanner.skipped, scanner.file_count, scanner.byte_count
    )
