"""Opening the store a command works on."""

from __future__ import annotations

import click

from narrative.store import Store

__all__ = ["open_store"]


def open_store(ctx: click.Context) -> Store:
    """The store named by ``--store``/``NARRATIVE_STORE`` or found above the current directory."""
    obj = ctx.find_root().obj or {}
    return Store.open(store_dir=obj.get("store_dir"))
