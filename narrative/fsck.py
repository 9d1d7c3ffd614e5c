"""The object checks of ``git fsck --strict``, in one place, and the store check built on them.

Imports run :func:`object_problems` on every new commit and tree before any ref moves, and
``narrative fsck`` (:func:`check_store`) runs it on every object reachable from any ref, so a
store never holds an object that stock ``git fsck --strict`` would reject. Warnings that
``--strict`` turns into errors count as problems here (``.git`` entries, ``.``/``..``/empty
names, names holding ``/``, zero-padded modes), and so do modes git only reports
(group-writable files): the engine never writes them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from .commitmsg import is_snapshot_commit, snapshot_from_commit
from .errors import NarrativeError
from .models import AgentRun, Objective, Thread
from .objects import parse_commit

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "check_store",
    "check_tree",
    "long_names",
    "object_problems",
    "tree_links",
]

NAME_MAX = 255
"""Longest file name (bytes) Linux file systems accept: longer ones could never be restored."""
PATH_MAX = 4095
"""Longest path (bytes, relative to the workspace) accepted from outside."""

_HEX40 = re.compile(rb"[0-9a-f]{40}")
_MODES = {b"100644", b"100755", b"120000", b"40000", b"160000"}
_GITLINK = b"160000"
# code points HFS+ ignores when comparing names, so ".g\u200cit" is ".git" there (git's
# is_hfs_dotgit)
_HFS_IGNORED = re.compile("[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]")


def _is_dotgit(name: bytes) -> bool:
    """Names that some file system treats as ``.git`` (git's verify_path rules)."""
    lowered = name.lower()
    if lowered == b".git" or lowered.rstrip(b". ") in (b".git", b"git~1"):
        return True
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _HFS_IGNORED.sub("", text).lower() == ".git"


def _tree_entries(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(raw mode, name, oid) of each entry; ValueError when the tree does not parse."""
    entries: list[tuple[bytes, bytes, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        space = data.find(b" ", pos)
        nul = data.find(b"\x00", space + 1) if space >= 0 else -1
        if space < 0 or nul < 0 or nul + 21 > end:
            raise ValueError("truncated tree entry")
        mode = data[pos:space]
        # the five valid modes first: the digit scan was a third of a received tree's checks
        if mode not in _MODES and (
            not mode or not mode.isdigit() or any(c > ord("7") for c in mode)
        ):
            raise ValueError(f"bad mode {mode!r}")
        entries.append((mode, data[space + 1 : nul], data[nul + 1 : nul + 21]))
        pos = nul + 21
    return entries


def _tree_problems(data: bytes) -> list[str]:
    try:
        entries = _tree_entries(data)
    except ValueError as exc:
        return [f"badTree: {exc}"]
    return _entry_problems(entries)


def _entry_problems(entries: list[tuple[bytes, bytes, bytes]]) -> list[str]:
    problems: list[str] = []
    names: set[bytes] = set()
    previous: bytes | None = None
    for mode, name, oid in entries:
        shown = name.decode("utf-8", "replace")
        if oid == bytes(20):
            problems.append(f"nullSha1: entry {shown!r} points to the null id")
        if not name:
            problems.append("emptyName: entry with an empty name")
        elif b"/" in name:
            problems.append(f"fullPathname: entry {shown!r} holds a '/'")
        elif name == b".":
            problems.append("hasDot: entry named '.'")
        elif name == b"..":
            problems.append("hasDotdot: entry named '..'")
        elif _is_dotgit(name):
            problems.append(f"hasDotgit: entry {shown!r} is a .git")
        if mode.startswith(b"0"):
            problems.append(f"zeroPaddedFilemode: entry {shown!r} has mode {mode.decode()}")
        elif mode not in _MODES:
            problems.append(f"badFilemode: entry {shown!r} has mode {mode.decode()}")
        if name in names:
            problems.append(f"duplicateEntries: {shown!r} appears twice")
        names.add(name)
        key = name + b"/" if mode.lstrip(b"0") == b"40000" else name
        if previous is not None and key < previous:
            problems.append(f"treeNotSorted: entry {shown!r} is out of order")
        previous = key
    return problems


def _ident_problem(line: bytes) -> str | None:
    """git's fsck_ident: ``Name <email> 1234567890 +0000``."""
    lt = line.find(b"<")
    if lt == 0:
        return "missingNameBeforeEmail"
    first = re.search(rb"[<>\n]", line)
    if first is None or first.group() != b"<":
        return "badName" if first is not None and first.group() == b">" else "missingEmail"
    if line[lt - 1 : lt] != b" ":
        return "missingSpaceBeforeEmail"
    gt = re.search(rb"[<>\n]", line[lt + 1 :])
    if gt is None or gt.group() != b">":
        return "badEmail"
    rest = line[lt + 1 + gt.start() + 1 :]
    match = re.fullmatch(rb" ([0-9]+) ([+-][0-9]{4})", rest)
    if not rest.startswith(b" "):
        return "missingSpaceBeforeDate"
    if match is None:
        return "badDate" if not re.match(rb" [0-9]+ ", rest) else "badTimezone"
    date = match.group(1)
    if date.startswith(b"0") and date != b"0":
        return "zeroPaddedDate"
    if int(date) >= 1 << 63:
        return "badDateOverflow"
    return None


def _commit_problems(data: bytes) -> list[str]:
    end = data.find(b"\n\n")
    head = data if end < 0 else data[:end]
    if b"\x00" in head:
        return ["nulInHeader: NUL byte in the commit header"]
    if end < 0 and not data.endswith(b"\n"):
        return ["unterminatedHeader: commit header does not end"]
    lines = head.split(b"\n")
    pos = 0

    def take(key: bytes) -> bytes | None:
        nonlocal pos
        if pos < len(lines) and lines[pos].startswith(key + b" "):
            pos += 1
            return lines[pos - 1][len(key) + 1 :]
        return None

    tree = take(b"tree")
    if tree is None:
        return ["missingTree: commit does not start with a tree line"]
    if not _HEX40.fullmatch(tree):
        return [f"badTreeSha1: invalid tree id {tree[:60]!r}"]
    while (parent := take(b"parent")) is not None:
        if not _HEX40.fullmatch(parent):
            return [f"badParentSha1: invalid parent id {parent[:60]!r}"]
    author = take(b"author")
    if author is None:
        return ["missingAuthor: no author line after tree and parents"]
    problem = _ident_problem(author)
    if problem:
        return [f"{problem}: invalid author line"]
    if take(b"author") is not None:
        return ["multipleAuthors: more than one author line"]
    committer = take(b"committer")
    if committer is None:
        return ["missingCommitter: no committer line after the author"]
    problem = _ident_problem(committer)
    if problem:
        return [f"{problem}: invalid committer line"]
    return []


def object_problems(kind: str, data: bytes) -> list[str]:
    """What ``git fsck --strict`` would report about one object (empty: the object is fine).

    Each problem starts with git's message id (``duplicateEntries: ...``)."""
    if kind == "tree":
        return _tree_problems(data)
    if kind == "commit":
        return _commit_problems(data)
    if kind == "blob":
        return []
    return [f"unsupportedType: {kind} objects are not accepted"]


def check_tree(data: bytes) -> tuple[list[str], list[bytes], list[bytes]]:
    """What :func:`object_problems`, :func:`tree_links` and :func:`long_names` say of one tree,
    from one parse (an import checks every tree it receives); links and names are empty when
    there are problems."""
    try:
        entries = _tree_entries(data)
    except ValueError as exc:
        return [f"badTree: {exc}"], [], []
    problems = _entry_problems(entries)
    if problems:
        return problems, [], []
    links = [oid for mode, _name, oid in entries if mode != _GITLINK]
    return [], links, [name for _mode, name, _oid in entries if len(name) > NAME_MAX]


def long_names(data: bytes) -> list[bytes]:
    """Names in a (valid) tree that no file system here could hold."""
    return [name for _mode, name, _oid in _tree_entries(data) if len(name) > NAME_MAX]


def tree_links(data: bytes) -> list[bytes]:
    """Object ids a (valid) tree points to; submodule commits are not ours to hold."""
    return [oid for mode, _name, oid in _tree_entries(data) if mode != _GITLINK]


_RECORD_MODELS: dict[str, Any] = {
    "objectives": Objective.from_dict,
    "threads": Thread.from_dict,
    "runs": AgentRun.from_dict,
}


def check_store(store: Store) -> list[str]:
    """Everything wrong with a store, one line each (empty: all is well).

    Every ref resolves; every object reachable from any ref exists and passes
    :func:`object_problems`; every record under the metadata ref parses and is filed under its
    id; every thread ref has a thread record and points at a snapshot of that thread."""
    problems: list[str] = []
    refs = store.refs.list("refs/")
    seen: set[bytes] = set()
    for name, tip in sorted(refs.items()):
        stack = [(tip, name)]
        while stack:
            oid, via = stack.pop()
            if oid in seen:
                continue
            seen.add(oid)
            try:
                kind, data = store.odb.read(oid)
            except NarrativeError:
                problems.append(f"missing object {oid.hex()} (reachable from {via})")
                continue
            found = object_problems(kind, data)
            problems += [f"{kind} {oid.hex()}: {problem}" for problem in found]
            if found:
                continue
            if kind == "commit":
                commit = parse_commit(data)
                stack += [(child, via) for child in (commit.tree, *commit.parents)]
            elif kind == "tree":
                stack += [(child, via) for child in tree_links(data)]
    problems += _record_problems(store, refs)
    return problems


def _record_problems(store: Store, refs: dict[str, bytes]) -> list[str]:
    problems: list[str] = []
    ids: dict[str, set[str]] = {}
    threads: dict[str, Thread] = {}
    for kind, parse in _RECORD_MODELS.items():
        ids[kind] = set()
        try:
            records = store.meta.all(kind)
        except NarrativeError as exc:
            problems.append(f"{kind} records are unreadable: {exc}")
            continue
        for record in records:
            try:
                model = parse(record)
            except (NarrativeError, KeyError, TypeError, ValueError) as exc:
                shown = json.dumps(record)[:80]
                problems.append(f"invalid {kind[:-1]} record {shown}: {exc}")
                continue
            ids[kind].add(model.id)
            if isinstance(model, Thread):
                threads[model.id] = model
    for thread in threads.values():
        if ids["objectives"] and thread.objective_id not in ids["objectives"]:
            problems.append(f"thread {thread.id} names a missing objective {thread.objective_id}")
    prefix = "refs/narrative/threads/"
    for name, oid in sorted(refs.items()):
        if not name.startswith(prefix):
            continue
        thread_id = name[len(prefix) :]
        if thread_id not in threads:
            problems.append(f"ref {name} has no thread record")
        try:
            kind, data = store.odb.read(oid)
            commit = parse_commit(data) if kind == "commit" else None
        except (NarrativeError, ValueError):
            continue  # reported by the walk
        if commit is None or not is_snapshot_commit(commit):
            problems.append(f"ref {name} does not point at a snapshot")
        elif snapshot_from_commit(oid, commit, None).thread != thread_id:
            problems.append(f"ref {name} points at a snapshot of another thread")
    return problems
