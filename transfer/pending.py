"""Threads that moved on both sides of a pull and wait to be merged (``narrative info`` and
``status`` list them; a restore of the thread or the next pull merges them).

Kept apart from :mod:`transfer.remotes` so that reading them costs no fsspec import.
"""

from __future__ import annotations

import json
import os
from typing import Any

from narrative.fsutil import write_atomic
from narrative.jsonio import parse_json
from narrative.store import Store

from .errors import InvalidArtifact
from .thread_updates import is_ancestor

__all__ = ["merge_pending", "pending_merges", "save_pending"]

_PENDING = os.path.join("narrative", "pending-merges.json")


def pending_merges(store: Store) -> dict[str, dict[str, str]]:
    """Threads that moved on both sides and wait to be merged: thread id → remote and the
    remote's head. Listed by ``narrative info``; merged when the user restores that thread
    (:func:`merge_pending`), by the next pull once the workspace is on it, or by hand with
    ``narrative merge REMOTE/THREAD``. An entry whose remote head the thread already contains
    is done, however it got merged, and is not listed."""
    try:
        with open(os.path.join(store.git_dir, _PENDING), "rb") as f:
            data = parse_json(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArtifact(f"unreadable {_PENDING}: {exc}") from None
    if not isinstance(data, dict):
        return {}
    entries = {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}
    return {t: e for t, e in entries.items() if not _merged(store, t, e)}


def _merged(store: Store, thread_id: str, entry: dict[str, str]) -> bool:
    local = store.refs.read(store.thread_ref(thread_id))
    try:
        theirs = bytes.fromhex(entry.get("theirs", ""))
    except ValueError:
        return False
    if local is None or not theirs or not store.odb.exists(theirs):
        return False
    return is_ancestor(store, theirs, local)


def merge_pending(store: Store, strategy: Any = None) -> Any:
    """Merge the pending merge of the workspace's thread, when the workspace is at that
    thread's head (just restored, say); returns the merge (conflicts leave it in progress, as
    ``narrative merge`` does) or None when there was nothing to merge."""
    from narrative.head import read_head
    from narrative.workspace_merge import merge_workspace

    current = store.config.default_thread
    entry = pending_merges(store).get(current)
    local = store.refs.read(store.thread_ref(current))
    if entry is None or local is None or read_head(store) != local:
        return None
    remote = entry.get("remote", "")
    tracked = store.refs.read(f"refs/narrative/remotes/{remote}/threads/{current}")
    merge = merge_workspace(store, f"{remote}/{current}" if tracked else entry["theirs"], strategy)
    if not merge.conflicts:
        with_done = pending_merges(store)  # the merge moved the thread: the entry drops out
        save_pending(store, with_done)
    return merge


def save_pending(store: Store, pending: dict[str, dict[str, str]]) -> None:
    data = json.dumps(pending, indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(os.path.join(store.git_dir, _PENDING), data)
