"""The result types of :mod:`narrative.merge`: a conflict, and the outcome of a tree merge
(plain records, :mod:`narrative.plain`: merges run in short-lived processes)."""

from __future__ import annotations

from .plain import Frozen, Record

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Conflict", "Entry", "TreeMerge"]

Entry = tuple[int, bytes]
"""(mode, 20-byte oid) of a non-directory tree entry."""


class Conflict(Frozen):
    """A path the merge could not settle on its own.

    kind: ``content`` (both edited the same lines), ``add/add``, ``binary``, ``modify/delete``
    (ours modified, theirs deleted), ``delete/modify``, ``mode``, ``symlink``, ``type`` (file vs
    symlink), ``rename/delete``, ``rename/rename``, ``directory/file``. ``markers``: the merged
    file holds ``<<<<<<<`` markers. ``other`` names the second path of a rename conflict.
    """

    __slots__ = ("base", "kind", "markers", "other", "ours", "path", "theirs")
    FIELDS = ("path", "kind", "base", "ours", "theirs", "markers", "other")
    path: str
    kind: str
    base: Entry | None
    ours: Entry | None
    theirs: Entry | None
    markers: bool
    other: str | None

    def __init__(
        self,
        path: str,
        kind: str,
        base: Entry | None,
        ours: Entry | None,
        theirs: Entry | None,
        markers: bool = False,
        other: str | None = None,
    ) -> None:
        self.set_fields(path, kind, base, ours, theirs, markers, other)

    def to_dict(self) -> dict[str, Any]:
        def show(entry: Entry | None) -> dict[str, str] | None:
            return None if entry is None else {"mode": f"{entry[0]:06o}", "oid": entry[1].hex()}

        return {
            "path": self.path,
            "kind": self.kind,
            "markers": self.markers,
            "other": self.other,
            "base": show(self.base),
            "ours": show(self.ours),
            "theirs": show(self.theirs),
        }


class TreeMerge(Record):
    """The outcome of :func:`narrative.merge.merge_trees`.

    ``tree`` is the merged tree (conflicted text files with markers, binary conflicts as ours);
    ``edits`` turn ours into it; ``conflicts`` are unresolved, ``resolved`` lists conflicts a
    strategy settled; ``renames`` are the detected (side, old path, new path).
    """

    FIELDS = ("tree", "edits", "conflicts", "resolved", "renames")

    def __init__(
        self,
        tree: bytes,
        edits: dict[str, Entry | None] | None = None,
        conflicts: list[Conflict] | None = None,
        resolved: list[Conflict] | None = None,
        renames: list[tuple[str, str, str]] | None = None,
    ) -> None:
        self.tree = tree
        self.edits: dict[str, Entry | None] = {} if edits is None else edits
        self.conflicts: list[Conflict] = [] if conflicts is None else conflicts
        self.resolved: list[Conflict] = [] if resolved is None else resolved
        self.renames: list[tuple[str, str, str]] = [] if renames is None else renames

    @property
    def clean(self) -> bool:
        return not self.conflicts
