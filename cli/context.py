"""Opening the store a command works on."""

from __future__ import annotations

import click

from narrative.store import Store

from .output import note

__all__ = ["open_store"]


def open_store(ctx: click.Context) -> Store:
    """The store named by ``--store``/``NARRATIVE_STORE`` or the one of the workspace at or
    above the current directory (migrated first if it still has the old in-workspace layout)."""
    obj = ctx.find_root().obj or {}
    store = Store.open(store_dir=obj.get("store_dir"))
    if store.migrated_from is not None:
        note(
            f"narrative: moved the store of {store.config.workspace} from "
            f"{store.migrated_from} to {store.git_dir} (stores now live outside the workspace)"
        )
    return store
