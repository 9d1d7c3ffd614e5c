"""Three-way merge of git trees: base / ours / theirs → merged tree + conflicts.

The result is expressed as *edits against ours* (path → new entry, or None to delete), because
ours is the user's workspace: applying exactly those edits is what a workspace merge does. Only
subtrees whose ids differ are read (the diff recurses into differing directories only), and the
merged tree is rebuilt along edited paths only, so untouched subtrees keep their ids.

Per path, git's rules: a side that did not change takes the other; equal changes merge; text
changed by both is merged line by line (:mod:`narrative.merge3`), with conflict markers when
hunks overlap; binary conflicts keep ours in the tree (theirs stays in its snapshot);
modify/delete keeps the modified version; add/add merges against an empty base; exec-bit
changes merge like content. Exact-content renames (a deleted path whose blob reappears under a
new path on the same side) are followed, so a rename on one side plus an edit on the other
merges cleanly at the new path. A strategy of ``ours``/``theirs`` settles every conflict in
favour of that side (per hunk for text, like ``git merge -X ours|theirs``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import InvalidInput, StoreCorrupted
from .merge3 import is_binary, merge_text
from .merge_result import Conflict, Entry, TreeMerge
from .objects import MODE_DIR, MODE_EXEC, MODE_FILE, MODE_LINK, TREE_ENTRY, tree_sort_key
from .odb import ObjectStore, PackWriter

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Literal

__all__ = [
    "STRATEGIES",
    "Conflict",
    "Entry",
    "Strategy",
    "TreeMerge",
    "edit_tree",
    "merge_trees",
    "tree_changes",
]

if TYPE_CHECKING:
    Strategy = Literal["ours", "theirs"]
else:
    Strategy = str  # at run time the alias needs no typing.Literal
STRATEGIES: tuple[Strategy, ...] = ("ours", "theirs")

_Change = tuple[Entry | None, Entry | None]  # (base, side) of one changed path
_EMPTY_BLOB = bytes.fromhex("e69de29bb2d1d6434b8b29ae775ad8c2e48c5391")


_MODES = {b"100644": MODE_FILE, b"100755": MODE_EXEC, b"120000": MODE_LINK, b"40000": MODE_DIR}
_TREE_ENTRY = re.compile(rb"([0-7]+) ([^\x00]*)\x00(.{20})", re.DOTALL)  # mode, name, oid
_WHOLE_TREE = re.compile(rb"(?:[0-7]+ [^\x00]*\x00.{20})*", re.DOTALL)  # entries, nothing else
_RECORD = re.compile(rb"[0-7]+ [^\x00]*\x00.{20}", re.DOTALL)  # one whole entry
_UNSAFE_NAMES = frozenset((b"", b".", b"..", b".git"))
# A whole tree whose names are all safe (none of _UNSAFE_NAMES, no "/"): one C-level match
# validates a tree; only a tree failing it is parsed again to say what is wrong.
_SAFE_TREE = re.compile(
    rb"(?:[0-7]+ (?!(?:%s)\x00)[^\x00/]+\x00.{20})*"
    % b"|".join(re.escape(name) for name in sorted(_UNSAFE_NAMES) if name),  # "": by the "+"
    re.DOTALL,
)
_RAW_ENTRY = re.compile(rb"(([0-7]+) ([^\x00]*)\x00.{20})", re.DOTALL)  # entry, mode, name
_CANONICAL_MODES = frozenset((b"100644", b"100755", b"120000", b"40000", b"160000"))
_DIR_MODE = b"40000 "  # how a (canonical) directory entry starts
_NO_RECORDS: frozenset[bytes] = frozenset()


def _name(raw: bytes) -> str:
    """A tree entry name as a path component (``os.fsdecode`` on POSIX)."""
    return raw.decode("utf-8", "surrogateescape")


def _raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _changed_entries(records: frozenset[bytes]) -> dict[bytes, tuple[int, bytes]]:
    """name → (mode, oid) of raw tree entries (one regex pass over all of them)."""
    if not records:
        return {}
    modes = _MODES
    return {
        name: (modes.get(mode) or int(mode, 8), oid)
        for mode, name, oid in _TREE_ENTRY.findall(b"".join(records))
    }


class _Trees:
    """Trees by id (each read and validated once), path lookups, and validated entry names.

    Entries are keyed by their raw (bytes) names: a name is decoded only when a path through it
    is reported, not for each of the thousands of entries merely compared. A diff compares the
    trees' raw entries as sets (in C), so only the changed entries are ever split into fields;
    the name → entry dict of a tree is built only for trees that are looked into or rebuilt.
    """

    def __init__(self, odb: ObjectStore) -> None:
        self.odb = odb
        self._data: dict[bytes, bytes] = {}
        self._records: dict[bytes, frozenset[bytes]] = {}
        self._cache: dict[bytes, dict[bytes, tuple[int, bytes]]] = {}
        self._dirs: dict[tuple[bytes, str], bytes | None] = {}  # (root, dir path) → its tree

    def _read(self, oid: bytes) -> bytes:
        data = self._data.get(oid)
        if data is None:
            kind, data = self.odb.read(oid)
            if kind != "tree":
                raise StoreCorrupted(f"{oid.hex()} is not a tree")
            if _SAFE_TREE.fullmatch(data) is None:
                self._parse(oid, data)  # raises, naming the problem
                raise StoreCorrupted(f"tree {oid.hex()} is malformed")  # pragma: no cover
            self._data[oid] = data
        return data

    def data(self, oid: bytes) -> bytes:
        """The tree's raw content, validated."""
        return self._read(oid)

    def records(self, oid: bytes | None) -> frozenset[bytes]:
        """The tree's entries as raw bytes, one per entry."""
        if oid is None:
            return _NO_RECORDS
        found = self._records.get(oid)
        if found is None:
            found = frozenset(_RECORD.findall(self._read(oid)))
            self._records[oid] = found
        return found

    def entries(self, oid: bytes | None) -> dict[bytes, tuple[int, bytes]]:
        if oid is None:
            return {}
        found = self._cache.get(oid)
        if found is None:
            modes = _MODES
            found = {
                name: (modes.get(mode) or int(mode, 8), child)
                for mode, name, child in _TREE_ENTRY.findall(self._read(oid))
            }
            self._cache[oid] = found
        return found

    @staticmethod
    def _parse(oid: bytes, data: bytes) -> dict[bytes, tuple[int, bytes]]:
        """:func:`narrative.objects.parse_tree` into a dict, fused with the name checks."""
        if _WHOLE_TREE.fullmatch(data) is None:  # the entries must tile the whole tree
            raise StoreCorrupted(f"tree {oid.hex()} is malformed")
        modes = _MODES
        found = {
            name: (modes.get(mode) or int(mode, 8), child)
            for mode, name, child in _TREE_ENTRY.findall(data)
        }
        # Checked in bulk: names never hold NUL (it ends them), so joining on NUL is lossless.
        if not _UNSAFE_NAMES.isdisjoint(found) or b"/" in b"\x00".join(found):
            bad = next(n for n in found if n in _UNSAFE_NAMES or b"/" in n)
            raise StoreCorrupted(f"tree {oid.hex()} has an unsafe entry {bad!r}")
        return found

    def _dir(self, root: bytes, path: str) -> bytes | None:
        """The tree at directory ``path`` ("" for ``root``), or None when it is no directory;
        remembered, since the paths looked up share their parents."""
        if not path:
            return root
        key = (root, path)
        if key not in self._dirs:
            parent, _, name = path.rpartition("/")
            tree = self._dir(root, parent)
            node = self.entries(tree).get(_raw(name)) if tree is not None else None
            self._dirs[key] = node[1] if node is not None and node[0] == MODE_DIR else None
        return self._dirs[key]

    def lookup(self, root: bytes | None, path: str) -> tuple[int, bytes] | None:
        """The entry at ``path`` (a directory entry included), or None."""
        if root is None:
            return None
        parent, _, name = path.rpartition("/")
        tree = self._dir(root, parent)
        return self.entries(tree).get(_raw(name)) if tree is not None else None

    def files_below(self, tree: bytes, prefix: str) -> Iterable[str]:
        for name, (mode, oid) in self.entries(tree).items():
            if mode == MODE_DIR:
                yield from self.files_below(oid, f"{prefix}{_name(name)}/")
            else:
                yield prefix + _name(name)

    def diff(self, a: bytes | None, b: bytes | None, prefix: str, out: dict[str, _Change]) -> None:
        """Changed non-directory paths from tree ``a`` to ``b``; equal subtrees are skipped."""
        if a == b:
            return
        ra, rb = self.records(a), self.records(b)
        # The set differences of the raw entries hold just the changed ones (found in C); only
        # those are split into fields, in one regex pass over each side's changed entries.
        ea, eb = _changed_entries(ra - rb), _changed_entries(rb - ra)
        for name in ea.keys() | eb.keys():
            x, y = ea.get(name), eb.get(name)
            x_dir = x is not None and x[0] == MODE_DIR
            y_dir = y is not None and y[0] == MODE_DIR
            path = prefix + _name(name)
            if x_dir or y_dir:
                self.diff(
                    x[1] if x is not None and x_dir else None,
                    y[1] if y is not None and y_dir else None,
                    path + "/",
                    out,
                )
                if x_dir:
                    x = None
                if y_dir:
                    y = None
            if x != y:
                out[path] = (x, y)


def _exact_renames(changes: dict[str, _Change]) -> dict[str, str]:
    """old path → new path for deletions whose blob was added elsewhere on the same side."""
    added: dict[Entry, list[str]] = {}
    for path, (old, new) in changes.items():
        if old is None and new is not None and new[1] != _EMPTY_BLOB:
            added.setdefault(new, []).append(path)
    if not added:
        return {}
    renames: dict[str, str] = {}
    for path, (old, new) in sorted(changes.items()):
        if new is not None or old is None:
            continue
        candidates = added.get(old) or added.get(
            (MODE_EXEC if old[0] == MODE_FILE else MODE_FILE, old[1])
        )
        if not candidates:
            continue
        # Prefer a destination with the same file name (a move between directories).
        base = path.rsplit("/", 1)[-1]
        pick = next((c for c in candidates if c.rsplit("/", 1)[-1] == base), candidates[0])
        candidates.remove(pick)
        renames[path] = pick
    return renames


class _Merger:
    def __init__(self, odb: ObjectStore, writer: PackWriter, strategy: Strategy | None) -> None:
        self.odb = odb
        self.trees = _Trees(odb)
        self.writer = writer
        self.strategy = strategy
        self.conflicts: list[Conflict] = []
        self.resolved: list[Conflict] = []

    def _blob(self, oid: bytes) -> bytes:
        kind, data = self.odb.read(oid)
        if kind != "blob":
            raise StoreCorrupted(f"{oid.hex()} is not a blob")
        return data

    def _report(self, conflict: Conflict) -> None:
        (self.resolved if self.strategy else self.conflicts).append(conflict)

    def _pick(self, ours: Entry | None, theirs: Entry | None) -> Entry | None:
        """The side a strategy favours; without one, ours, else theirs if ours is gone."""
        if self.strategy == "theirs":
            return theirs
        if self.strategy == "ours":
            return ours
        return ours if ours is not None else theirs

    def entry(
        self, path: str, base: Entry | None, ours: Entry | None, theirs: Entry | None
    ) -> Entry | None:
        """Merge one path's three versions; records a conflict when they cannot be combined."""
        if theirs in (ours, base):
            return ours
        if base == ours:
            return theirs
        if ours is None or theirs is None:
            kind = "delete/modify" if ours is None else "modify/delete"
            self._report(Conflict(path, kind, base, ours, theirs))
            return self._pick(ours, theirs)
        if ours[0] == MODE_LINK or theirs[0] == MODE_LINK:
            kind = "symlink" if ours[0] == theirs[0] else "type"
            self._report(Conflict(path, kind, base, ours, theirs))
            return self._pick(ours, theirs)
        mode = self._mode(path, base, ours, theirs)
        if ours[1] == theirs[1]:
            return mode, ours[1]
        if base is not None and base[1] == ours[1]:
            return mode, theirs[1]
        if base is not None and base[1] == theirs[1]:
            return mode, ours[1]
        return self._content(path, base, ours, theirs, mode)

    def _mode(self, path: str, base: Entry | None, ours: Entry, theirs: Entry) -> int:
        if ours[0] == theirs[0] or (base is not None and base[0] == theirs[0]):
            return ours[0]
        if base is not None and base[0] == ours[0]:
            return theirs[0]
        self._report(Conflict(path, "mode", base, ours, theirs))
        picked = self._pick(ours, theirs)
        return picked[0] if picked is not None else ours[0]

    def _content(
        self, path: str, base: Entry | None, ours: Entry, theirs: Entry, mode: int
    ) -> Entry:
        kind = "content" if base is not None else "add/add"
        b_data = self._blob(base[1]) if base is not None else b""
        o_data, t_data = self._blob(ours[1]), self._blob(theirs[1])
        if is_binary(b_data) or is_binary(o_data) or is_binary(t_data):
            self._report(Conflict(path, "binary", base, ours, theirs))
            return mode, (theirs if self.strategy == "theirs" else ours)[1]
        merged = merge_text(b_data, o_data, t_data, favour=self.strategy)
        if merged.conflicts:
            self._report(Conflict(path, kind, base, ours, theirs, markers=self.strategy is None))
        return mode, self.writer.add_raw("blob", merged.data)


def _rename_pass(
    m: _Merger,
    side_renames: dict[str, str],
    mine: dict[str, _Change],
    other: dict[str, _Change],
    other_renames: dict[str, str],
    theirs_side: bool,
    edits: dict[str, Entry | None],
    handled: set[str],
) -> None:
    """Follow the renames of one side onto the other side's edits of the old path."""
    for src, dst in side_renames.items():
        if src not in other or src in handled or dst in other:
            continue  # the other side left src alone (nothing to carry), or dst is contested
        base = mine[src][0]
        moved = mine[dst][1]
        edited = other[src][1]
        if edited is None:
            other_dst = other_renames.get(src)
            if other_dst == dst:
                continue  # both sides made the same move
            handled.add(src)
            elsewhere = other[other_dst][1] if other_dst is not None else None
            ours_dst, theirs_dst = (other_dst, dst) if theirs_side else (dst, other_dst)
            m._report(
                Conflict(
                    dst,
                    "rename/rename" if other_dst is not None else "rename/delete",
                    base,
                    elsewhere if theirs_side else moved,
                    moved if theirs_side else elsewhere,
                    other=other_dst,
                )
            )
            if m.strategy == "ours" and theirs_dst is not None:
                handled.add(theirs_dst)  # theirs' copy never arrives
                edits.pop(theirs_dst, None)
            elif m.strategy == "theirs" and ours_dst is not None:
                edits[ours_dst] = None
            continue
        handled.update((src, dst))
        if theirs_side:
            # ours edited src, theirs moved it: the merged file lives at dst, src goes away.
            edits[src] = None
            edits[dst] = m.entry(dst, base, edited, moved)
        else:
            # ours moved src to dst, theirs edited src: merge theirs' edit into ours' dst.
            merged = m.entry(dst, base, moved, edited)
            if merged != moved:
                edits[dst] = merged


def _check_paths(
    m: _Merger, ours_tree: bytes, edits: dict[str, Entry | None], ours_files: set[str]
) -> None:
    """Drop (and report) edits that would put a file where a directory must stay, or below a
    path that stays a file. ``ours_files``: paths known (from the diffs) to hold a file in ours,
    where no directory can be in the way and every parent is a directory in ours."""
    trees = m.trees
    stays_file: dict[str, bool] = {}  # parent path → it is a file in the result

    def is_file(parent: str) -> bool:
        known = stays_file.get(parent)
        if known is None:
            if parent in edits:
                known = edits[parent] is not None
            else:
                found = trees.lookup(ours_tree, parent)
                known = found is not None and found[0] != MODE_DIR
            stays_file[parent] = known
        return known

    for path, entry in sorted(edits.items()):
        if entry is None:
            continue
        blocker = None
        parts = path.split("/")
        parents = ("/".join(parts[:depth]) for depth in range(1, len(parts)))
        if path in ours_files:
            # ours holds a file here: its parents are directories in ours (only an edit can
            # make one a file) and no directory of ours is in the way; no tree lookups
            blocker = next((p for p in parents if edits.get(p) is not None), None)
            if blocker is None:
                continue
        else:
            blocker = next((p for p in parents if is_file(p)), None)
        if blocker is None:
            found = trees.lookup(ours_tree, path)
            if found is not None and found[0] == MODE_DIR:
                remaining = [p for p in trees.files_below(found[1], path + "/") if p not in edits]
                remaining += [p for p, e in edits.items() if e and p.startswith(path + "/")]
                if remaining:
                    blocker = remaining[0]
        if blocker is not None:
            found = trees.lookup(ours_tree, path)
            mine = found if found is not None and found[0] != MODE_DIR else None
            m._report(Conflict(path, "directory/file", None, mine, entry, other=blocker))
            del edits[path]


class _Edits:
    """The edits below one directory: its own entries by name, and those of each subdirectory."""

    __slots__ = ("dirs", "files")

    def __init__(self) -> None:
        self.files: dict[bytes, Entry | None] = {}
        self.dirs: dict[bytes, _Edits] = {}


def _build(
    trees: _Trees, writer: PackWriter, tree: bytes | None, edits: dict[str, Entry | None]
) -> bytes | None:
    """``tree`` with ``edits`` applied (new trees written); None when it ends up empty."""
    root = _Edits()  # each path is split once, not once per directory level it crosses
    for path, entry in edits.items():
        *dirs, name = _raw(path).split(b"/")
        node = root
        for part in dirs:
            child = node.dirs.get(part)
            if child is None:
                child = node.dirs[part] = _Edits()
            node = child
        node.files[name] = entry
    return _build_tree(trees, writer, tree, root)


def _build_tree(
    trees: _Trees, writer: PackWriter, tree: bytes | None, edits: _Edits
) -> bytes | None:
    direct, nested = edits.files, edits.dirs
    # The tree is rebuilt from its raw entries: unchanged ones are copied as they are, and when
    # no name comes or goes (the usual edit) they are already in git's order, so no sort.
    found = _RAW_ENTRY.findall(trees.data(tree)) if tree is not None else []
    canonical = _CANONICAL_MODES
    raw = {
        name: record
        if mode in canonical
        else _record(_MODES.get(mode) or int(mode, 8), name, record[-20:])
        for record, mode, name in found
    }
    reorder = False
    for name, sub in nested.items():
        current = raw.get(name)
        subtree = current[-20:] if current is not None and current.startswith(_DIR_MODE) else None
        built = _build_tree(trees, writer, subtree, sub)
        if built is not None:
            reorder = reorder or subtree is None  # a new name, or a file that became a directory
            raw[name] = _record(MODE_DIR, name, built)
        elif subtree is not None:
            del raw[name]
    for name, entry in direct.items():
        current = raw.get(name)
        if entry is not None:
            is_dir = entry[0] == MODE_DIR
            reorder = reorder or current is None or current.startswith(_DIR_MODE) != is_dir
            raw[name] = _record(entry[0], name, entry[1])
        elif current is not None and not current.startswith(_DIR_MODE):
            del raw[name]  # a file that became a directory keeps the directory built above
    if not raw:
        return None
    if reorder:  # git's order: by name, a directory's as if it ended with "/"
        keyed = sorted(
            (tree_sort_key(n, MODE_DIR if r.startswith(_DIR_MODE) else MODE_FILE), r)
            for n, r in raw.items()
        )
        return writer.add_raw("tree", b"".join(r for _k, r in keyed))
    return writer.add_raw("tree", b"".join(raw.values()))


def _record(mode: int, name: bytes, oid: bytes) -> bytes:
    """One raw tree entry, as git writes it."""
    return TREE_ENTRY % (mode, name, oid)


def tree_changes(
    odb: ObjectStore, a: bytes | None, b: bytes | None
) -> dict[str, tuple[Entry | None, Entry | None]]:
    """path → (entry in ``a``, entry in ``b``) for every non-directory path that differs
    between the two trees (None: absent); equal subtrees are not read."""
    out: dict[str, _Change] = {}
    _Trees(odb).diff(a, b, "", out)
    return out


def edit_tree(
    odb: ObjectStore, writer: PackWriter, tree: bytes, edits: dict[str, Entry | None]
) -> bytes:
    """``tree`` with ``edits`` applied (path → entry, None removes); new trees go to
    ``writer``, untouched subtrees keep their ids."""
    built = _build(_Trees(odb), writer, tree, edits) if edits else tree
    return built if built is not None else writer.add_raw("tree", b"")


def merge_trees(
    odb: ObjectStore,
    base: bytes | None,
    ours: bytes,
    theirs: bytes,
    writer: PackWriter,
    strategy: Strategy | None = None,
) -> TreeMerge:
    """Three-way merge of tree ids; new blobs and trees go to ``writer`` (the caller publishes).

    ``base`` None merges two unrelated trees (every path both sides hold is an add/add).
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise InvalidInput(f"unknown merge strategy {strategy!r} (use ours or theirs)")
    m = _Merger(odb, writer, strategy)
    if theirs in (ours, base):
        return TreeMerge(ours)
    d_ours: dict[str, _Change] = {}
    d_theirs: dict[str, _Change] = {}
    m.trees.diff(base, ours, "", d_ours)
    m.trees.diff(base, theirs, "", d_theirs)
    r_ours, r_theirs = _exact_renames(d_ours), _exact_renames(d_theirs)
    edits: dict[str, Entry | None] = {}
    handled: set[str] = set()
    _rename_pass(m, r_theirs, d_theirs, d_ours, r_ours, True, edits, handled)
    _rename_pass(m, r_ours, d_ours, d_theirs, r_theirs, False, edits, handled)
    for path, (b, t) in d_theirs.items():
        if path in handled:
            continue
        if path not in d_ours:
            edits[path] = t
            continue
        o = d_ours[path][1]
        merged = m.entry(path, b, o, t)
        if merged != o:
            edits[path] = merged
    # paths where ours holds a file: changed to one by ours, or left by ours as base had it
    ours_files = {path for path, (_b, o) in d_ours.items() if o is not None}
    ours_files.update(path for path, (b, _t) in d_theirs.items() if b and path not in d_ours)
    _check_paths(m, ours, edits, ours_files)
    tree = _build(m.trees, writer, ours, edits) if edits else ours
    if tree is None:
        tree = writer.add_raw("tree", b"")
    renames = [("ours", s, d) for s, d in sorted(r_ours.items())]
    renames += [("theirs", s, d) for s, d in sorted(r_theirs.items())]
    m.conflicts.sort(key=lambda c: c.path)
    return TreeMerge(tree, edits, m.conflicts, m.resolved, renames)
