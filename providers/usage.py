"""What a run cost: wall time, CPU time, peak memory, bytes sent each way, and its phases.

The agent controls its environment, so every number here is measured from outside it: the
wall time and the phases by the hub's (or the CLI's) clock, the bytes by the hub as it serves
the input and pulls the result, CPU and memory by the provider (``wait4`` of the process it
spawned, the container's cgroup counters). A provider that cannot measure leaves the number
null and says so in ``measured_by``; nothing is estimated.

The record is kept next to the run's event log (``<store>/narrative/runs/<id>/usage.json``),
local state of the store that ran it, so ``narrative run show`` reads it after the hub is gone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from narrative.fsutil import write_atomic
from narrative.jsonio import parse_json
from narrative.store import Store

__all__ = [
    "ProcessUsage",
    "ReapedProcesses",
    "Sampler",
    "UsageMeter",
    "load_usage",
    "phases_from_events",
    "rusage_usage",
    "save_usage",
    "total_usage",
    "usage_record",
    "wall_from_events",
]

_FILE = "usage.json"


@dataclass(frozen=True)
class ProcessUsage:
    """CPU time and peak memory of what ran in an environment, and who measured them."""

    cpu_seconds: float | None
    peak_memory_bytes: int | None
    measured_by: str


def rusage_usage(usage: resource.struct_rusage, measured_by: str) -> ProcessUsage:
    """A process tree's usage from its ``wait4`` rusage: user + system CPU of the process and
    every descendant it waited for; the peak is the largest resident set among them (Linux
    reports ``ru_maxrss`` in KiB)."""
    return ProcessUsage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, measured_by)


class UsageMeter:
    """Measures one run in an environment, from its creation to :meth:`finish`.

    This one measures nothing (the provider cannot): its numbers are null and ``measured_by``
    says why. Providers that can measure subclass it.
    """

    samples: ClassVar[bool] = False
    """Whether :meth:`sample` does anything (else nobody need call it)."""

    def __init__(self, measured_by: str) -> None:
        self.measured_by = measured_by

    def sample(self) -> None:
        """Take one sample (called every fraction of a second while the run lasts)."""

    def finish(self, handle: str | None) -> ProcessUsage:
        """The usage since the meter was made; ``handle`` is the spawned process the run ran
        in, if it had one."""
        return ProcessUsage(None, None, self.measured_by)


SAMPLE_INTERVAL = 0.2
"""Seconds between two samples of a meter that samples (a peak memory read from samples)."""


class Sampler:
    """Calls a meter's :meth:`UsageMeter.sample` every :data:`SAMPLE_INTERVAL` seconds on a
    thread of its own, from :meth:`start` to :meth:`stop` (nothing for a meter that does not
    sample)."""

    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        if self.meter.samples:
            self._thread = threading.Thread(target=self._run, name="usage-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.meter.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class ReapedProcesses:
    """The rusage of spawned processes, recorded by whoever reaps them (``wait4``), kept until
    read once (a process that is never asked about is forgotten after ``limit`` others)."""

    def __init__(self, limit: int = 256) -> None:
        self._done: dict[str, resource.struct_rusage] = {}
        self._changed = threading.Condition()
        self._limit = limit

    def record(self, handle: str, usage: resource.struct_rusage) -> None:
        with self._changed:
            self._done[handle] = usage
            while len(self._done) > self._limit:
                del self._done[next(iter(self._done))]
            self._changed.notify_all()

    def take(self, handle: str, timeout: float) -> resource.struct_rusage | None:
        """The rusage of ``handle`` once it has been reaped (waiting ``timeout`` seconds at
        most); None when it was not, or was not spawned by this process."""
        with self._changed:
            self._changed.wait_for(lambda: handle in self._done, timeout)
            return self._done.pop(handle, None)


def _seconds_between(start: str, end: str) -> float:
    def parse(text: str) -> dt.datetime:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")

    return max(0.0, (parse(end) - parse(start)).total_seconds())


_PHASE_MARKS = (
    ("start", "runtime.connected"),
    ("restore", "snapshot.shipped"),
    ("agent", "agent.exited"),
    ("collect", "run.finished"),
)
"""Each phase of a hub's run ends at the first event of its type (the hub's own clock): the
runtime started and connected, the input restored in the environment, the agent ran, the
result came home and the run was recorded."""


def first_times(events: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The hub's time stamp of the first event of each type."""
    first: dict[str, str] = {}
    for event in events:
        kind, time = event.get("type"), event.get("time")
        if isinstance(kind, str) and isinstance(time, str) and kind not in first:
            first[kind] = time
    return first


def wall_from_events(events: Iterable[Mapping[str, Any]]) -> float | None:
    """Seconds from a hub's run being created to its being recorded as finished."""
    first = first_times(events)
    start, end = first.get("run.created"), first.get("run.finished")
    return _seconds_between(start, end) if start and end else None


def phases_from_events(events: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The phases of a hub's run from its event log (by the hub's ``time`` stamps, never a
    runtime's claims); a phase the run never reached is left out."""
    first = first_times(events)
    phases: dict[str, float] = {}
    previous = first.get("run.created")
    for name, mark in _PHASE_MARKS:
        end = first.get(mark)
        if previous is None or end is None:
            continue
        phases[name] = round(_seconds_between(previous, end), 3)
        previous = end
    return phases


def usage_record(
    wall_seconds: float | None,
    process: ProcessUsage,
    bytes_to_environment: int | None,
    bytes_from_environment: int | None,
    phases: Mapping[str, float],
    measured_by: str,
) -> dict[str, Any]:
    """The usage record of one run (the shape ``run show --json`` reports as ``usage``)."""
    cpu = process.cpu_seconds
    return {
        "wall_seconds": round(wall_seconds, 3) if wall_seconds is not None else None,
        "cpu_seconds": round(cpu, 3) if cpu is not None else None,
        "peak_memory_bytes": process.peak_memory_bytes,
        "bytes_to_environment": bytes_to_environment,
        "bytes_from_environment": bytes_from_environment,
        "measured_by": f"{process.measured_by}; {measured_by}",
        "phases": dict(phases),
    }


def _path(store: Store, run_id: str) -> str:
    from .events import events_path  # (events needs base, which needs this module)

    return os.path.join(os.path.dirname(events_path(store, run_id)), _FILE)


def save_usage(store: Store, run_id: str, record: Mapping[str, Any]) -> None:
    path = _path(store, run_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2).encode() + b"\n")


def load_usage(store: Store, run_id: str) -> dict[str, Any] | None:
    """The usage record of a run, or None when none was recorded (or it cannot be read)."""
    try:
        with open(_path(store, run_id), "rb") as f:
            data = parse_json(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def total_usage(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Records summed (the peak is the largest; a number is null when no run has it), with
    the number of runs and each way of measuring that was used."""
    records = list(records)

    def numbers(key: str) -> list[Any]:
        return [r[key] for r in records if isinstance(r.get(key), int | float)]

    def summed(key: str) -> Any:
        found = numbers(key)
        return round(sum(found), 3) if found else None

    peaks = numbers("peak_memory_bytes")
    phases: dict[str, float] = {}
    for record in records:
        for name, seconds in (record.get("phases") or {}).items():
            if isinstance(seconds, int | float):
                phases[name] = round(phases.get(name, 0.0) + seconds, 3)
    ways = sorted({str(r.get("measured_by")) for r in records if r.get("measured_by")})
    return {
        "wall_seconds": summed("wall_seconds"),
        "cpu_seconds": summed("cpu_seconds"),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "bytes_to_environment": summed("bytes_to_environment"),
        "bytes_from_environment": summed("bytes_from_environment"),
        "measured_by": " | ".join(ways) if ways else "no run measured",
        "phases": phases,
        "runs": len(records),
    }
