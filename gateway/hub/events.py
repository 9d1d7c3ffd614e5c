"""Event logs of runs driven by a hub.

:class:`RunEventLog` is the hub's log of a run: ``<store>/narrative/runs/<run-id>/events.jsonl``.
Append-only JSON lines, one event each, numbered from 1. The hub is the only writer (it is the
authority for run state), so appends need no lock; each line is written with one ``write`` on
an ``O_APPEND`` descriptor and flushed to disk, so a crash leaves whole lines plus at most one
torn last line, which readers skip. Readers (``narrative run show``, a CLI following its run)
only read, so they can run in any process at any time.

:class:`EventBudget` caps what of a runtime's reporting a run's log takes (the runtime is
hostile input: the agent controls its environment).

:class:`RuntimeEvents` is the runtime's side: what it reported for its run, kept (in bounded
memory, spilled to a file) until the hub has it, so a dropped connection loses nothing.
"""

from __future__ import annotations

import base64
import json
import os
from collections import deque
from typing import Any

from narrative.jsonio import parse_json
from narrative.models import now_iso
from narrative.store import Store
from providers.base import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_EVENTS, DEFAULT_MAX_OUTPUT_BYTES

from .agent_output import output_bytes

__all__ = ["EventBudget", "RunEventLog", "RuntimeEvents", "events_path"]

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
        _append_line(self.path, event, sync=kind not in _VOLATILE)
        return event

    def read(self, since: int = 0) -> list[dict[str, Any]]:
        """Events with ``seq`` greater than ``since``, oldest first (a torn last line skipped)."""
        return [e for e in _parse(self._bytes_from(0)[0]) if e["seq"] > since]

    def read_new(self) -> list[dict[str, Any]]:
        """The events appended since the last call (only whole lines; a follower polls this
        without reading the log from the start each time, nor opening it while it did not
        grow: fifty runs followed at once are fifty polls every few hundredths of a second)."""
        try:
            if os.stat(self.path).st_size <= self._offset:
                return []
        except FileNotFoundError:
            return []
        data, self._offset = self._bytes_from(self._offset)
        return _parse(data)

    def _bytes_from(self, offset: int) -> tuple[bytes, int]:
        return _whole_lines(self.path, offset)

    def read_page(self, offset: int, max_bytes: int = 1 << 18) -> tuple[list[dict[str, Any]], int]:
        """The events of the whole lines in about ``max_bytes`` from byte ``offset`` on, and the
        offset after them (a reader pages through a log of any size in bounded memory; a line
        longer than ``max_bytes`` is read whole)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
                while data and b"\n" not in data:  # one line longer than max_bytes: read it whole
                    more = f.read(max_bytes)
                    if not more:
                        break
                    data += more
        except FileNotFoundError:
            return [], offset
        whole = data[: data.rfind(b"\n") + 1]
        return _parse(whole), offset + len(whole)

    def tail_offset(self, max_bytes: int) -> int:
        """The offset of the first whole line in the last ``max_bytes`` of the log (0 for a log
        that short): where a reader showing only the newest events starts."""
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size <= max_bytes:
                    return 0
                f.seek(size - max_bytes - 1)
                chunk = f.read(max_bytes + 1)
        except FileNotFoundError:
            return 0
        newline = chunk.find(b"\n")
        return size if newline < 0 else size - max_bytes - 1 + newline + 1


class EventBudget:
    """How much of a runtime's reporting one run's log records: at most ``max_events`` events
    of at most ``max_bytes`` bytes together, of which at most ``max_output`` bytes of agent
    output (its head: the event that crosses the cap is cut). What is over a cap is dropped,
    with one ``events.truncated`` or ``output.truncated`` event recorded in its place.
    """

    def __init__(
        self,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_output: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.max_events, self.max_bytes, self.max_output = max_events, max_bytes, max_output
        self.events = self.bytes = self.output = 0
        self.truncated: set[str] = set()

    def admit(self, kind: str, fields: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The events to record for the runtime's event ``kind`` with ``fields``: itself (the
        head of its output, for the output that crosses the cap), a truncation marker the
        first time a cap is reached, or nothing."""
        markers: list[tuple[str, dict[str, Any]]] = []
        if kind == "agent.output":
            kept, whole = self._output_head(fields)
            if not whole and "output" not in self.truncated:
                self.truncated.add("output")
                markers.append(("output.truncated", {"limit": self.max_output}))
            if kept is None:
                return markers
            fields = kept
        size = len(json.dumps(fields, separators=(",", ":"), default=str))
        if self.events + 1 > self.max_events or self.bytes + size > self.max_bytes:
            if "events" not in self.truncated:
                self.truncated.add("events")
                limits = {"maxEvents": self.max_events, "maxBytes": self.max_bytes}
                markers.append(("events.truncated", limits))
            return markers
        self.events += 1
        self.bytes += size
        return [(kind, fields), *markers]

    def _output_head(self, fields: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """``fields`` of an output event cut to the room left under the output cap (None: no
        room left), and whether they are whole."""
        try:
            data = output_bytes(fields)
        except ValueError:  # not base64: the runtime sent something no runtime sends
            data = b""
        room = self.max_output - self.output
        if len(data) <= room:
            self.output += len(data)
            return fields, True
        if room <= 0:
            return None, False
        self.output = self.max_output
        head = data[:room]
        cut = {k: v for k, v in fields.items() if k not in ("data", "data64")}
        try:
            cut["data"] = head.decode("utf-8")
        except UnicodeDecodeError:
            cut["data64"] = base64.b64encode(head).decode("ascii")
        return cut, False


class RuntimeEvents:
    """The events a runtime reports for one run, numbered by ``rseq`` from 1, kept until the
    hub has them: every event is appended to ``path`` and only the newest ``keep`` stay in
    memory, so a chatty agent costs a bounded amount of memory and a hub that was away for
    long still gets every event (older ones are read back from the file).

    Args:
        path: The file the events are spilled to (replaced: one file per run).
        keep: How many of the newest events stay in memory.
    """

    def __init__(self, path: str, keep: int = 2000) -> None:
        self.path = path
        self.count = 0
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb"):
            pass  # truncated: a runtime reused for another run starts numbering again

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number ``event`` (sets its ``rseq``) and keep it; returns it."""
        self.count += 1
        event["rseq"] = self.count
        # Not synced: the file outlives a dropped connection, not the runtime's own crash,
        # and a run whose runtime crashed is lost anyway.
        _append_line(self.path, event, sync=False)
        self._recent.append(event)
        return event

    def since(self, rseq: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` events after ``rseq``, oldest first."""
        if rseq >= self.count:
            return []
        first = self._recent[0]["rseq"] if self._recent else self.count + 1
        if rseq + 1 >= first:
            start = rseq + 1 - first
            return [self._recent[i] for i in range(start, min(len(self._recent), start + limit))]
        older = (e for e in _parse(_whole_lines(self.path, 0)[0], "rseq") if e["rseq"] > rseq)
        return [e for _, e in zip(range(limit), older, strict=False)]


def _append_line(path: str, event: dict[str, Any], *, sync: bool) -> None:
    """One ``write`` of one JSON line on an ``O_APPEND`` descriptor (so a crash leaves whole
    lines and at most one torn last line), flushed to disk if ``sync``."""
    line = json.dumps(event, separators=(",", ":"), default=str).encode() + b"\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _whole_lines(path: str, offset: int) -> tuple[bytes, int]:
    """The complete lines of ``path`` from ``offset`` on, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return b"", offset
    whole = data[: data.rfind(b"\n") + 1]
    return whole, offset + len(whole)


def _parse(data: bytes, number: str = "seq") -> list[dict[str, Any]]:
    events = []
    for raw in data.splitlines():
        try:
            event = parse_json(raw)
        except ValueError:
            continue  # an interrupted append's torn line
        if isinstance(event, dict) and isinstance(event.get(number), int):
            events.append(event)
    return events
