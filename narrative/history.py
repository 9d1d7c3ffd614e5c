"""Resolving names to snapshots: ids, prefixes, thread names, ``thread@{n}``, remote-tracking
names, run ids and commits.

:func:`resolve_snapshot` is the one resolver of snapshot names every command uses; reading the
snapshots themselves is :mod:`narrative.commits`.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any

from .commits import resolved_snapshot, snapshot_at, snapshot_ids
from .errors import AmbiguousId, InvalidInput, SnapshotNotFound
from .models import Snapshot
from .runs import resolve_run, run_snapshots

if TYPE_CHECKING:
    from .store import Store

__all__ = ["reference_names", "resolve_snapshot"]


_PREVIOUS_HEAD = re.compile(r"(.+)@\{(\d+)\}")


def resolve_snapshot(store: Store, ref: str) -> Snapshot:
    """A snapshot by id, unique id prefix, the head of a thread (id or name), a previous head of
    a thread (``<thread>@{n}``: n moves ago, from its head log; ``@{0}`` is the head), the head
    of a thread as a remote last had it (``<remote>/<thread id or name>``, e.g.
    ``origin/main``), the result of a run that succeeded (run id or prefix), or (prefix of)
    commit id."""
    ref = ref.strip()
    if not ref:
        raise SnapshotNotFound(ref)
    previous = _PREVIOUS_HEAD.fullmatch(ref)
    if previous is not None:
        return snapshot_at(store, _previous_head(store, previous.group(1), int(previous.group(2))))
    if ref.startswith("run-"):
        return _run_result(store, ref)
    heads = store.thread_heads()
    if ref in heads:
        return snapshot_at(store, heads[ref])
    if "/" in ref:
        tracked = _remote_thread_head(store, ref)
        if tracked is not None:
            return snapshot_at(store, tracked)
    named = _named_thread(store, ref, heads)
    if named is not None:
        return snapshot_at(store, heads[named])
    matches: dict[str, bytes] = {}
    is_hex = len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref)
    # ids only: decoding 10,000 snapshots to return one was most of a resolve's time
    exact = None
    with contextlib.closing(snapshot_ids(store)) as pairs:  # closed: what it read is recorded
        for snapshot_id, oid in pairs:
            commit = oid.hex()
            if snapshot_id.startswith(ref) or (is_hex and commit.startswith(ref)):
                if ref in (snapshot_id, commit):
                    exact = oid
                    break
                matches[snapshot_id] = oid
    if exact is not None:
        return resolved_snapshot(store, exact)
    if len(matches) == 1:
        return resolved_snapshot(store, next(iter(matches.values())))
    if not matches:
        raise _not_found(store, ref)
    raise AmbiguousId(ref, list(matches))


def _not_found(store: Store, ref: str) -> SnapshotNotFound:
    """The error for a name that resolves to nothing, with the names it may have meant."""
    import difflib  # only on this error path

    close = difflib.get_close_matches(ref, reference_names(store), n=3)
    if close:
        return SnapshotNotFound(ref, f"did you mean {' or '.join(close)}?")
    return SnapshotNotFound(
        ref, "'narrative log --all' lists snapshots, 'narrative thread list' threads"
    )


def reference_names(store: Store) -> list[str]:
    """The names a user gives snapshots by: thread names and ``<remote>/<thread name>`` (for
    suggestions and shell completion)."""
    threads = _thread_names(store)
    names = set(threads.values())
    for tracking in store.refs.list(_REMOTES_PREFIX):
        remote, _, thread_id = tracking[len(_REMOTES_PREFIX) :].partition("/threads/")
        names.add(f"{remote}/{threads.get(thread_id) or thread_id}")
    return sorted(n for n in names if n)


_REMOTES_PREFIX = "refs/narrative/remotes/"


def _thread_names(store: Store) -> dict[str, str]:
    return dict(store.meta.decoded("threads", _id_and_name))


def _id_and_name(record: dict[str, Any]) -> tuple[str, str]:
    return str(record["id"]), str(record.get("name", ""))


def _remote_thread_head(store: Store, ref: str) -> bytes | None:
    """The remote-tracking head ``refs/narrative/remotes/<remote>/threads/<id>`` that
    ``<remote>/<thread>`` names (thread id, unique id prefix or name), or None if no such
    remote is tracked."""
    remote, _, wanted = ref.partition("/")
    prefix = f"refs/narrative/remotes/{remote}/threads/"
    try:
        tracked = {name[len(prefix) :]: oid for name, oid in store.refs.list(prefix).items()}
    except InvalidInput:
        return None
    if not tracked:
        return None
    names = _thread_names(store)
    found = [t for t in tracked if t == wanted or names.get(t) == wanted]
    found = found or [t for t in tracked if t.startswith(wanted)]
    if len(found) == 1:
        return tracked[found[0]]
    if not found:
        raise SnapshotNotFound(ref)
    raise AmbiguousId(ref, [f"{remote}/{t}" for t in found])


def _named_thread(store: Store, ref: str, heads: dict[str, bytes]) -> str | None:
    """The id of the thread with a head named ``ref``; two threads of that name (a pulled one
    beside the store's own) resolve to the workspace's current one if it is among them."""
    from .hierarchy import prefer_current_thread

    found = [t for t, name in _thread_names(store).items() if name == ref and t in heads]
    found = prefer_current_thread(store, found)
    if len(found) == 1:
        return found[0]
    if found:
        raise AmbiguousId(ref, found)
    return None


def _previous_head(store: Store, thread: str, n: int) -> bytes:
    """The commit thread ``thread`` (id, name or id prefix) was at ``n`` moves ago."""
    heads = store.thread_heads()
    thread_id = thread if thread in heads else _named_thread(store, thread, heads)
    if thread_id is None:
        from .hierarchy import resolve_thread

        thread_id = resolve_thread(store, thread).id
    ref = store.thread_ref(thread_id)
    if n == 0:
        head = store.refs.read(ref)
    else:
        log = store.refs.head_log(ref)
        head = log[-n].old if n <= len(log) else None
    if head is None:
        raise SnapshotNotFound(f"{thread}@{{{n}}}")
    return head


def _run_result(store: Store, ref: str) -> Snapshot:
    """The result snapshot of run ``ref`` (id or unique prefix): only a run that succeeded has
    one a plain name may use (``diff``/``merge RUN --allow-failed`` read the others)."""
    return run_snapshots(store, resolve_run(store, ref))[1]
