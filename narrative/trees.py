"""Reading a whole tree: every file below it, by path, with the path rule applied.

Kept apart from restore (which writes trees out) because diff, runs, shipping and archives read
trees too, and none of them should depend on the workspace restore to do it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from .errors import StoreCorrupted, UnsafePath
from .objects import MODE_DIR, parse_tree
from .odb import ObjectStore
from .paths import check_component

__all__ = ["FlatTree", "flatten_tree"]

FlatTree = dict[str, tuple[int, bytes]]
"""path → (mode, blob id) of every non-directory entry of a tree."""


def flatten_tree(odb: ObjectStore, tree: bytes, prefix: str = "") -> FlatTree:
    """path → (mode, oid) for every non-directory entry below ``tree``.

    Every entry name passes the path rule (:mod:`narrative.paths`): a tree that would write
    into a ``.git`` or the store is refused whole (:class:`UnsafePath`), before anything is
    written. Iterative, so a hostile deep tree cannot exhaust the stack.
    """
    out: FlatTree = {}
    # names below the top that passed the rule, decoded: the rule does not depend on the
    # directory, and the same names recur across a source tree's directories
    passed: dict[bytes, str] = {}
    # depth first in tree order (as git lists a tree), without recursion: one iterator over
    # its entries per directory being read
    stack = [(_entries(odb, tree), prefix)]
    while stack:
        entries, at = stack[-1]
        for name, mode, child in entries:
            text = passed.get(name) if at else None
            if text is None:
                text = _checked(name, at)
                if at:
                    passed[name] = text
            if mode == MODE_DIR:
                stack.append((_entries(odb, child), at + text + "/"))
                break
            out[at + text] = (mode, child)
        else:
            stack.pop()
    return out


def _entries(odb: ObjectStore, oid: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    kind, data = odb.read(oid)
    if kind != "tree":
        raise StoreCorrupted(f"{oid.hex()} is not a tree")
    return iter(parse_tree(data))


def _checked(name: bytes, at: str) -> str:
    """``name`` decoded, once it passed the path rule (at the top when ``at`` is empty)."""
    text = os.fsdecode(name)
    if b"/" in name:
        raise UnsafePath(at + text, "a tree entry name holds '/'")
    check_component(name, top_level=not at, path=at + text)
    return text
