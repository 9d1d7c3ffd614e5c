"""The one place dulwich is loaded: the pure-Python reader of packed objects.

Used only when pygit2 (libgit2) cannot be imported, e.g. a minimal container image or an
architecture without a pygit2 wheel (see ``docs/decisions.md``). dulwich reads the store's
objects directory directly; it reads no git config, so nothing of the user's machine leaks in.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["open_object_store", "read_object"]

_TYPE_NAMES = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}


def open_object_store(git_dir: str) -> Any:
    """dulwich's object store over the shadow store's ``objects`` directory."""
    from dulwich.object_store import DiskObjectStore

    return DiskObjectStore(os.path.join(git_dir, "objects"))


def read_object(object_store: Any, oid: bytes) -> tuple[str, bytes]:
    """Type name and raw content of an object, deltas resolved; KeyError when absent."""
    kind_code, data = object_store.get_raw(oid)
    return _TYPE_NAMES[int(kind_code)], bytes(data)
