"""Reading a whole tree: every file below it, by path, with the path rule applied.

Kept apart from restore (which writes trees out) because diff, runs, shipping and archives read
trees too, and none of them should depend on the workspace restore to do it.
"""

from __future__ import annotations

import os

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
    # depth first in tree order (as git lists a tree), without recursion
    stack: list[tuple[bytes, str] | tuple[str, int, bytes]] = [(tree, prefix)]
    while stack:
        item = stack.pop()
        if len(item) == 3:
            path, mode, blob = item
            out[path] = (mode, blob)
            continue
        oid, at = item
        kind, data = odb.read(oid)
        if kind != "tree":
            raise StoreCorrupted(f"{oid.hex()} is not a tree")
        children: list[tuple[bytes, str] | tuple[str, int, bytes]] = []
        for name, mode, child in parse_tree(data):
            path = at + os.fsdecode(name)
            if b"/" in name:
                raise UnsafePath(path, "a tree entry name holds '/'")
            check_component(name, top_level=not at, path=path)
            children.append((child, path + "/") if mode == MODE_DIR else (path, mode, child))
        stack.extend(reversed(children))
    return out
