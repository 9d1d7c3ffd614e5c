"""Transfer: git bundles and tar archives over any fsspec URL, imports, and remotes.

``transfer.export(store, url, ...)`` and ``transfer.import_(store, url, ...)`` mirror the CLI.
Every error is a :class:`TransferError` (the tree is in :mod:`transfer.errors`).
"""

from __future__ import annotations

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
