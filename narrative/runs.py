"""Naming agent runs on the command line, and the two snapshots that bound a run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import AmbiguousId, InvalidInput, RunNotFound
from .hierarchy import get_run, list_runs
from .history import resolve_snapshot
from .ids import is_id
from .models import AgentRun, Snapshot

if TYPE_CHECKING:
    from .store import Store

__all__ = ["is_run_ref", "resolve_run", "run_snapshots"]


def is_run_ref(ref: str) -> bool:
    """Whether an argument names a run (run ids and their prefixes start with ``run-``)."""
    return ref.strip().startswith("run-")


def resolve_run(store: Store, ref: str) -> AgentRun:
    """A run by id or unique id prefix."""
    ref = ref.strip()
    if is_id(ref, "run"):
        return get_run(store, ref)
    matches = [r for r in list_runs(store) if r.id.startswith(ref)] if is_run_ref(ref) else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(ref)
    raise AmbiguousId(ref, [r.id for r in matches])


def run_snapshots(store: Store, run: AgentRun) -> tuple[Snapshot | None, Snapshot]:
    """(base, result) snapshots of a run; InvalidInput while it has no result."""
    if run.result_snapshot is None:
        raise InvalidInput(f"run {run.id} has no result snapshot yet (status: {run.status})")
    base = resolve_snapshot(store, run.base_snapshot) if run.base_snapshot else None
    return base, resolve_snapshot(store, run.result_snapshot)
