"""What a merge of a run's result (or any snapshot) must pass before it reaches the workspace:
protected files change only with ``force``, and a result that deletes most of its base is
refused (:func:`check_merge`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .errors import ProtectedChange, RunNotUsable
from .merge import tree_changes
from .models import Snapshot
from .trees import flatten_tree

if TYPE_CHECKING:
    from .store import Store

__all__ = ["PROTECTED_NAMES", "check_deletions", "check_merge", "is_protected"]

#: File names (any directory, compared lower-cased) whose change a merge applies only with
#: ``force``: they decide what later snapshots ignore, and how the gateway routes calls.
PROTECTED_NAMES: Final = frozenset(
    {".gitignore", ".narrativeignore", "proxyexecution.json", "narrative.toml"}
)


def is_protected(path: str) -> bool:
    """Whether a merge changes ``path`` only with ``force`` (:data:`PROTECTED_NAMES`)."""
    return path.rsplit("/", 1)[-1].lower() in PROTECTED_NAMES


def check_merge(
    store: Store,
    base: Snapshot | None,
    theirs: Snapshot,
    ours: bytes | None,
    *,
    force: bool,
    deletions: bool,
) -> None:
    """Refuse, unless ``force``, a merge of ``theirs`` that looks like an accident or an
    attack rather than work: one that changes a protected file (:func:`is_protected`; only
    where ``theirs`` differs from both its ``base`` and the tree ``ours``), and with
    ``deletions`` (a failed run's result) one that deletes most of its base.

    Raises:
        ProtectedChange: protected files would change.
        RunNotUsable: the result deletes more than half of its base's files.
    """
    if force:
        return
    if deletions:
        check_deletions(store, base, theirs, force)
    theirs_tree = bytes.fromhex(theirs.tree)
    changed = tree_changes(store.odb, bytes.fromhex(base.tree) if base else None, theirs_tree)
    protected = [p for p in changed if is_protected(p)]
    if protected and ours is not None:
        differs = tree_changes(store.odb, ours, theirs_tree)
        protected = [p for p in protected if p in differs]
    if protected:
        raise ProtectedChange(sorted(protected))


def check_deletions(store: Store, base: Snapshot | None, result: Snapshot, force: bool) -> None:
    """Refuse a result that deletes more than half of its base's files, unless ``force``:
    what an agent that wiped its checkout (or never received it) would look like."""
    if force or base is None:
        return
    before = flatten_tree(store.odb, bytes.fromhex(base.tree))
    after = flatten_tree(store.odb, bytes.fromhex(result.tree))
    deleted = sum(1 for path in before if path not in after)
    if before and deleted * 2 > len(before):
        raise RunNotUsable(
            result.run or result.id,
            f"the result deletes {deleted} of the {len(before)} files of its base; "
            "merge it with --force if that is what you want",
        )
