"""The data model: Objective → Thread → Agent Run → Snapshot.

Plain frozen dataclasses rather than pydantic models: they are built on every snapshot and log
line, and the CLI's snapshot fast path must not pay pydantic's import time. Each has ``to_dict``
(the JSON shape printed by ``--json``) and ``from_dict`` (validating what is read back from git
objects, which may come from another machine).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import StoreCorrupted
from .ids import is_id

__all__ = [
    "RUN_STATUSES",
    "AgentRun",
    "Objective",
    "Snapshot",
    "Thread",
    "iso_from_timestamp",
    "now_iso",
]

OBJECTIVE_STATUSES = ("open", "done", "abandoned")
RUN_STATUSES = ("running", "succeeded", "failed", "cancelled", "killed")


def now_iso() -> str:
    """Current UTC time as ISO 8601 with a Z suffix (microseconds)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_from_timestamp(seconds: int) -> str:
    """ISO 8601 UTC for a unix timestamp (seconds resolution, as stored in commits)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _require(data: dict[str, Any], key: str, kinds: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kinds):
        raise StoreCorrupted(f"metadata record has an invalid {key!r}: {value!r}")
    return value


def _require_id(data: dict[str, Any], key: str, kind: str, optional: bool = False) -> str | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not is_id(value, kind):
        raise StoreCorrupted(f"metadata record has an invalid {key!r}: {value!r}")
    return value


def _fields_of(record: Objective | Thread | AgentRun) -> dict[str, Any]:
    """The fields of a record whose fields are all plain values, as ``asdict`` gives them (its
    recursive copy costs ~10 µs a record; a hub turns thousands into dicts per bundle)."""
    return dict(record.__dict__)


@dataclass(frozen=True)
class Objective:
    """What the agent work is for; groups threads."""

    id: str
    title: str
    description: str = ""
    status: str = "open"
    created_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return _fields_of(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Objective:
        status = _require(data, "status", str)
        if status not in OBJECTIVE_STATUSES:
            raise StoreCorrupted(f"objective has an invalid status {status!r}")
        return cls(
            id=str(_require_id(data, "id", "objective")),
            title=_require(data, "title", str),
            description=_require(data, "description", str),
            status=status,
            created_at=_require(data, "created_at", str),
        )


@dataclass(frozen=True)
class Thread:
    """A line of snapshots (one ref), optionally forked from a snapshot of another thread."""

    id: str
    objective_id: str
    name: str
    forked_from: str | None = None
    created_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return _fields_of(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thread:
        return cls(
            id=str(_require_id(data, "id", "thread")),
            objective_id=str(_require_id(data, "objective_id", "objective")),
            name=_require(data, "name", str),
            forked_from=_require_id(data, "forked_from", "snapshot", optional=True),
            created_at=_require(data, "created_at", str),
        )


@dataclass(frozen=True)
class AgentRun:
    """One execution of an agent on a thread, from a base snapshot to a result snapshot."""

    id: str
    thread_id: str
    agent: str = "agent"
    environment: str = "local"
    base_snapshot: str | None = None
    result_snapshot: str | None = None
    status: str = "running"
    exit_code: int | None = None
    started_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    manual: bool = False
    """Started without a command (``run start --manual``): it waits for ``run finish``."""
    reason: str | None = None
    """Why the run ended as it did, when it was not told (e.g. swept as abandoned)."""

    def to_dict(self) -> dict[str, Any]:
        data = _fields_of(self)
        data["thread"] = self.thread_id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentRun:
        status = _require(data, "status", str)
        if status not in RUN_STATUSES:
            raise StoreCorrupted(f"run has an invalid status {status!r}")
        exit_code = data.get("exit_code")
        if exit_code is not None and not isinstance(exit_code, int):
            raise StoreCorrupted(f"run has an invalid exit_code {exit_code!r}")
        finished = data.get("finished_at")
        return cls(
            id=str(_require_id(data, "id", "run")),
            thread_id=str(_require_id(data, "thread_id", "thread")),
            agent=_require(data, "agent", str),
            environment=_require(data, "environment", str),
            base_snapshot=_require_id(data, "base_snapshot", "snapshot", optional=True),
            result_snapshot=_require_id(data, "result_snapshot", "snapshot", optional=True),
            status=status,
            exit_code=exit_code,
            started_at=_require(data, "started_at", str),
            finished_at=finished if isinstance(finished, str) else None,
            manual=data.get("manual") is True,
            reason=reason if isinstance(reason := data.get("reason"), str) else None,
        )


@dataclass(frozen=True)
class Snapshot:
    """One captured state of a workspace: a commit on its thread's ref."""

    id: str
    commit: str
    tree: str
    thread: str
    run: str | None
    parent: str | None
    message: str
    created_at: str
    stats: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    parent_commit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
