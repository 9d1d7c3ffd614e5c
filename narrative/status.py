"""``narrative status``: where the workspace stands, read without writing anything.

Which thread and snapshot the workspace is on (its HEAD, :mod:`narrative.head`), where the
next snapshot goes, what changed since the HEAD snapshot (the files a ``snapshot`` would
capture), the merge in progress and the runs still running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .commits import snapshot_at
from .diff import diff_snapshots
from .errors import ThreadNotFound
from .head import describe_head, read_head
from .hierarchy import get_thread, list_runs, run_age
from .store import Store
from .workspace_merge import merge_state

__all__ = ["WorkspaceStatus", "workspace_status"]


@dataclass
class WorkspaceStatus:
    """What :func:`workspace_status` found (``to_dict`` is the ``--json`` form)."""

    workspace: str
    store: str
    thread: str
    thread_name: str
    head: str | None
    next_snapshot: str | None
    changes: list[dict[str, str]] | None
    """``{"status": "A"|"M"|"D"|..., "path"}`` since ``head``; None before the first snapshot."""
    merge: dict[str, Any] | None = None
    running_runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "status", **self.__dict__}


def workspace_status(store: Store) -> WorkspaceStatus:
    """The workspace's position, its unsnapshotted changes, open merge and running runs."""
    where = describe_head(store)
    thread_id = store.config.default_thread
    try:
        thread_name = get_thread(store, thread_id).name
    except ThreadNotFound:
        thread_name = ""
    head = read_head(store) or store.refs.read(store.thread_ref(thread_id))
    head_snapshot = snapshot_at(store, head) if head is not None else None
    changes = None
    if head_snapshot is not None:
        diff = diff_snapshots(store, head_snapshot, None, counts=False)
        changes = [{"status": f.status, "path": f.path} for f in diff.files]
    state = merge_state(store)
    merge = None
    if state is not None:
        merge = {
            "source": state.source,
            "theirs": state.theirs,
            "phase": state.phase,
            "conflicts": [c.get("path") for c in state.conflicts],
            "pre_merge": state.pre_merge,
        }
    now = time.time()
    running = [
        {
            "id": run.id,
            "thread": run.thread_id,
            "agent": run.agent,
            "environment": run.environment,
            "started_at": run.started_at,
            "age_seconds": int(age) if (age := run_age(run, now)) is not None else None,
        }
        for run in list_runs(store)
        if run.status == "running"
    ]
    return WorkspaceStatus(
        workspace=store.opened_in or store.config.workspace,
        store=store.git_dir,
        thread=thread_id,
        thread_name=thread_name,
        head=head_snapshot.id if head_snapshot is not None else None,
        next_snapshot=where["next_snapshot"],
        changes=changes,
        merge=merge,
        running_runs=running,
    )
