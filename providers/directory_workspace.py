"""What the directory of a directory environment (``local``, ``worktree``) is known to hold.

The tree it was last restored to or collected as is recorded beside the environment
(:func:`remember_tree`). While the directory still holds it (:func:`holds_tree`), a restore
writes only the paths that differ, like a checkout switching commits
(:func:`sync_changes`); otherwise the provider snapshots what the directory holds before
anything overwrites it, then rewrites it from an empty directory (:func:`empty_directory`).
"""

from __future__ import annotations

import os
import shutil

from narrative.errors import RestoreError
from narrative.fsutil import write_atomic
from narrative.models import Snapshot
from narrative.odb import EMPTY_TREE_OID
from narrative.restore import sync_directory
from narrative.snapshot import scan_tree
from narrative.store import Store
from narrative.trees import FlatTree, flatten_tree

from .records import env_state_dir

__all__ = [
    "EMPTY_TREE",
    "empty_directory",
    "holds_tree",
    "known_tree",
    "remember_tree",
    "sync_changes",
]

EMPTY_TREE = EMPTY_TREE_OID
"""The id of the empty tree (what an empty directory holds)."""


def _record(store: Store, env_id: str) -> str:
    return os.path.join(env_state_dir(store, env_id), "tree")


def remember_tree(store: Store, env_id: str, tree: str) -> None:
    """Record the tree the directory is known to hold (restored or collected)."""
    write_atomic(_record(store, env_id), tree.encode(), durable=False)


def known_tree(store: Store, env_id: str) -> bytes | None:
    """The tree last restored or collected, if recorded."""
    try:
        with open(_record(store, env_id), "rb") as f:
            return bytes.fromhex(f.read().decode())
    except (FileNotFoundError, ValueError):
        return None


def holds_tree(store: Store, directory: str, known: bytes | None) -> bool:
    """Whether ``directory`` still holds ``known`` (the tree last restored or collected)."""
    if known is None:
        return False
    _scan, root, _cache = scan_tree(store, directory)
    return (root or EMPTY_TREE) == known


def sync_changes(store: Store, directory: str, known: bytes, snapshot: Snapshot) -> bool:
    """Write only what differs between ``known`` and ``snapshot``; False when an ignored
    file blocks a path (the caller then rewrites everything)."""
    target = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
    try:
        sync_directory(store, directory, flatten_tree(store.odb, known), target)
    except RestoreError:
        return False
    _remove_strays(directory, target)
    return True


def _remove_strays(root: str, target: FlatTree) -> None:
    """Remove what ``target`` does not hold (ignored files left by an earlier run)."""
    dirs = {""}
    for path in target:
        parent = os.path.dirname(path)
        while parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for current, subdirs, files in os.walk(root):
        rel = os.path.relpath(current, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        prefix = rel + "/" if rel else ""
        for name in list(subdirs):
            full = os.path.join(current, name)
            if os.path.islink(full):
                files.append(name)
            elif prefix + name not in dirs:
                shutil.rmtree(full)
            else:
                continue
            subdirs.remove(name)
        for name in files:
            if prefix + name not in target:
                os.unlink(os.path.join(current, name))


def empty_directory(directory: str) -> None:
    """Remove everything ``directory`` holds, keeping the directory itself."""
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
