"""Differences between two snapshots, or between a snapshot and the live workspace.

Name-status, per-file line counts and a git-style unified patch. Reading the live workspace
hashes changed files without storing anything.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .models import Snapshot
from .objects import MODE_DIR, MODE_LINK
from .scan import DirNode
from .store import Store
from .trees import FlatTree, flatten_tree

__all__ = ["DiffResult", "FileChange", "diff_snapshots", "diff_trees"]

_BINARY_PROBE = 8000
_MAX_TEXT = 4 << 20


@dataclass
class FileChange:
    """One changed path. status: A added, D deleted, M modified, T type changed."""

    path: str
    status: str
    old_mode: str | None
    new_mode: str | None
    old_oid: str | None
    new_oid: str | None
    insertions: int = 0
    deletions: int = 0
    binary: bool = False


@dataclass
class DiffResult:
    """All changes from ``old`` to ``new`` (a snapshot id or ``"workspace"``)."""

    old: str
    new: str
    files: list[FileChange] = field(default_factory=list)
    patch: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.old,
            "to": self.new,
            "files": [asdict(f) for f in self.files],
            "totals": {
                "files": len(self.files),
                "insertions": sum(f.insertions for f in self.files),
                "deletions": sum(f.deletions for f in self.files),
            },
            **({"patch": self.patch} if self.patch is not None else {}),
        }


def _kind(mode: int) -> str:
    return "link" if mode == MODE_LINK else "file"


def diff_trees(old: FlatTree, new: FlatTree) -> list[FileChange]:
    """Changed paths between two flattened trees, sorted by path (no line counts yet)."""
    changes = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None:
            status = "A"
        elif b is None:
            status = "D"
        else:
            status = "T" if _kind(a[0]) != _kind(b[0]) else "M"
        changes.append(
            FileChange(
                path,
                status,
                f"{a[0]:06o}" if a else None,
                f"{b[0]:06o}" if b else None,
                a[1].hex() if a else None,
                b[1].hex() if b else None,
            )
        )
    return changes


def _flatten_node(store: Store, node: DirNode, out: FlatTree) -> FlatTree:
    prefix = node.rel + "/" if node.rel else ""
    if node.record is not None:
        if node.oid is not None:
            out.update(flatten_tree(store.odb, node.oid, prefix))
        return out
    for name, mode, value in node.entries:
        if mode == MODE_DIR:
            _flatten_node(store, value, out)
        elif value is not None:
            out[prefix + os.fsdecode(name)] = (mode, value)
    return out


def _is_binary(data: bytes) -> bool:
    return b"\x00" in data[:_BINARY_PROBE] or len(data) > _MAX_TEXT


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", "replace").splitlines(keepends=True)


def diff_snapshots(
    store: Store, old: Snapshot, new: Snapshot | None, patch: bool = False, counts: bool = True
) -> DiffResult:
    """Diff ``old`` against ``new`` (None: the live workspace, read without storing)."""
    old_flat = flatten_tree(store.odb, bytes.fromhex(old.tree))
    if new is None:
        from .snapshot import scan_tree

        result, _root, _cache = scan_tree(store)
        new_flat = _flatten_node(store, result.root, {})
        ws = store.workspace

        def read_new(path: str, oid: bytes) -> bytes:
            full = os.path.join(ws, path)
            if os.path.islink(full):
                return os.fsencode(os.readlink(full))
            with open(full, "rb") as f:
                return f.read()
    else:
        new_flat = flatten_tree(store.odb, bytes.fromhex(new.tree))

        def read_new(path: str, oid: bytes) -> bytes:
            return store.odb.read(oid)[1]

    changes = diff_trees(old_flat, new_flat)
    diff = DiffResult(old.id, new.id if new else "workspace", changes)
    if counts or patch:
        chunks: list[str] = []
        for change in changes:
            a = store.odb.read(bytes.fromhex(change.old_oid))[1] if change.old_oid else b""
            b = read_new(change.path, bytes.fromhex(change.new_oid)) if change.new_oid else b""
            _count(change, a, b, chunks if patch else None)
        if patch:
            diff.patch = "".join(chunks)
    return diff


def _count(change: FileChange, a: bytes, b: bytes, out: list[str] | None) -> None:
    change.binary = _is_binary(a) or _is_binary(b)
    if out is not None:
        out.append(render_patch_header(change))
    if change.binary:
        if out is not None:
            out.append(f"Binary files a/{change.path} and b/{change.path} differ\n")
        return
    old_name = f"a/{change.path}" if change.old_oid else "/dev/null"
    new_name = f"b/{change.path}" if change.new_oid else "/dev/null"
    for line in difflib.unified_diff(_lines(a), _lines(b), old_name, new_name, n=3):
        if line.startswith("+") and not line.startswith("+++"):
            change.insertions += 1
        elif line.startswith("-") and not line.startswith("---"):
            change.deletions += 1
        if out is not None:
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")


def render_patch_header(change: FileChange) -> str:
    head = f"diff --git a/{change.path} b/{change.path}\n"
    if change.status == "A":
        head += f"new file mode {change.new_mode}\n"
    elif change.status == "D":
        head += f"deleted file mode {change.old_mode}\n"
    elif change.old_mode != change.new_mode:
        head += f"old mode {change.old_mode}\nnew mode {change.new_mode}\n"
    old = (change.old_oid or "0" * 40)[:12]
    new = (change.new_oid or "0" * 40)[:12]
    return head + f"index {old}..{new}\n"
