"""The result types of :mod:`narrative.merge`: a conflict, and the outcome of a tree merge.

Plain classes rather than dataclasses: merges run in short-lived processes, and the dataclass
decorator generates each class's methods with ``exec`` at import (~0.6 ms a class).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Conflict", "Entry", "TreeMerge"]

Entry = tuple[int, bytes]
"""(mode, 20-byte oid) of a non-directory tree entry."""

_CONFLICT_FIELDS = ("path", "kind", "base", "ours", "theirs", "markers", "other")  # in order


class Conflict:
    """A path the merge could not settle on its own.

    kind: ``content`` (both edited the same lines), ``add/add``, ``binary``, ``modify/delete``
    (ours modified, theirs deleted), ``delete/modify``, ``mode``, ``symlink``, ``type`` (file vs
    symlink), ``rename/delete``, ``rename/rename``, ``directory/file``. ``markers``: the merged
    file holds ``<<<<<<<`` markers. ``other`` names the second path of a rename conflict.

    Immutable, compared and hashed by value.
    """

    __slots__ = _CONFLICT_FIELDS
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
        for name, value in zip(
            _CONFLICT_FIELDS, (path, kind, base, ours, theirs, markers, other), strict=True
        ):
            object.__setattr__(self, name, value)

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _CONFLICT_FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a Conflict")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a Conflict")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Conflict)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _CONFLICT_FIELDS)
        return f"Conflict({fields})"

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


class TreeMerge:
    """The outcome of :func:`merge_trees`.

    ``tree`` is the merged tree (conflicted text files with markers, binary conflicts as ours);
    ``edits`` turn ours into it; ``conflicts`` are unresolved, ``resolved`` lists conflicts a
    strategy settled; ``renames`` are the detected (side, old path, new path).
    """

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

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, TreeMerge)
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"TreeMerge(tree={self.tree!r}, edits={self.edits!r}, conflicts={self.conflicts!r}, "
            f"resolved={self.resolved!r}, renames={self.renames!r})"
        )

    @property
    def clean(self) -> bool:
        return not self.conflicts
