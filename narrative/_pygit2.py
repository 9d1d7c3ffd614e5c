"""The one place pygit2 (libgit2) is loaded and configured.

libgit2 would otherwise read the user's global, XDG and system git config; the shadow store must
behave the same on every machine, so their search paths are pointed at an empty directory.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

__all__ = ["open_repository", "read_object"]

_state = {"configured": False}


def _pygit2() -> Any:
    import pygit2

    if not _state["configured"]:
        empty = os.path.join(tempfile.gettempdir(), "narrative-empty-config")
        os.makedirs(empty, exist_ok=True)
        for level in (
            pygit2.enums.ConfigLevel.GLOBAL,
            pygit2.enums.ConfigLevel.XDG,
            pygit2.enums.ConfigLevel.SYSTEM,
            pygit2.enums.ConfigLevel.PROGRAMDATA,
        ):
            pygit2.settings.search_path[level] = empty
        _state["configured"] = True
    return pygit2


def open_repository(git_dir: str) -> Any:
    """Open the shadow store's git dir (bare) with libgit2."""
    pygit2 = _pygit2()
    return pygit2.Repository(git_dir, pygit2.enums.RepositoryOpenFlag.NO_SEARCH)


def read_object(repo: Any, oid: bytes) -> tuple[str, bytes]:
    """Type name and raw content of an object; KeyError when absent."""
    pygit2 = _pygit2()
    kind_code, data = repo.odb.read(pygit2.Oid(raw=oid))[:2]
    names = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}
    return names[int(kind_code)], bytes(data)
