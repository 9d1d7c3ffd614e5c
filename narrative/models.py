"""The data model: Objective → Thread → Agent Run → Snapshot.

Plain frozen records (:mod:`narrative.plain`) rather than pydantic models or dataclasses: they
are built on every snapshot and log line, and the CLI's snapshot fast path must pay neither
pydantic's import time nor the dataclass decorator's (~1-2 ms a class, at every start). Each has
``to_dict`` (the JSON shape printed by ``--json``) and ``from_dict`` (validating what is read
back from git objects, which may come from another machine).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .errors import StoreCorrupted
from .ids import is_id
from .plain import Frozen

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


def _fields_of(record: Frozen) -> dict[str, Any]:
    """The fields of a record whose fields are all plain values (no recursive copy: a hub turns
    thousands of records into dicts per bundle)."""
    return dict(zip(record.FIELDS, record.values(), strict=True))


class Objective(Frozen):
    """What the agent work is for; groups threads."""

    __slots__ = ("created_at", "description", "id", "status", "title")
    FIELDS = ("id", "title", "description", "status", "created_at")
    id: str
    title: str
    description: str
    status: str
    created_at: str

    def __init__(
        self,
        id: str,
        title: str,
        description: str = "",
        status: str = "open",
        created_at: str | None = None,
    ) -> None:
        self.set_fields(
            id, title, description, status, now_iso() if created_at is None else created_at
        )

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


class Thread(Frozen):
    """A line of snapshots (one ref), optionally forked from a snapshot of another thread."""

    __slots__ = ("created_at", "forked_from", "id", "name", "objective_id")
    FIELDS = ("id", "objective_id", "name", "forked_from", "created_at")
    id: str
    objective_id: str
    name: str
    forked_from: str | None
    created_at: str

    def __init__(
        self,
        id: str,
        objective_id: str,
        name: str,
        forked_from: str | None = None,
        created_at: str | None = None,
    ) -> None:
        self.set_fields(
            id, objective_id, name, forked_from, now_iso() if created_at is None else created_at
        )

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


class AgentRun(Frozen):
    """One execution of an agent on a thread, from a base snapshot to a result snapshot."""

    __slots__ = (
        "agent",
        "base_snapshot",
        "environment",
        "exit_code",
        "finished_at",
        "id",
        "manual",
        "reason",
        "result_snapshot",
        "started_at",
        "status",
        "thread_id",
    )
    FIELDS = (
        "id",
        "thread_id",
        "agent",
        "environment",
        "base_snapshot",
        "result_snapshot",
        "status",
        "exit_code",
        "started_at",
        "finished_at",
        "manual",
        "reason",
    )
    id: str
    thread_id: str
    agent: str
    environment: str
    base_snapshot: str | None
    result_snapshot: str | None
    status: str
    exit_code: int | None
    started_at: str
    finished_at: str | None
    manual: bool
    """Started without a command (``run start --manual``): it waits for ``run finish``."""
    reason: str | None
    """Why the run ended as it did, when it was not told (e.g. swept as abandoned)."""

    def __init__(
        self,
        id: str,
        thread_id: str,
        agent: str = "agent",
        environment: str = "local",
        base_snapshot: str | None = None,
        result_snapshot: str | None = None,
        status: str = "running",
        exit_code: int | None = None,
        started_at: str | None = None,
        finished_at: str | None = None,
        manual: bool = False,
        reason: str | None = None,
    ) -> None:
        self.set_fields(
            id,
            thread_id,
            agent,
            environment,
            base_snapshot,
            result_snapshot,
            status,
            exit_code,
            now_iso() if started_at is None else started_at,
            finished_at,
            manual,
            reason,
        )

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


class Snapshot(Frozen):
    """One captured state of a workspace: a commit on its thread's ref."""

    __slots__ = (
        "commit",
        "created_at",
        "id",
        "message",
        "parent",
        "parent_commit",
        "run",
        "skipped",
        "stats",
        "thread",
        "tree",
    )
    FIELDS = (
        "id",
        "commit",
        "tree",
        "thread",
        "run",
        "parent",
        "message",
        "created_at",
        "stats",
        "skipped",
        "parent_commit",
    )
    id: str
    commit: str
    tree: str
    thread: str
    run: str | None
    parent: str | None
    message: str
    created_at: str
    stats: dict[str, int]
    skipped: list[dict[str, Any]]
    parent_commit: str | None

    def __init__(
        self,
        id: str,
        commit: str,
        tree: str,
        thread: str,
        run: str | None,
        parent: str | None,
        message: str,
        created_at: str,
        stats: dict[str, int] | None = None,
        skipped: list[dict[str, Any]] | None = None,
        parent_commit: str | None = None,
    ) -> None:
        self.set_fields(
            id,
            commit,
            tree,
            thread,
            run,
            parent,
            message,
            created_at,
            {} if stats is None else stats,
            [] if skipped is None else skipped,
            parent_commit,
        )

    def to_dict(self) -> dict[str, Any]:
        import copy

        # deep copies of the mutable fields, as ``dataclasses.asdict`` gave them (``skipped``
        # is read from commit trailers: any JSON)
        data = _fields_of(self)
        data["stats"] = copy.deepcopy(self.stats)
        data["skipped"] = copy.deepcopy(self.skipped)
        return data
