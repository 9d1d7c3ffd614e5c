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

    try:
        store = Store.open(store_dir=(ctx.find_root().obj or {}).get("store_dir"))
        names = {str(r["id"]): str(r.get("name", "")) for r in store.meta.all("threads")}
        found = set(names.values())
        prefix = "refs/narrative/remotes/"
        for ref in store.refs.list(prefix):
            remote, _, thread_id = ref[len(prefix) :].partition("/threads/")
            found.add(f"{remote}/{names.get(thread_id) or thread_id}")
        found.update(run.id for run in list_runs(store))
    except (NarrativeError, OSError):
        return []
    return sorted(name for name in found if name and name.startswith(incomplete))
