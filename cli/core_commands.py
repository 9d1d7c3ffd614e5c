"""Store and snapshot commands: init, info, status, snapshot, log, show, diff, restore.

Looking after a store (config, gc, fsck) is :mod:`cli.maintenance_commands`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from narrative.errors import InvalidInput

if TYPE_CHECKING:
    from narrative.models import Snapshot

from .context import complete_refs, open_store
from .output import emit, emit_list, json_option, note

__all__ = ["COMMANDS"]


def _short(snap: dict[str, Any]) -> str:
    msg = snap["message"].splitlines()[0] if snap["message"] else ""
    return f"{snap['id']}  {snap['created_at']}  {snap['commit'][:12]}  {msg}"


@click.command()
@click.argument("path", required=False, type=click.Path(file_okay=False))
@click.option(
    "--adopt",
    is_flag=True,
    help="This copied or moved workspace becomes the workspace of its marker's store.",
)
@click.option(
    "--fork",
    is_flag=True,
    help="Give this copied workspace a store of its own, seeded with the original's history.",
)
@json_option
@click.pass_context
def init(ctx: click.Context, path: str | None, adopt: bool, fork: bool, as_json: bool) -> None:
    """Create the shadow store for the workspace at PATH (default: current directory).

    The store lives in the per-user data directory (or at --store DIR); the workspace only
    gets a small self-ignoring marker, .narrative/, holding its id.
    """
    from narrative.store import Store

    store_dir = ctx.find_root().obj.get("store_dir")
    if adopt and fork:
        raise click.UsageError("use at most one of --adopt, --fork")
    if (adopt or fork) and store_dir:
        raise click.UsageError("--adopt and --fork work on the store a workspace marker names")
    where = path or os.getcwd()
    if adopt:
        store = Store.adopt(where)
        done = "adopted"
    elif fork:
        store = Store.fork(where)
        done = "forked"
    else:
        store = Store.init(where, store_dir)
        done = "initialised"
    data = _info(store)
    emit(
        as_json, "store_info", data, f"{done} narrative store {store.git_dir} for {store.workspace}"
    )


def _info(store: Any) -> dict[str, Any]:
    from narrative.head import describe_head

    return {
        "workspace": store.opened_in or store.config.workspace,
        "workspace_id": store.config.workspace_id,
        "store": store.git_dir,
        "copy_of": store.copy_of,
        "default_objective": store.config.default_objective,
        "default_thread": store.config.default_thread,
        "max_file_size": store.config.max_file_size,
        "max_import_size": store.config.max_import_size,
        "threads": len(store.thread_heads()),
        **describe_head(store),
        "pending_merges": _pending_merges(store),
        "orphaned_checkouts": _orphaned_checkouts(),
    }


def _pending_merges(store: Any) -> dict[str, dict[str, str]] | None:
    """Threads a pull found moved on both sides (None when there are none)."""
    from transfer.pending import pending_merges

    return pending_merges(store) or None


def _orphaned_checkouts() -> list[str] | None:
    """Worktree checkouts whose store was removed (None when there are none, so the human
    output stays quiet)."""
    from narrative.store import orphaned_checkouts

    return orphaned_checkouts() or None


@click.command()
@json_option
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """Where the workspace and its store are, and the defaults in use."""
    data = _info(open_store(ctx))
    emit(
        as_json,
        "store_info",
        data,
        lambda: "\n".join(f"{k}: {v}" for k, v in data.items() if v is not None),
    )


@click.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Where the workspace stands: its thread and snapshot, what changed since, the merge in
    progress, pending merges and running runs. Writes nothing.
    """
    from narrative.status import workspace_status

    store = open_store(ctx)
    data = workspace_status(store).to_dict()
    data["pending_merges"] = _pending_merges(store)
    emit(as_json, "status", data, lambda: _status_text(data))


def _status_text(data: dict[str, Any]) -> str:
    lines = [
        f"on thread {data['thread_name'] or data['thread']} ({data['thread']}), "
        f"at snapshot {data['head'] or '(none yet)'}"
    ]
    if data["next_snapshot"] != data["thread"]:
        lines.append(f"the next snapshot goes to {data['next_snapshot']}")
    changes = data["changes"]
    if changes is None:
        lines.append("nothing snapshotted yet ('narrative snapshot' takes the first)")
    elif changes:
        lines.append(f"changed since {data['head']}:")
        lines += [f"  {c['status']}  {c['path']}" for c in changes]
    else:
        lines.append("nothing changed since that snapshot")
    merge = data["merge"]
    if merge is not None:
        conflicts = merge["conflicts"]
        lines.append(
            f"merging {merge['source']} ({merge['phase']}); {len(conflicts)} conflict(s)"
            + (f": {', '.join(conflicts)}" if conflicts else "")
            + " — 'narrative merge --continue' or '--abort'"
        )
    for thread_id, entry in (data["pending_merges"] or {}).items():
        lines.append(f"pending merge: thread {thread_id} moved on {entry.get('remote')} too")
    for run in data["running_runs"]:
        age = f", {run['age_seconds']}s ago" if run["age_seconds"] is not None else ""
        lines.append(f"running: {run['id']} ({run['agent']} on {run['environment']}{age})")
    lines.append(f"store: {data['store']}")
    return "\n".join(lines)


@click.command()
@click.option("-m", "--message", default="", help="Snapshot message.")
@click.option("--thread", "thread_ref", help="Thread id or name (default: the default thread).")
@click.option("--run", "run_id", help="Agent run this snapshot belongs to.")
@click.option("--allow-empty", is_flag=True, help="Snapshot even if nothing changed.")
@json_option
@click.pass_context
def snapshot(
    ctx: click.Context,
    message: str,
    thread_ref: str | None,
    run_id: str | None,
    allow_empty: bool,
    as_json: bool,
) -> None:
    """Capture the workspace as a new snapshot on a thread."""
    from narrative.snapshot import take_snapshot

    store = open_store(ctx)
    thread_id = None
    if run_id is not None:
        from narrative.hierarchy import get_run

        thread_id = get_run(store, run_id).thread_id
    if thread_ref is not None:
        from narrative.hierarchy import resolve_thread

        resolved = resolve_thread(store, thread_ref).id
        if thread_id is not None and resolved != thread_id:
            raise InvalidInput(f"run {run_id} belongs to thread {thread_id}, not {resolved}")
        thread_id = resolved
    result = take_snapshot(store, thread_id, run_id, message, allow_empty)
    data = {**result.snapshot.to_dict(), "created": result.created, "new_thread": result.new_thread}
    if result.new_thread:
        from narrative.hierarchy import get_thread

        note(
            "the workspace was not at the head of its thread (restored or pulled past it): "
            f"this snapshot starts thread {get_thread(store, result.snapshot.thread).name} "
            f"({result.snapshot.thread})"
        )
    if not result.created:
        note(
            f"nothing changed since snapshot {result.snapshot.id}; no new snapshot "
            "(use --allow-empty to force one)"
        )
    emit(as_json, "snapshot_result", data, result.snapshot.id)


@click.command()
@click.argument("start", metavar="[SNAPSHOT]", required=False, shell_complete=complete_refs)
@click.option("--thread", "thread_ref", help="Only this thread (id or name).")
@click.option("--objective", "objective_ref", help="Every thread of this objective.")
@click.option("--all", "all_threads", is_flag=True, help="Every thread.")
@click.option("-n", "--max-count", type=click.IntRange(min=1), help="At most N snapshots.")
@json_option
@click.pass_context
def log(
    ctx: click.Context,
    start: str | None,
    thread_ref: str | None,
    objective_ref: str | None,
    all_threads: bool,
    max_count: int | None,
    as_json: bool,
) -> None:
    """List snapshots, newest first (default: the default thread).

    SNAPSHOT starts the list there, on its thread: any name ``show`` takes, such as
    ``origin/main`` (the thread as the remote ``origin`` last had it).
    """
    from itertools import islice

    from narrative import hierarchy
    from narrative.commits import all_snapshots, thread_snapshots
    from narrative.history import resolve_snapshot

    if sum(bool(x) for x in (start, thread_ref, objective_ref, all_threads)) > 1:
        raise click.UsageError("use at most one of SNAPSHOT, --thread, --objective, --all")
    store = open_store(ctx)
    # one thread is already newest first: read only the first N of its history
    if start:
        first = resolve_snapshot(store, start)
        head = bytes.fromhex(first.commit)
        snaps = list(islice(thread_snapshots(store, first.thread, head), max_count))
    elif all_threads:
        snaps = list(all_snapshots(store))
    elif objective_ref:
        objective = hierarchy.resolve_objective(store, objective_ref)
        snaps = [
            s
            for t in hierarchy.list_threads(store, objective.id)
            for s in thread_snapshots(store, t.id)
        ]
    else:
        thread_id = hierarchy.resolve_thread(store, thread_ref).id
        snaps = list(islice(thread_snapshots(store, thread_id), max_count))
    if all_threads or objective_ref:
        # Stable: snapshots of one thread keep their chain order within the same second.
        snaps.sort(key=lambda s: s.created_at, reverse=True)
    data = [s.to_dict() for s in snaps[:max_count]]
    emit_list(as_json, "snapshot_list", data, lambda: "\n".join(_short(s) for s in data))


@click.command()
@click.argument("snapshot_ref", shell_complete=complete_refs)
@json_option
@click.pass_context
def show(ctx: click.Context, snapshot_ref: str, as_json: bool) -> None:
    """Show one snapshot (id, unique prefix, thread id for its head, or commit)."""
    from narrative.history import resolve_snapshot

    snap = resolve_snapshot(open_store(ctx), snapshot_ref).to_dict()

    def human() -> str:
        lines = [
            f"snapshot {snap['id']}",
            f"commit   {snap['commit']}",
            f"tree     {snap['tree']}",
            f"thread   {snap['thread']}",
            f"run      {snap['run'] or '-'}",
            f"parent   {snap['parent'] or '-'}",
            f"created  {snap['created_at']}",
            f"stats    {snap['stats']}",
        ]
        lines += [f"skipped  {s.get('path')} ({s.get('reason')})" for s in snap["skipped"]]
        message = str(snap["message"]).replace("\n", "\n    ")
        return "\n".join(lines) + "\n\n    " + message

    emit(as_json, "snapshot", snap, human)


@click.command()
@click.argument("old", metavar="OLD|RUN", shell_complete=complete_refs)
@click.argument("new", required=False, shell_complete=complete_refs)
@click.option("--stat", "mode", flag_value="stat", help="Per-file line counts.")
@click.option("--name-status", "mode", flag_value="name-status", help="Status letter and path.")
@click.option("--patch", "mode", flag_value="patch", help="Unified patch (default).")
@click.option("--allow-failed", is_flag=True, help="Show the result of a run that did not succeed.")
@click.option(
    "--include-secrets",
    is_flag=True,
    help="Show the secret-looking files withheld from a run's result too.",
)
@json_option
@click.pass_context
def diff(
    ctx: click.Context,
    old: str,
    new: str | None,
    mode: str | None,
    allow_failed: bool,
    include_secrets: bool,
    as_json: bool,
) -> None:
    """Changes from snapshot OLD to snapshot NEW (default: the live workspace).

    OLD may be an agent run (id or prefix, ``run-...``) without NEW: what the run changed, from
    its base snapshot to its result snapshot (secret-looking files withheld from the result are
    listed as skipped; --include-secrets shows them).
    """
    from narrative.diff import diff_snapshots
    from narrative.history import resolve_snapshot
    from narrative.runs import is_run_ref, resolve_run, run_snapshots, withheld_files

    from .merge_commands import skipped_lines

    store = open_store(ctx)
    mode = mode or "patch"
    b: Snapshot | None
    skipped: list[dict[str, Any]] | None = None
    if is_run_ref(old) and new is None:
        run = resolve_run(store, old)
        base, result_snap = run_snapshots(
            store, run, allow_failed=allow_failed, include_secrets=include_secrets
        )
        if base is None:
            raise InvalidInput(f"run {run.id} has no base snapshot to diff against")
        a, b = base, result_snap
        skipped = withheld_files(result_snap)
    else:
        a = resolve_snapshot(store, old)
        b = resolve_snapshot(store, new) if new else None
    result = diff_snapshots(
        store, a, b, patch=mode == "patch", counts=mode != "name-status" or as_json
    )

    def human() -> str:
        if mode == "name-status":
            return "\n".join(f"{f.status}\t{f.path}" for f in result.files)
        if mode == "stat":
            width = max((len(f.path) for f in result.files), default=0)
            rows = [
                f" {f.path:<{width}} | "
                + (
                    "Bin"
                    if f.binary
                    else f"{f.insertions + f.deletions} {'+' * min(f.insertions, 40)}"
                    f"{'-' * min(f.deletions, 40)}"
                )
                for f in result.files
            ]
            total = result.to_dict()["totals"]
            rows.append(
                f" {total['files']} files changed, {total['insertions']} insertions(+), "
                f"{total['deletions']} deletions(-)"
            )
            return "\n".join(rows)
        return result.patch or ""

    doc = result.to_dict()
    if skipped is not None:
        doc["skipped"] = skipped
        for line in skipped_lines(skipped):
            note(line)
    emit(as_json, "diff", doc, human)


@click.command()
@click.argument("snapshot_ref", shell_complete=complete_refs)
@click.option("--to", "target", type=click.Path(), help="Materialise into this (empty) directory.")
@click.option(
    "--thread",
    "thread_ref",
    help="Thread for the safety snapshot of what the workspace held (default: restore-backup).",
)
@json_option
@click.pass_context
def restore(
    ctx: click.Context, snapshot_ref: str, target: str | None, thread_ref: str | None, as_json: bool
) -> None:
    """Restore a snapshot into the workspace, or into --to DIR.

    What the workspace held is kept first (a safety snapshot on the restore-backup thread,
    unless it equals the snapshot last restored or taken). No thread moves: the workspace HEAD
    names the restored snapshot, and if that is not its thread's head, the next snapshot starts
    a new thread forked from it.
    """
    from dataclasses import asdict

    from narrative.history import resolve_snapshot
    from narrative.restore import materialize, restore_workspace

    store = open_store(ctx)
    snap = resolve_snapshot(store, snapshot_ref)
    merge = None
    if target is not None:
        result = materialize(store, snap, target)
    else:
        from narrative.hierarchy import resolve_thread

        thread_id = resolve_thread(store, thread_ref).id if thread_ref else None
        result = restore_workspace(store, snap, thread_id)
        note(
            f"what the workspace held is snapshot {result.safety_snapshot} "
            f"(undo with: narrative restore {result.safety_snapshot})"
        )
        from transfer.pending import merge_pending

        merge = merge_pending(store)  # this thread moved on both sides at the last pull
    data = asdict(result)
    human = (
        f"restored {snap.id} into {result.target}: {result.written} written, "
        f"{result.deleted} deleted"
    )
    if merge is not None:
        from .merge_commands import merge_summary

        data["pending_merge"] = merge.to_dict()
        human += "\nthis thread had a pending merge: " + merge_summary(merge.to_dict())
    emit(as_json, "restore", data, human)
    if merge is not None and merge.conflicts:
        ctx.exit(1)


@click.command()
@click.option(
    "--background", is_flag=True, help="Detach; print the watcher's pid once it is ready."
)
@click.option("--stop", is_flag=True, help="Stop the workspace's running watcher.")
@click.pass_context
def watch(ctx: click.Context, background: bool, stop: bool) -> None:
    """Watch the workspace (inotify) so snapshots list only what changed.

    Optional: without a watcher, or whenever its journal may be incomplete, a snapshot scans
    the whole workspace. Runs in the foreground until interrupted, unless --background.
    """
    import signal

    from narrative import watch as watcher

    store = open_store(ctx)
    workspace = store.workspace
    if stop:
        pid = watcher.watcher_pid(store.git_dir, workspace)
        if pid is None:
            raise InvalidInput("no watcher is running for this workspace")
        os.kill(pid, signal.SIGTERM)
        return
    if watcher.watcher_running(store.git_dir, workspace):
        raise InvalidInput("a watcher is already running for this workspace")
    if not background:
        watcher.run_watcher(store.git_dir, workspace, lambda gen: note(f"watching {workspace}"))
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the detached watcher
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        code = 0
        try:
            watcher.run_watcher(store.git_dir, workspace)
        except BaseException:
            code = 1
        os._exit(code)
    if watcher.wait_ready(store.git_dir, workspace, pid, timeout=120.0) is None:
        raise InvalidInput("the watcher did not start (see `narrative watch` in the foreground)")
    click.echo(pid)


COMMANDS = [init, info, status, snapshot, log, show, diff, restore, watch]
