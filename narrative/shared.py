"""History other machines hold: what was exported or shipped, which gc must never rewrite.

Snapshot ids are stable across machines, and so must be the commits behind them once another
store can hold them: a receiver that later gets an incremental bundle names those commits as
prerequisites, and a push fast-forwards only from them. Remote-tracking refs
(``refs/narrative/remotes/<remote>/...``) already record what each remote holds; exports and
bundles shipped to environments are recorded here, as ``refs/narrative/shared/<thread>/<commit>``.
A mark that an older one is an ancestor of replaces it, so a thread keeps few marks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from .commits import read_commit
from .errors import ConcurrentUpdate, StoreCorrupted
from .store import Store

__all__ = ["REMOTE_REF_PREFIX", "SHARED_REF_PREFIX", "mark_shared", "shared_commits"]

SHARED_REF_PREFIX = "refs/narrative/shared/"
REMOTE_REF_PREFIX = "refs/narrative/remotes/"


def _ancestors(store: Store, tips: Iterable[bytes], wanted: set[bytes] | None = None) -> set[bytes]:
    """Commits reachable from ``tips``; with ``wanted``, the walk stops once every wanted
    commit was met (an export's walk then ends at the thread's previous mark, not the root)."""
    seen: set[bytes] = set()
    missing = set(wanted) if wanted is not None else None
    stack = list(tips)
    while stack:
        oid = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        if missing is not None:
            missing.discard(oid)
            if not missing:
                break
        try:
            stack.extend(read_commit(store, oid).parents)
        except StoreCorrupted:
            continue  # a tracking ref may name a commit this store never received
    return seen


def mark_shared(store: Store, heads: Mapping[str, bytes]) -> None:
    """Record that thread id → commit ``heads`` left this store (exported, shipped)."""
    for thread_id, oid in heads.items():
        prefix = f"{SHARED_REF_PREFIX}{thread_id}/"
        marks = store.refs.list(prefix)
        if oid in marks.values():
            continue
        below = _ancestors(store, [oid], wanted=set(marks.values()))
        later = [mark for mark in marks.values() if mark not in below]
        if later and oid in _ancestors(store, later, wanted={oid}):
            continue  # a later mark already covers it
        with contextlib.suppress(ConcurrentUpdate):
            store.refs.update(prefix + oid.hex(), oid, expected=None)
        for name, mark in marks.items():
            if mark in below:  # now covered by the new mark
                with contextlib.suppress(ConcurrentUpdate):
                    store.refs.update(name, None, expected=mark)


def shared_commits(store: Store) -> set[bytes]:
    """Every commit another machine may hold: ancestors of remote-tracking refs and marks."""
    tips = [
        *store.refs.list(REMOTE_REF_PREFIX).values(),
        *store.refs.list(SHARED_REF_PREFIX).values(),
    ]
    return _ancestors(store, tips)
