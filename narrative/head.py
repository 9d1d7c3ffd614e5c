"""The workspace HEAD: which snapshot the working directory was last restored from or
snapshotted as, and the thread it continues.

The snapshot is a ref, ``refs/narrative/workspace/head`` (so gc keeps its commit and stock git
shows it); the thread it continues is the store's ``default_thread``. A snapshot taken with no
``--thread`` continues that thread only while the HEAD is the thread's head; otherwise (after a
restore of an older snapshot, or after a pull moved the thread on) it starts a new thread forked
from the HEAD, so no thread is ever rewritten with a state that drops another snapshot's work.
"""

from __future__ import annotations

import re

from .errors import ConcurrentUpdate, InvalidInput, ThreadNotFound
from .hierarchy import create_thread, get_thread, list_threads
from .models import Thread
from .refs import ANY
from .store import Store

__all__ = ["HEAD_LOCK", "WORKSPACE_HEAD_REF", "fork_thread_name", "read_head", "set_head"]

WORKSPACE_HEAD_REF = "refs/narrative/workspace/head"
#: The store lock a snapshot of the workspace holds while it reads and moves the HEAD.
HEAD_LOCK = "head"


def read_head(store: Store) -> bytes | None:
    """The commit of the snapshot the workspace holds, or None before the first one."""
    return store.refs.read(WORKSPACE_HEAD_REF)


def set_head(store: Store, commit: bytes, thread_id: str | None = None) -> None:
    """Record that the workspace holds ``commit``; with ``thread_id`` it continues that thread.

    Writes only what changed: a snapshot that finds nothing new must not pay a ref update."""
    if read_head(store) != commit:
        store.refs.update(WORKSPACE_HEAD_REF, commit, expected=ANY)
    if thread_id is not None and thread_id != store.config.default_thread:
        store.config.default_thread = thread_id
        store.save_config()


def fork_thread_name(store: Store, thread: Thread) -> str:
    """``<name>-<n>`` with the smallest n not taken in the thread's objective."""
    base = re.sub(r"-\d+$", "", thread.name) or thread.name
    taken = {t.name for t in list_threads(store, thread.objective_id)}
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def fork_thread(store: Store, from_thread: str, from_snapshot: str) -> Thread:
    """A new thread continuing ``from_snapshot`` (a snapshot of ``from_thread``)."""
    try:
        thread = get_thread(store, from_thread)
    except ThreadNotFound:
        thread = get_thread(store, store.config.default_thread)
    for _attempt in range(20):  # another process may take the same name at the same moment
        try:
            return create_thread(
                store, thread.objective_id, fork_thread_name(store, thread), from_snapshot
            )
        except InvalidInput as exc:
            if "already has a thread named" not in str(exc):
                raise
    raise ConcurrentUpdate("could not name a new thread: too many concurrent snapshots")


def describe_head(store: Store) -> dict[str, str | None]:
    """For ``narrative info``: the workspace HEAD's snapshot, the thread it continues, and
    where the next snapshot taken without ``--thread`` goes."""
    from .commits import snapshot_at

    current = store.config.default_thread
    head = read_head(store)
    thread_head = store.refs.read(store.thread_ref(current))
    snapshot = snapshot_at(store, head).id if head is not None else None
    if head is None or thread_head is None or head == thread_head:
        goes_to = current
    else:
        source = snapshot_at(store, head).thread
        try:
            name = fork_thread_name(store, get_thread(store, source))
        except ThreadNotFound:
            name = "a new thread"
        goes_to = f"new thread {name} (the workspace is not at the head of {current})"
    return {"workspace_head": snapshot, "current_thread": current, "next_snapshot": goes_to}
