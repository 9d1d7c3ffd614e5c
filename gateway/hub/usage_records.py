"""A run's usage record: what it cost (wall time, CPU, peak memory, bytes each way) and how
long each phase took, kept as ``usage.json`` next to the run's event log and shown by
``run show`` and ``env show``. The numbers come from the providers' meters
(:mod:`providers.usage`) and the hub's own clock; phases are derived from the hub's events.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from narrative.fsutil import write_atomic
from narrative.hierarchy import list_runs
from narrative.jsonio import parse_json
from narrative.store import Store
from providers.usage import ProcessUsage

from .events import events_path

__all__ = [
    "environment_usage",
    "load_usage",
    "phases_from_events",
    "save_usage",
    "total_usage",
    "usage_record",
    "wall_from_events",
]

_FILE = "usage.json"


def _seconds_between(start: str, end: str) -> float:
    def parse(text: str) -> dt.datetime:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")

    return max(0.0, (parse(end) - parse(start)).total_seconds())


_PHASE_MARKS = (
    ("prepare", "runtime.spawned"),
    ("connect", "runtime.connected"),
    ("restore", "snapshot.shipped"),
    ("agent", "agent.exited"),
    ("collect", "result.collected"),
    ("record", "run.finished"),
)
"""Each phase of a hub's run ends at the first event of its type (the hub's own clock): the
environment reset and the runtime spawned, the runtime started and connected, the input
restored in the environment, the agent ran, the result came home, and it was screened and the
run recorded. A phase whose event is missing (a run that failed on the way) is counted in the
next one that has its event."""


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


def environment_usage(store: Store, name: str, created_at: str) -> dict[str, Any]:
    """What the runs of environment ``name`` cost in all (:func:`total_usage`): the runs
    started since it was created (``created_at``), so that an earlier, deleted environment of
    the same name is not counted."""
    runs = [r for r in list_runs(store) if r.environment == name and r.started_at >= created_at]
    return total_usage(u for u in (load_usage(store, r.id) for r in runs) if u)


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
