"""What an import does to the store's threads: the record of what changed
(:class:`ImportResult`), and :func:`fast_forward`, which moves a thread to an incoming head only
when that is a fast-forward and otherwise keeps the incoming head beside the local one, under
``refs/narrative/remotes/<source>/threads/<id>``. Shared by bundle and archive imports and by
remotes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from narrative import ancestry
from narrative.errors import ConcurrentUpdate
from narrative.store import Store

__all__ = ["ImportResult", "Readable", "fast_forward", "is_ancestor"]

_REMOTE_PREFIX = "refs/narrative/remotes/"


@dataclass
class ImportResult:
    """What an import changed."""

    url: str
    format: str
    source: str
    objects: int = 0
    updated: dict[str, str] = field(default_factory=dict)
    """thread id → new head commit (created or fast-forwarded)."""
    unchanged: list[str] = field(default_factory=list)
    diverged: dict[str, str] = field(default_factory=dict)
    """thread id → ref where the incoming head was kept beside the local one."""
    staged: dict[str, str] = field(default_factory=dict)
    """thread id → incoming head, put under the ref ``stage`` named instead of the thread."""
    records: int = 0
    conflicts: list[str] = field(default_factory=list)
    snapshot: str | None = None


class Readable(Protocol):
    """A binary stream to import from."""

    def read(self, n: int = -1, /) -> bytes: ...


def is_ancestor(store: Store, ancestor: bytes, descendant: bytes, limit: int = 100_000) -> bool:
    """:func:`narrative.ancestry.is_ancestor` in ``store``, giving up after ``limit`` commits."""
    return ancestry.is_ancestor(store.odb, ancestor, descendant, limit)


def fast_forward(
    store: Store, thread_id: str, incoming: bytes, source: str, result: ImportResult
) -> None:
    """Move a thread to ``incoming`` if that is a fast-forward; if both sides moved, keep the
    local head and put the incoming one under ``refs/narrative/remotes/<source>/``."""
    ref = store.thread_ref(thread_id)
    for _attempt in range(20):
        local = store.refs.read(ref)
        if local == incoming or (local is not None and is_ancestor(store, incoming, local)):
            result.unchanged.append(thread_id)
            return
        if local is None or is_ancestor(store, local, incoming):
            try:
                reason = f"fast-forward from {source}"
                store.refs.update(ref, incoming, expected=local, reason=reason)
            except ConcurrentUpdate:
                continue
            result.updated[thread_id] = incoming.hex()
            return
        side = f"{_REMOTE_PREFIX}{source}/threads/{thread_id}"
        store.refs.update(side, incoming)
        result.diverged[thread_id] = side
        return
    raise ConcurrentUpdate(f"thread {thread_id} keeps moving; import it again")
