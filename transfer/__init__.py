"""Transfer: git bundles and tar archives over any fsspec URL, imports, and remotes.

``transfer.export(store, url, ...)`` and ``transfer.import_(store, url, ...)`` mirror the CLI.
Every error is a :class:`TransferError` (the tree is in :mod:`transfer.errors`).

The names below load their modules when first used: importing any ``transfer.x`` (the CLI's
``info`` reads pending merges, say) must not cost fsspec's import, which ``export`` and the
remotes need and most commands never do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import TransferError
    from .exporter import ExportResult, export
    from .importer import import_
    from .remotes import add_remote, fetch, list_remotes, push, remove_remote
    from .thread_updates import ImportResult

__all__ = [
    "ExportResult",
    "ImportResult",
    "TransferError",
    "add_remote",
    "export",
    "fetch",
    "import_",
    "list_remotes",
    "push",
    "remove_remote",
]

_HOMES = {
    "TransferError": "errors",
    "ExportResult": "exporter",
    "export": "exporter",
    "import_": "importer",
    "add_remote": "remotes",
    "fetch": "remotes",
    "list_remotes": "remotes",
    "push": "remotes",
    "remove_remote": "remotes",
    "ImportResult": "thread_updates",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
