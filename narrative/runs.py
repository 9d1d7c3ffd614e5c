"""Naming agent runs on the command line, and the two snapshots that bound a run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import AmbiguousId, RunNotFound, RunNotUsable
from .hierarchy import get_run, list_runs
from .history import resolve_snapshot
from .ids import is_id
from .models import AgentRun, Snapshot

if TYPE_CHECKING:
    from .store import Store

__all__ = ["check_deletions", "is_run_ref", "resolve_run", "run_snapshots"]


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


def run_snapshots(
    store: Store, run: AgentRun, *, allow_failed: bool = False
) -> tuple[Snapshot | None, Snapshot]:
    """(base, result) snapshots of a run.

    A run that did not succeed (failed, cancelled, killed, or still going) has no usable
    result unless ``allow_failed``: its result may be partial, or the state of an environment
    that never received the input, and merging it would delete the user's files.

    Raises:
        RunNotUsable: no result, or a result of a run that did not succeed.
    """
    if run.result_snapshot is None:
        raise RunNotUsable(
            run.id, f"run {run.id} has no result snapshot yet (status: {run.status})"
        )
    if run.status != "succeeded" and not allow_failed:
        code = f", exit {run.exit_code}" if run.exit_code is not None else ""
        raise RunNotUsable(
            run.id,
            f"run {run.id} did not succeed ({run.status}{code}): its result is only used with "
            "--allow-failed",
        )
    base = resolve_snapshot(store, run.base_snapshot) if run.base_snapshot else None
    return base, resolve_snapshot(store, run.result_snapshot)


def check_deletions(store: Store, base: Snapshot | None, result: Snapshot, force: bool) -> None:
    """Refuse a result that deletes more than half of its base's files, unless ``force``:
    what an agent that wiped its checkout (or never received it) would look like."""
    if force or base is None:
        return
    from .restore import flatten_tree

    before = flatten_tree(store.odb, bytes.fromhex(base.tree))
    after = flatten_tree(store.odb, bytes.fromhex(result.tree))
    deleted = sum(1 for path in before if path not in after)
    if before and deleted * 2 > len(before):
        raise RunNotUsable(
            result.run or result.id,
            f"the result deletes {deleted} of the {len(before)} files of its base; "
            "merge it with --force if that is what you want",
        )
