"""Where a store's gateway signing key lives (a module of its own, light to import: the
directory providers hide the key from their sandbox on every command)."""

from __future__ import annotations

import os

from narrative.store import Store

__all__ = ["key_path"]


def key_path(store: Store) -> str:
    """The store's gateway signing key."""
    return os.path.join(store.git_dir, "gateway.key")
