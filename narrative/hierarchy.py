"""Objectives, threads and agent runs: creating, finding and updating their records."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import (
    AmbiguousId,
    InvalidInput,
    NotFound,
    ObjectiveNotFound,
    RunNotFound,
    ThreadNotFound,
)
from .ids import is_id, new_id
from .models import (
    OBJECTIVE_STATUSES,
    RUN_STATUSES,
    AgentRun,
    Objective,
    Snapshot,
    Thread,
    now_iso,
)

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
    "reset_thread",
    "resolve_objective",
    "prefer_current_thread",
    "resolve_thread",
    "run_age",
    "set_objective_status",
    "sweep_abandoned_runs",
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


def _record(
    store: Store, collection: str, kind: str, ident: str, missing: type[NotFound]
) -> dict[str, Any]:
    record = store.meta.get(collection, ident) if is_id(ident, kind) else None
    if record is None:
        raise missing(ident)
    return record


_Named = TypeVar("_Named", Objective, Thread)


def _pick(
    ref: str, items: list[_Named], id_prefix: str, label: str, missing: type[NotFound]
) -> _Named:
    """One item by unique id prefix, else by exact name or title."""
    matches = [i for i in items if i.id.startswith(ref)] if ref.startswith(id_prefix) else []
    matches = matches or [i for i in items if getattr(i, label) == ref]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise missing(ref)
    raise AmbiguousId(ref, [i.id for i in matches])


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
    return Objective.from_dict(
        _record(store, "objectives", "objective", objective_id, ObjectiveNotFound)
    )


def list_objectives(store: Store) -> list[Objective]:
    objectives = store.meta.decoded("objectives", Objective.from_dict)
    return sorted(objectives, key=lambda o: (o.created_at, o.id))


def resolve_objective(store: Store, ref: str) -> Objective:
    """An objective by id, unique id prefix or exact title."""
    if is_id(ref, "objective"):
        return get_objective(store, ref)
    return _pick(ref, list_objectives(store), "obj-", "title", ObjectiveNotFound)


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
    return Thread.from_dict(_record(store, "threads", "thread", thread_id, ThreadNotFound))


def list_threads(store: Store, objective_id: str | None = None) -> list[Thread]:
    threads = store.meta.decoded("threads", Thread.from_dict)
    threads.sort(key=lambda t: (t.created_at, t.id))
    return [t for t in threads if objective_id is None or t.objective_id == objective_id]


def resolve_thread(store: Store, ref: str | None) -> Thread:
    """A thread by id, unique id prefix or name (None: the store's default thread)."""
    if ref is None:
        return get_thread(store, store.config.default_thread)
    if is_id(ref, "thread"):
        return get_thread(store, ref)
    threads = list_threads(store)
    named = prefer_current_thread(store, [t.id for t in threads if t.name == ref])
    if len(named) == 1:
        return get_thread(store, named[0])
    return _pick(ref, threads, "th-", "name", ThreadNotFound)


def prefer_current_thread(store: Store, thread_ids: list[str]) -> list[str]:
    """Of several threads sharing a name (a pulled one beside the store's own), the
    workspace's current one when it is among them: every name lookup decides the same way."""
    if len(thread_ids) > 1 and store.config.default_thread in thread_ids:
        return [store.config.default_thread]
    return thread_ids


def reset_thread(
    store: Store, thread_id: str, snapshot: Snapshot, force: bool = False
) -> bytes | None:
    """Move thread ``thread_id``'s head to ``snapshot`` (one of its own snapshots); returns
    the head it had.

    Only a move forward (to a descendant) unless ``force``; a forced move leaves the old head
    in the thread's head log, as ``<thread>@{1}``, so it can be reset back.

    Raises:
        NonFastForward: ``snapshot`` does not descend from the head, and not ``force``.
        InvalidInput: ``snapshot`` belongs to another thread.
    """
    if snapshot.thread != thread_id:
        raise InvalidInput(
            f"snapshot {snapshot.id} belongs to thread {snapshot.thread}, not {thread_id}: "
            "a thread can only be reset to one of its own snapshots"
        )
    ref = store.thread_ref(thread_id)
    with store.lock("gc", shared=True):  # gc must not be rewriting the commits in question
        old = store.refs.read(ref)
        reason = f"reset to {snapshot.id}{' (forced)' if force else ''}"
        store.refs.update(
            ref, bytes.fromhex(snapshot.commit), expected=old, force=force, reason=reason
        )
    return old


# -- runs ---------------------------------------------------------------------------------------


def start_run(
    store: Store,
    thread_id: str,
    agent: str = "agent",
    environment: str = "local",
    base_snapshot: str | None = None,
    *,
    manual: bool = False,
) -> AgentRun:
    """Record a run starting on ``thread_id``; ``manual``: no command runs it, the caller
    ends it with :func:`finish_run` (else :func:`sweep_abandoned_runs` does)."""
    get_thread(store, thread_id)
    if not agent.strip() or not environment.strip():
        raise InvalidInput("agent and environment names must not be empty")
    run = AgentRun(
        id=new_id("run"),
        thread_id=thread_id,
        agent=agent,
        environment=environment,
        base_snapshot=base_snapshot,
        manual=manual,
    )
    store.meta.update("runs", run.id, lambda _cur: run.to_dict(), f"run {run.id}: start")
    return run


def get_run(store: Store, run_id: str) -> AgentRun:
    return AgentRun.from_dict(_record(store, "runs", "run", run_id, RunNotFound))


def list_runs(store: Store, thread_id: str | None = None) -> list[AgentRun]:
    runs = store.meta.decoded("runs", AgentRun.from_dict)
    runs.sort(key=lambda r: (r.started_at, r.id))
    return [r for r in runs if thread_id is None or r.thread_id == thread_id]


def finish_run(
    store: Store,
    run_id: str,
    status: str,
    exit_code: int | None = None,
    result_snapshot: str | None = None,
    reason: str | None = None,
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
            **({"reason": reason} if reason else {}),
        }

    record = store.meta.update("runs", run_id, change, f"run {run_id}: {status}")
    return AgentRun.from_dict(record or {})


def run_age(run: AgentRun, now: float | None = None) -> float | None:
    """Seconds since ``run`` started (None when its start time is unreadable)."""
    try:
        started = datetime.fromisoformat(run.started_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (time.time() if now is None else now) - started.timestamp())


def sweep_abandoned_runs(store: Store, now: float | None = None) -> list[AgentRun]:
    """Manual runs still running after ``config manual_run_timeout`` seconds are recorded as
    cancelled (reason: abandoned); returns them. A run finished meanwhile is left alone."""
    limit = store.config.manual_run_timeout
    swept = []
    for run in list_runs(store):
        age = run_age(run, now)
        if run.manual and run.status == "running" and age is not None and age > limit:
            reason = f"abandoned: no 'narrative run finish' within {int(limit)}s"
            with contextlib.suppress(InvalidInput):  # finished by someone else just now
                swept.append(finish_run(store, run.id, "cancelled", reason=reason))
    return swept
