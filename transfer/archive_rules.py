"""The safety rules of archives: what an archive may hold, applied by the reader and the writer.

An archive is hostile input and a restore would materialise it. Paths must be relative, stay
inside the tree, hold no NUL byte, fit file-system limits and pass the one path rule
(:func:`narrative.paths.path_problem`); no path may be listed twice or be both a file and a
directory of another. Members must be regular files or symlinks under ``files/``: hard links,
devices, fifos, directories and sparse members are refused. Symlinks whose target is absolute or
resolves outside the tree (following the archive's other symlinks, as the kernel would) are
refused: git itself would store such links. The writer checks the same rules, so every archive
written here is one the reader accepts.
"""

from __future__ import annotations

import tarfile
from collections import deque
from collections.abc import Mapping
from typing import Any

from narrative.fsck import NAME_MAX, PATH_MAX
from narrative.paths import path_problem

from .archive import FILES_PREFIX, ArchiveError

__all__ = [
    "check_layout",
    "check_links",
    "check_member_name",
    "check_path",
    "member_kind",
    "path_bytes",
]


_MAX_LINK_HOPS = 40


def path_bytes(path: str) -> bytes:
    """Paths are str; names that are not UTF-8 travel as surrogate escapes, like os.fsdecode."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ArchiveError(f"archive path {path!r} is not encodable") from None


def check_path(path: Any) -> str:
    """``path`` if it obeys the path rules of this module, else ArchiveError."""
    if not isinstance(path, str) or not path:
        raise ArchiveError(f"archive manifest has an invalid path {path!r}")
    if path.startswith("/"):
        raise ArchiveError(f"archive path {path!r} is absolute")
    if "\x00" in path:
        raise ArchiveError(f"archive path {path!r} contains a NUL byte")
    encoded = path_bytes(path)
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise ArchiveError(
            f"archive path {path[:80]!r}... is longer than file systems allow "
            f"({NAME_MAX} bytes a name, {PATH_MAX} a path)"
        )
    if ".." in path.split("/"):
        raise ArchiveError(f"archive path {path!r} escapes the tree")
    problem = path_problem(path)  # the one path rule: .git look-alikes, .narrative, ...
    if problem is not None:
        raise ArchiveError(f"archive path {path!r} is refused: {problem}")
    return path


def check_layout(paths: list[str]) -> None:
    """No duplicates, and no path that is both a file and a directory of another."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise ArchiveError(f"archive manifest lists {path!r} twice")
        seen.add(path)
    for path in paths:
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in seen:
                raise ArchiveError(f"archive path {parent!r} is both a file and a directory")


def _link_escapes(path: str, target: str, links: Mapping[str, str]) -> bool:
    """Whether the symlink at ``path`` resolves outside the tree: absolute, or ``..`` past the
    root, following the tree's other symlinks as the kernel would."""
    if target.startswith("/") or "\x00" in target:
        return True
    stack = path.split("/")[:-1]
    pending = deque(target.split("/"))
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(part)
        inner = links.get("/".join(stack))
        if inner is not None:
            hops += 1
            if hops > _MAX_LINK_HOPS:
                return False  # a loop: resolving fails (ELOOP), so it reaches nothing
            if inner.startswith("/") or "\x00" in inner:
                return True
            stack.pop()
            pending.extendleft(reversed(inner.split("/")))
    return False


def check_links(links: Mapping[str, str]) -> None:
    """ArchiveError for the first symlink that is absolute or resolves outside the tree."""
    for path, target in links.items():
        if _link_escapes(path, target, links):
            raise ArchiveError(
                f"symlink {path} -> {target} points outside the tree "
                "(archives refuse absolute and escaping symlinks)"
            )


def member_kind(info: tarfile.TarInfo) -> str | None:
    """Why a member type is refused, or None for regular files and symlinks."""
    if info.islnk():
        return "is a hard link"
    if info.ischr() or info.isblk():
        return "is a device file"
    if info.isfifo():
        return "is a fifo"
    if info.isdir():
        return "is a directory"
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.SYMTYPE) or info.sparse:
        return "has an unsupported member type"
    return None


def check_member_name(name: str) -> str:
    """The manifest path a member name stands for, or ArchiveError."""
    if name.startswith("/"):
        raise ArchiveError(f"archive member {name} has an absolute name")
    if ".." in name.split("/"):
        raise ArchiveError(f"archive member {name} escapes the tree")
    if not name.startswith(FILES_PREFIX):
        raise ArchiveError(f"archive member {name} is outside {FILES_PREFIX}")
    return name[len(FILES_PREFIX) :]
