"""Installed packages' entry points (provider and handler plugins), listed once per ``sys.path``.

Listing them reads the metadata of every installed distribution (~60 ms of CPU with 160
installed): a hub's runtime did that for every run, and a pod's warm runtime lists them once
before it forks run runtimes (:mod:`providers.zygote`). Keyed by ``sys.path``, where
distributions are found: a path added later (a test's, a plugin's) is read when asked for. A
package installed into a path already read is seen by the next process.
"""

from __future__ import annotations

import importlib.metadata
import sys
import threading
from typing import Any

__all__ = ["entry_points_in"]

_LISTED: dict[tuple[str, ...], Any] = {}
"""``importlib.metadata.entry_points()`` (SelectableGroups before Python 3.12, EntryPoints
since: both select by group) for the last ``sys.path`` asked about."""
_LOCK = threading.Lock()


def entry_points_in(group: str) -> importlib.metadata.EntryPoints:
    """The installed entry points of ``group``."""
    key = tuple(sys.path)
    with _LOCK:
        listed = _LISTED.get(key)
        if listed is None:
            listed = importlib.metadata.entry_points()
            _LISTED.clear()  # one sys.path at a time: the last one asked about
            _LISTED[key] = listed
    selected: importlib.metadata.EntryPoints = listed.select(group=group)
    return selected
