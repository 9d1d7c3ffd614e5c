"""Objectives, threads and agent runs: creating, finding and updating their records."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput, ObjectiveNotFound, RunNotFound, ThreadNotFound
from .ids import is_id, new_id
from .models import OBJECTIVE_STATUSES, RUN_STATUSES, AgentRun, Objective, Thread, now_iso

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "create_defaults",
    "create_objective",
    "create_thread",
    "finish_run",
    "get_objective",
    "get_run",
    "get_thread",
    "list_objectives",
    "list_runs",
    "list_threads",
    "resolve_objective",
    "resolve_thread",
    "set_objective_status",
    "start_run",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name) or ".." in name:
        raise InvalidInput(
            f"invalid name {name!r}: use letters, digits, '.', '_', '-' or '/' (max 100)"
        )
    return name


def create_defaults(store: Store) -> tuple[str, str]:
    """The objective and thread a bare ``narrative snapshot`` uses."""
    objective = create_objective(store, "default", "Snapshots taken without an objective")
    thread = create_thread(store, objective.id, "main")
    return objective.id, thread.id


# -- objectives ---------------------------------------------------------------------------------


def create_objective(store: Store, title: str, description: str = "") -> Objective:
    if not title.strip():
        raise InvalidInput("an objective needs a title")
    objective = Objective(id=new_id("objective"), title=title.strip(), description=description)
    store.meta.update(
        "objectives",
        objective.id,
        lambda _cur: objective.to_dict(),
        f"objective {objective.id}: create",
    )
    return objective


def get_objective(store: Store, objective_id: str) -> Objective:
    record = (
        store.meta.get("objectives", objective_id) if is_id(objective_id, "objective") else None
    )
    if record is None:
        raise ObjectiveNotFound(objective_id)
    return Objective.from_dict(record)


def list_objectives(store: Store) -> list[Objective]:
    objectives = [Objective.from_dict(r) for r in store.meta.all("objectives")]
    return sorted(objectives, key=lambda o: (o.created_at, o.id))


def resolve_objective(store: Store, ref: str) -> Objective:
    """An objective by id, unique id prefix or exact title."""
    if is_id(ref, "objective"):
        return get_objective(store, ref)
    objectives = list_objectives(store)
    matches = [o for o in objectives if o.id.startswith(ref)] if ref.startswith("obj-") else []
    matches = matches or [o for o in objectives if o.title == ref]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ObjectiveNotFound(ref)
    from .errors import AmbiguousId

    raise AmbiguousId(ref, [o.id for o in matches])


def set_objective_status(store: Store, objective_id: str, status: str) -> Objective:
    if status not in OBJECTIVE_STATUSES:
        raise InvalidInput(f"objective status must be one of {', '.join(OBJECTIVE_STATUSES)}")

    def change(cur: dict[str, Any] | None) -> dict[str, Any]:
        if cur is None:
            raise ObjectiveNotFound(objective_id)
        return {**cur, "status": status}

    return Objective.from_dict(
        store.meta.update("objectives", objective_id, change, f"objective {objective_id}: {status}")
        or {}
    )


# -- threads ------------------------------------------------------------------------------------


def create_thread(
    store: Store, objective_id: str, name: str, forked_from: str | None = None
) -> Thread:
    """A new thread; ``forked_from`` (a snapshot id) becomes the parent of its first snapshot."""
    get_objective(store, objective_id)
    _check_name(name)
    if any(t.name == name for t in list_threads(store, objective_id)):
        raise InvalidInput(f"objective {objective_id} already has a thread named {name!r}")
    thread = Thread(
        id=new_id("thread"), objective_id=objective_id, name=name, forked_from=forked_from
    )
    store.meta.update(
        "threads", thread.id, lambda _cur: thread.to_dict(), f"thread {thread.id}: create"
    )
    return thread


def get_thread(store: Store, thread_id: str) -> Thread:
    record = store.meta.get("threads", thread_id) if is_id(thread_id, "thread") else None
    if record is None:
        raise ThreadNotFound(thread_id)
    return Thread.from_dict(record)


def list_threads(store: Store, objective_id: str | None = None) -> list[Thread]:
    threads = [Thread.from_dict(r) for r in store.meta.all("threads")]
    threads.sort(key=lambda t: (t.created_at, t.id))
    return [t for t in threads if objective_id is None or t.objective_id == objective_id]


def resolve_thread(store: Store, ref: str | None) -> Thread:
    """A thread by id, unique id prefix or name (None: the store's default thread)."""
    if ref is None:
        return get_thread(store, store.config.default_thread)
    if is_id(ref, "thread"):
        return get_thread(store, ref)
    threads = list_threads(store)
    matches = [t for t in threads if t.id.startswith(ref)] if ref.startswith("th-") else []
    matches = matches or [t for t in threads if t.name == ref]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ThreadNotFound(ref)
    from .errors import AmbiguousId

    raise AmbiguousId(ref, [t.id for t in matches])


# -- runs ---------------------------------------------------------------------------------------


def start_run(
    store: Store,
    thread_id: str,
    agent: str = "agent",
    environment: str = "local",
    base_snapshot: str | None = None,
) -> AgentRun:
    get_thread(store, thread_id)
    if not agent.strip() or not environment.strip():
        raise InvalidInput("agent and environment names must not be empty")
    run = AgentRun(
        id=new_id("run"),
        thread_id=thread_id,
        agent=agent,
        environment=environment,
        base_snapshot=base_snapshot,
    )
    store.meta.update("runs", run.id, lambda _cur: run.to_dict(), f"run {run.id}: start")
    return run


def get_run(store: Store, run_id: str) -> AgentRun:
    record = store.meta.get("runs", run_id) if is_id(run_id, "run") else None
    if record is None:
        raise RunNotFound(run_id)
    return AgentRun.from_dict(record)


def list_runs(store: Store, thread_id: str | None = None) -> list[AgentRun]:
    runs = [AgentRun.from_dict(r) for r in store.meta.all("runs")]
    runs.sort(key=lambda r: (r.started_at, r.id))
    return [r for r in runs if thread_id is None or r.thread_id == thread_id]


def finish_run(
    store: Store,
    run_id: str,
    status: str,
    exit_code: int | None = None,
    result_snapshot: str | None = None,
) -> AgentRun:
    """Record the end of a run; a run that already finished is refused."""
    if status not in RUN_STATUSES or status == "running":
        raise InvalidInput(f"final status must be one of {', '.join(RUN_STATUSES[1:])}")

    def change(cur: dict[str, Any] | None) -> dict[str, Any]:
        if cur is None:
            raise RunNotFound(run_id)
        if cur.get("status") != "running":
            raise InvalidInput(f"run {run_id} already finished ({cur.get('status')})")
        return {
            **cur,
            "status": status,
            "exit_code": exit_code,
            "result_snapshot": result_snapshot,
            "finished_at": now_iso(),
        }

    record = store.meta.update("runs", run_id, change, f"run {run_id}: {status}")
    return AgentRun.from_dict(record or {})
