"""Narrative Engine core: a shadow-git store of Objective → Thread → Agent Run → Snapshot.

The public names below are loaded lazily (PEP 562) so that ``import narrative.x`` stays cheap
for the CLI's fast paths.
"""

from __future__ import annotations

from .lazy import lazy_exports

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)

if TYPE_CHECKING:
    from .commits import all_snapshots, thread_snapshots
    from .diff import DiffResult, diff_snapshots
    from .errors import NarrativeError
    from .gc import GcReport, RetentionPolicy, collect_garbage
    from .hierarchy import (
        create_objective,
        create_thread,
        finish_run,
        list_objectives,
        list_runs,
        list_threads,
        resolve_thread,
        start_run,
    )
    from .history import resolve_snapshot
    from .merge import Conflict, TreeMerge, merge_trees
    from .merge3 import merge_text
    from .models import AgentRun, Objective, Snapshot, Thread
    from .restore import RestoreResult, materialize, restore_workspace
    from .snapshot import SnapshotResult, take_snapshot
    from .store import Store
    from .workspace_merge import (
        MergeResult,
        abort_merge,
        continue_merge,
        merge_base,
        merge_state,
        merge_workspace,
    )

__all__ = [
    "AgentRun",
    "Conflict",
    "DiffResult",
    "GcReport",
    "MergeResult",
    "NarrativeError",
    "Objective",
    "RestoreResult",
    "RetentionPolicy",
    "Snapshot",
    "SnapshotResult",
    "Store",
    "Thread",
    "TreeMerge",
    "abort_merge",
    "all_snapshots",
    "collect_garbage",
    "continue_merge",
    "create_objective",
    "create_thread",
    "diff_snapshots",
    "finish_run",
    "list_objectives",
    "list_runs",
    "list_threads",
    "materialize",
    "merge_base",
    "merge_state",
    "merge_text",
    "merge_trees",
    "merge_workspace",
    "resolve_snapshot",
    "resolve_thread",
    "restore_workspace",
    "start_run",
    "take_snapshot",
    "thread_snapshots",
]

_HOMES = {
    "DiffResult": "diff", "diff_snapshots": "diff",
    "NarrativeError": "errors",
    "GcReport": "gc", "RetentionPolicy": "gc", "collect_garbage": "gc",
    "create_objective": "hierarchy", "create_thread": "hierarchy", "finish_run": "hierarchy",
    "list_objectives": "hierarchy", "list_runs": "hierarchy", "list_threads": "hierarchy",
    "resolve_thread": "hierarchy", "start_run": "hierarchy",
    "all_snapshots": "commits", "resolve_snapshot": "history", "thread_snapshots": "commits",
    "Conflict": "merge", "TreeMerge": "merge", "merge_trees": "merge", "merge_text": "merge3",
    "AgentRun": "models", "Objective": "models", "Snapshot": "models", "Thread": "models",
    "RestoreResult": "restore", "materialize": "restore", "restore_workspace": "restore",
    "SnapshotResult": "snapshot", "take_snapshot": "snapshot",
    "Store": "store",
    "MergeResult": "workspace_merge", "abort_merge": "workspace_merge",
    "continue_merge": "workspace_merge", "merge_base": "workspace_merge",
    "merge_state": "workspace_merge", "merge_workspace": "workspace_merge",
}  # fmt: skip


__getattr__ = lazy_exports(__name__, _HOMES)
