"""Opening the store a command works on."""

from __future__ import annotations

import click

from narrative.store import Store

from .output import note

__all__ = ["complete_refs", "open_store"]


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


def complete_refs(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of snapshot references: thread names, ``<remote>/<thread>`` names
    and run ids (read-only; nothing when there is no store here)."""
    from narrative.errors import NarrativeError
    from narrative.hierarchy import list_runs
    from narrative.history import reference_names

    try:
        store = Store.open(store_dir=(ctx.find_root().obj or {}).get("store_dir"))
        found = [*reference_names(store), *(run.id for run in list_runs(store))]
    except (NarrativeError, OSError):
        return []
    return sorted(name for name in found if name.startswith(incomplete))
