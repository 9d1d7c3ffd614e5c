"""The event log of a run driven by a hub: ``<store>/narrative/runs/<run-id>/events.jsonl``.

Append-only JSON lines, one event each, numbered from 1. The hub is the only writer (it is the
authority for run state), so appends need no lock; each line is written with one ``write`` on
an ``O_APPEND`` descriptor and flushed to disk, so a crash leaves whole lines plus at most one
torn last line, which readers skip. Readers (``narrative run show``, a CLI following its run)
only read, so they can run in any process at any time.
"""

from __future__ import annotations

import json
import os
from typing import Any

from narrative.models import now_iso
from narrative.store import Store

__all__ = ["RunEventLog", "events_path"]

_VOLATILE = frozenset({"agent.output", "call.routed"})


def events_path(store: Store, run_id: str) -> str:
    """Where the event log of ``run_id`` lives."""
    return os.path.join(store.git_dir, "narrative", "runs", run_id, "events.jsonl")


class RunEventLog:
    """The event log of one run.

    Args:
        store: The hub's store.
        run_id: The run.
    """

    def __init__(self, store: Store, run_id: str) -> None:
        self.path = events_path(store, run_id)
        self.run_id = run_id
        self._seq: int | None = None
        self._offset = 0

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one event of ``kind`` and return it (with its ``seq`` and ``time``).

        Lifecycle events are flushed to disk before this returns; the high-volume ones
        (output, routes) reach the page cache only, so a busy agent does not wait on the disk
        (a crash of the process loses none of them; a power cut may lose the last few).
        """
        if self._seq is None:
            self._seq = max((e["seq"] for e in self.read()), default=0)
        self._seq += 1
        event = {"seq": self._seq, "time": now_iso(), "type": kind, **fields}
        line = json.dumps(event, separators=(",", ":"), default=str).encode() + b"\n"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            if kind not in _VOLATILE:
                os.fsync(fd)
        finally:
            os.close(fd)
        return event

    def read(self, since: int = 0) -> list[dict[str, Any]]:
        """Events with ``seq`` greater than ``since``, oldest first (a torn last line skipped)."""
        return [e for e in _parse(self._bytes_from(0)[0]) if e["seq"] > since]

    def read_new(self) -> list[dict[str, Any]]:
        """The events appended since the last call (only whole lines; a follower polls this
        without reading the log from the start each time)."""
        data, self._offset = self._bytes_from(self._offset)
        return _parse(data)

    def _bytes_from(self, offset: int) -> tuple[bytes, int]:
        """The complete lines from ``offset`` on, and the offset after them."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return b"", offset
        whole = data[: data.rfind(b"\n") + 1]
        return whole, offset + len(whole)


def _parse(data: bytes) -> list[dict[str, Any]]:
    events = []
    for raw in data.splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue  # an interrupted append's torn line
        if isinstance(event, dict) and isinstance(event.get("seq"), int):
            events.append(event)
    return events
