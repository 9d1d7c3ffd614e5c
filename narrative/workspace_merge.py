"""Merging a run's result (or any snapshot) into the live workspace, without losing work.

The three trees:

* **ours** — the workspace, snapshotted first (the *pre-merge snapshot*), so whatever the merge
  does can be undone;
* **theirs** — the run's result snapshot, or the snapshot named;
* **base** — for a run, its base snapshot. For a plain snapshot (or a run without a base), the
  merge base of theirs and the pre-merge snapshot: the nearest commit that both reach through
  parents, where a merge result also reaches the snapshot it merged (its ``Merged-From``
  trailer), so merging the same line of work twice does not re-conflict. No common ancestor
  means a two-way merge (every path both sides hold is an add/add).

Order of work, which is what makes ``kill -9`` at any point recoverable: pre-merge snapshot →
merged objects published → merge state written (``narrative/merge-state.json``, atomically) →
workspace changed path by path (only paths the merge changes, each re-checked against the
pre-merge snapshot's stat key just before it is touched) → merge snapshot → state removed.
While the state exists another merge is refused; ``abort_merge`` restores the pre-merge
snapshot (after a safety snapshot of whatever is there), ``continue_merge`` records the result.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .commitmsg import is_snapshot_commit, merged_from
from .commits import all_snapshots, read_commit, snapshot_at
from .errors import (
    MergeError,
    MergeInProgress,
    NoMergeInProgress,
    StoreCorrupted,
)
from .fsutil import unlink_quiet, write_atomic
from .head import read_head
from .history import resolve_snapshot
from .jsonio import load_json
from .merge import Conflict, Strategy, merge_trees
from .merge_guards import check_merge
from .models import AgentRun, Snapshot, now_iso
from .objects import MODE_LINK, hash_object
from .odb import PackWriter
from .restore import (
    WORKSPACE_LOCK,
    RestoreResult,
    apply_changes,
    check_changes,
    restore_workspace,
)
from .runs import is_run_ref, resolve_run, run_snapshots, withheld_files
from .snapshot import take_snapshot
from .store import Store
from .trees import flatten_tree

__all__ = [
    "MergeResult",
    "MergeState",
    "abort_merge",
    "continue_merge",
    "merge_base",
    "merge_state",
    "merge_workspace",
]

_STATE = os.path.join("narrative", "merge-state.json")
_MARKER = b"<<<<<<< ours\n"


@dataclass
class MergeState:
    """A merge that changed the workspace and was not finished yet (persisted as JSON)."""

    source: str
    theirs: str
    base: str | None
    pre_merge: str
    thread: str
    tree: str
    run: str | None = None
    strategy: str | None = None
    phase: str = "applying"
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    started_at: str = field(default_factory=now_iso)
    theirs_commit: str = ""
    """The commit merged, fixed when the merge starts: a name like ``origin/main`` may move
    (a fetch) before ``--continue``, and the second parent must be what was merged."""

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, **self.__dict__}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> MergeState:
        try:
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            state = cls(**fields)
        except (TypeError, KeyError) as exc:
            raise StoreCorrupted(f"unreadable merge state {path}: {exc}") from exc
        if not all(isinstance(getattr(state, k), str) for k in ("source", "theirs", "pre_merge")):
            raise StoreCorrupted(f"unreadable merge state {path}")
        return state


@dataclass
class MergeResult:
    """What a merge did to the workspace."""

    source: str
    theirs: str
    base: str | None
    pre_merge: str
    tree: str
    run: str | None = None
    strategy: str | None = None
    conflicts: list[Conflict] = field(default_factory=list)
    resolved: list[Conflict] = field(default_factory=list)
    renames: list[tuple[str, str, str]] = field(default_factory=list)
    written: int = 0
    deleted: int = 0
    snapshot: str | None = None
    up_to_date: bool = False
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Files of theirs left out: secret-looking files withheld from a run's result."""

    @property
    def clean(self) -> bool:
        return not self.conflicts

    @property
    def in_progress(self) -> bool:
        """The merge state was left for ``--continue``/``--abort``."""
        return self.snapshot is None and not self.up_to_date

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "run": self.run,
            "base": self.base,
            "theirs": self.theirs,
            "pre_merge": self.pre_merge,
            "tree": self.tree,
            "strategy": self.strategy,
            "clean": self.clean,
            "up_to_date": self.up_to_date,
            "in_progress": self.in_progress,
            "snapshot": self.snapshot,
            "written": self.written,
            "deleted": self.deleted,
            "conflicts": [c.to_dict() for c in self.conflicts],
            "resolved": [c.to_dict() for c in self.resolved],
            "renames": [{"side": s, "from": a, "to": b} for s, a, b in self.renames],
            "skipped": self.skipped,
        }


def _state_path(store: Store) -> str:
    return os.path.join(store.git_dir, _STATE)


def merge_state(store: Store) -> MergeState | None:
    """The merge in progress, if any."""
    path = _state_path(store)
    try:
        with open(path, "rb") as f:
            data = load_json(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreCorrupted(f"unreadable merge state {path}: {exc}") from exc
    return MergeState.from_dict(data, path)


def _save_state(store: Store, state: MergeState) -> None:
    write_atomic(_state_path(store), json.dumps(state.to_dict(), indent=2).encode() + b"\n")


def _parents(store: Store, oid: bytes, index: dict[str, bytes] | None) -> tuple[list[bytes], Any]:
    commit = read_commit(store, oid)
    parents = list(commit.parents)
    sources = merged_from(commit) if is_snapshot_commit(commit) else []
    if sources:
        if index is None:
            index = {s.id: bytes.fromhex(s.commit) for s in all_snapshots(store)}
        parents += [index[s] for s in sources if s in index]
    return parents, index


def _ancestry(store: Store, start: bytes) -> Iterator[bytes]:
    """``start`` and its ancestors, nearest first (parents and Merged-From sources)."""
    seen = {start}
    queue = deque([start])
    index: dict[str, bytes] | None = None
    while queue:
        oid = queue.popleft()
        yield oid
        parents, index = _parents(store, oid, index)
        for parent in parents:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)


def merge_base(store: Store, a: bytes, b: bytes) -> bytes | None:
    """The commit nearest to ``b`` that ``a`` also reaches, or None when unrelated."""
    reach = set(_ancestry(store, a))
    return next((oid for oid in _ancestry(store, b) if oid in reach), None)


def _sources(
    store: Store,
    ref: str,
    ours: bytes | None,
    allow_failed: bool = False,
    include_secrets: bool = False,
) -> tuple[Snapshot | None, Snapshot, AgentRun | None]:
    """(base, theirs, run) for the RUN|SNAPSHOT argument, merged into commit ``ours``."""
    if is_run_ref(ref):
        run = resolve_run(store, ref)
        base, theirs = run_snapshots(
            store, run, allow_failed=allow_failed, include_secrets=include_secrets
        )
        if base is not None:
            return base, theirs, run
        run_or_none: AgentRun | None = run
    else:
        theirs, run_or_none = resolve_snapshot(store, ref), None
    found = merge_base(store, bytes.fromhex(theirs.commit), ours) if ours is not None else None
    return (snapshot_at(store, found) if found is not None else None), theirs, run_or_none


def merge_workspace(
    store: Store,
    ref: str,
    strategy: Strategy | None = None,
    commit: bool = True,
    thread_id: str | None = None,
    *,
    allow_failed: bool = False,
    force: bool = False,
    include_secrets: bool = False,
) -> MergeResult:
    """Merge run ``ref``'s result (or snapshot ``ref``) into the workspace.

    Args:
        store: the workspace's store.
        ref: a run id or prefix (``run-...``), or anything :func:`resolve_snapshot` accepts.
        strategy: settle conflicts in favour of ``ours`` or ``theirs`` (per hunk for text).
        commit: record a clean merge as a snapshot (with a ``Narrative-Merged-From`` trailer);
            False leaves it in progress for :func:`continue_merge` or :func:`abort_merge`.
        thread_id: thread of the pre-merge and merge snapshots (default: where the workspace's
            next snapshot goes, see :func:`take_snapshot`).
        allow_failed: merge the result of a run that did not succeed.
        force: merge even a failed run's result that deletes most of its base's files, or a
            result or snapshot that changes protected files (:func:`narrative.runs.check_merge`).
        include_secrets: merge a run's result with the secret-looking files withheld from it
            (:func:`narrative.runs.withhold_secrets`); without, they are listed as skipped.

    Conflicts are written into the workspace (text with markers, binary as ours) and leave the
    merge in progress. Bad input raises before anything is written.
    """
    with store.lock("merge", timeout=5.0), store.lock(WORKSPACE_LOCK, timeout=60.0):
        state = merge_state(store)
        if state is not None:
            raise MergeInProgress(state.source)
        # Resolve and check what can be before snapshotting, so a refusal writes nothing
        # (the workspace HEAD stands in for the pre-merge snapshot it will be the parent of).
        head = read_head(store)
        first = _sources(store, ref, head, allow_failed, include_secrets)
        check_merge(
            store,
            first[0],
            first[1],
            bytes.fromhex(snapshot_at(store, head).tree) if head is not None else None,
            force=force,
            deletions=first[2] is not None and first[2].status != "succeeded",
        )
        pre = take_snapshot(
            store, thread_id, message=f"pre-merge snapshot before merging {ref}", sweep_tmp=True
        )
        ours = pre.snapshot
        thread_id = ours.thread
        base, theirs, source_run = _sources(
            store, ref, bytes.fromhex(ours.commit), allow_failed, include_secrets
        )
        run_id = source_run.id if source_run is not None else None
        # what the merge records as merged (its second parent, Merged-From): a run's result as
        # the run's thread holds it, also when its withheld files were merged too: the
        # unscreened result stays off every thread
        merged_id = theirs.id
        if source_run is not None and source_run.result_snapshot is not None:
            merged_id = source_run.result_snapshot
        with store.lock("gc", shared=True):
            writer = PackWriter(store.odb)
            try:
                merged = merge_trees(
                    store.odb,
                    bytes.fromhex(base.tree) if base is not None else None,
                    bytes.fromhex(ours.tree),
                    bytes.fromhex(theirs.tree),
                    writer,
                    strategy,
                )
                writer.publish()
            except BaseException:
                writer.abort()
                raise
            result = MergeResult(
                ref,
                merged_id,
                base.id if base is not None else None,
                ours.id,
                merged.tree.hex(),
                run_id,
                strategy,
                merged.conflicts,
                merged.resolved,
                merged.renames,
                skipped=withheld_files(theirs),
            )
            if not merged.edits:
                result.up_to_date = True
                return result
            current = flatten_tree(store.odb, bytes.fromhex(ours.tree))
            writes = [(p, e[0], e[1]) for p, e in sorted(merged.edits.items()) if e is not None]
            removed = [p for p, e in merged.edits.items() if e is None and p in current]
            check_changes(store, current, writes)  # refusals come before any state or write
            state = MergeState(
                ref, merged_id, result.base, ours.id, thread_id, result.tree, run_id, strategy
            )
            state.conflicts = [c.to_dict() for c in merged.conflicts]
            state.theirs_commit = theirs.commit
            _save_state(store, state)
            try:
                apply_changes(store, current, pre.cache.file_keys(), writes, removed)
            except Exception as exc:
                raise MergeError(
                    f"{exc}; the workspace may be partly merged: 'narrative merge --abort' "
                    f"returns it to the pre-merge snapshot {ours.id}"
                ) from exc
            result.written, result.deleted = len(writes), len(removed)
            state.phase = "applied"
            _save_state(store, state)
        if commit and merged.clean:
            result.snapshot = _record(store, state)
        return result


def _record(store: Store, state: MergeState) -> str:
    # theirs becomes a second parent unless the thread already holds it: the merge is then a
    # real two-parent commit, and a push of the thread fast-forwards the side merged in
    if state.theirs_commit:
        theirs = bytes.fromhex(state.theirs_commit)
    else:  # a merge state written before theirs_commit was kept
        theirs = bytes.fromhex(resolve_snapshot(store, state.theirs).commit)
    head = store.refs.read(store.thread_ref(state.thread))
    held = head is not None and merge_base(store, theirs, head) == theirs
    snap = take_snapshot(
        store,
        state.thread,
        message=f"merge {state.source}",
        allow_empty=True,
        trailers={"Merged-From": state.theirs},
        merge_parents=() if held else (theirs,),
    )
    unlink_quiet(_state_path(store))
    return snap.snapshot.id


def continue_merge(store: Store) -> str:
    """Record the (resolved) workspace as the merge snapshot; returns its id.

    Refused while a file the merge wrote with conflict markers still starts a marker line.
    """
    with store.lock("merge", timeout=5.0):
        state = merge_state(store)
        if state is None:
            raise NoMergeInProgress()
        if state.phase != "applied":
            raise MergeError(
                "the merge was interrupted while changing the workspace; "
                "undo it with 'narrative merge --abort' and merge again"
            )
        unresolved = [c["path"] for c in state.conflicts if c.get("markers") and _marked(store, c)]
        if unresolved:
            raise MergeError(
                f"{len(unresolved)} file(s) still hold conflict markers ({unresolved[0]}); "
                "resolve them first, or 'narrative merge --abort'"
            )
        return _record(store, state)


def _marked(store: Store, conflict: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(store.workspace, str(conflict["path"])), "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False
    return data.startswith(_MARKER) or b"\n" + _MARKER in data


def abort_merge(store: Store) -> RestoreResult:
    """Return the workspace to the pre-merge snapshot (after a safety snapshot of its state)."""
    with store.lock("merge", timeout=5.0):
        state = merge_state(store)
        if state is None:
            raise NoMergeInProgress()
        pre = resolve_snapshot(store, state.pre_merge)
        result = restore_workspace(store, pre, state.thread)
        _drop_unsnapshotted_writes(store, pre, bytes.fromhex(state.tree))
        unlink_quiet(_state_path(store))
        return result


def _drop_unsnapshotted_writes(store: Store, pre: Snapshot, merged_tree: bytes) -> None:
    """Remove files the merge added that no snapshot sees (ignored paths), but only while they
    still hold exactly what the merge wrote: then the merged tree keeps them, nothing is lost."""
    before = flatten_tree(store.odb, bytes.fromhex(pre.tree))
    for path, (mode, oid) in flatten_tree(store.odb, merged_tree).items():
        if path in before:
            continue
        full = os.path.join(store.workspace, path)
        try:
            if mode == MODE_LINK:
                data = os.fsencode(os.readlink(full))
            else:
                with open(full, "rb", opener=_no_follow) as f:
                    data = f.read()
        except OSError:
            continue
        if hash_object("blob", data) == oid:
            unlink_quiet(full)
            parent = os.path.dirname(path)
            while parent:  # empty directories it left behind, never the workspace itself
                try:
                    os.rmdir(os.path.join(store.workspace, parent))
                except OSError:
                    break
                parent = os.path.dirname(parent)


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)
