"""Naming agent runs on the command line, and the two snapshots that bound a run.

A run's result reaches its thread only through :mod:`narrative.screening` (secrets withheld);
until then it waits under :func:`incoming_ref`. What a merge of a result must pass is
:mod:`narrative.merge_guards`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from .commits import snapshot_at, snapshot_by_id
from .errors import AmbiguousId, RunNotFound, RunNotUsable
from .hierarchy import get_run, list_runs
from .ids import is_id
from .models import AgentRun, Snapshot

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "INCOMING_REF_PREFIX",
    "SECRET_KIND",
    "WITHHELD_REF_PREFIX",
    "incoming_ref",
    "is_run_ref",
    "resolve_run",
    "run_snapshots",
    "withheld_files",
]

#: Where a run's unscreened result is kept (local to this store; see the module docstring).
WITHHELD_REF_PREFIX: Final = "refs/narrative/withheld/"
#: Where a run's result waits to be screened (see the module docstring).
INCOMING_REF_PREFIX: Final = "refs/narrative/incoming/"
#: The ``kind`` of a snapshot's ``skipped`` entry for a file withheld as a secret.
SECRET_KIND: Final = "secret"


def incoming_ref(run_id: str) -> str:
    """The ref a run's result is staged under until :func:`withhold_secrets` records it."""
    return INCOMING_REF_PREFIX + run_id


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
    store: Store, run: AgentRun, *, allow_failed: bool = False, include_secrets: bool = False
) -> tuple[Snapshot | None, Snapshot]:
    """(base, result) snapshots of a run.

    A run that did not succeed (failed, cancelled, killed, or still going) has no usable
    result unless ``allow_failed``: its result may be partial, or the state of an environment
    that never received the input, and merging it would delete the user's files.
    ``include_secrets``: the result as the run left it, with the files
    :func:`withhold_secrets` withheld.

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
    base = snapshot_by_id(store, run.base_snapshot) if run.base_snapshot else None
    raw = store.refs.read(WITHHELD_REF_PREFIX + run.id) if include_secrets else None
    if raw is not None:
        return base, snapshot_at(store, raw)
    return base, snapshot_by_id(store, run.result_snapshot)


def withheld_files(snapshot: Snapshot) -> list[dict[str, Any]]:
    """The files :func:`withhold_secrets` withheld from ``snapshot`` (path and reason)."""
    return [
        {"path": s.get("path"), "reason": s.get("reason")}
        for s in snapshot.skipped
        if s.get("kind") == SECRET_KIND
    ]
