"""Commit ancestry: whether one commit descends from another, through git parents only.

The one answer used by the thread-head guard (:meth:`narrative.refs.RefStore.update` refuses to
move a thread head to a commit that does not descend from it) and by import, push and pull when
they decide whether a move is a fast-forward: the same question as stock
``git merge-base --is-ancestor``.
"""

from __future__ import annotations

from .objects import parse_commit
from .odb import ObjectStore

__all__ = ["is_ancestor"]


def is_ancestor(
    odb: ObjectStore, ancestor: bytes, descendant: bytes, limit: int | None = None
) -> bool:
    """Whether ``ancestor`` is ``descendant`` or reachable from it through commit parents.

    ``limit``: give up (False) after visiting that many commits; None walks all of them.
    Raises StoreCorrupted when a commit on the way is missing.
    """
    stack, seen = [descendant], set[bytes]()
    while stack and (limit is None or len(seen) < limit):
        oid = stack.pop()
        if oid == ancestor:
            return True
        if oid in seen:
            continue
        seen.add(oid)
        kind, data = odb.read(oid)
        if kind == "commit":
            stack.extend(parse_commit(data).parents)
    return False
