"""``narrative objective ...`` and ``narrative thread ...``."""

from __future__ import annotations

import click

from .context import open_store
from .output import emit, emit_list, json_option, table

__all__ = ["COMMANDS"]


@click.group()
def objective() -> None:
    """Create and inspect objectives."""


@objective.command("create")
@click.argument("title")
@click.option("-d", "--description", default="", help="Longer description.")
@json_option
@click.pass_context
def objective_create(ctx: click.Context, title: str, description: str, as_json: bool) -> None:
    """Create an objective."""
    from narrative.hierarchy import create_objective

    obj = create_objective(open_store(ctx), title, description)
    emit(as_json, "objective", obj.to_dict(), obj.id)


@objective.command("list")
@json_option
@click.pass_context
def objective_list(ctx: click.Context, as_json: bool) -> None:
    """List objectives."""
    from narrative.hierarchy import list_objectives

    rows = [o.to_dict() for o in list_objectives(open_store(ctx))]
    emit_list(
        as_json,
        "objective_list",
        rows,
        lambda: table(rows, ["id", "status", "created_at", "title"]),
    )


@objective.command("show")
@click.argument("ref")
@json_option
@click.pass_context
def objective_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show an objective and its threads."""
    from narrative.hierarchy import list_threads, resolve_objective

    store = open_store(ctx)
    obj = resolve_objective(store, ref)
    data = {**obj.to_dict(), "threads": [t.to_dict() for t in list_threads(store, obj.id)]}
    emit(
        as_json,
        "objective_detail",
        data,
        lambda: (
            table([data], ["id", "status", "title"])
            + "\n"
            + table(data["threads"], ["id", "name", "forked_from"])
        ),
    )


@objective.command("set-status")
@click.argument("ref")
@click.argument("status", type=click.Choice(["open", "done", "abandoned"]))
@json_option
@click.pass_context
def objective_status(ctx: click.Context, ref: str, status: str, as_json: bool) -> None:
    """Mark an objective open, done or abandoned."""
    from narrative.hierarchy import resolve_objective, set_objective_status

    store = open_store(ctx)
    obj = set_objective_status(store, resolve_objective(store, ref).id, status)
    emit(as_json, "objective", obj.to_dict(), f"{obj.id} {obj.status}")


@click.group()
def thread() -> None:
    """Create, fork and inspect threads."""


@thread.command("create")
@click.argument("name")
@click.option("--objective", "objective_ref", help="Objective (default: the default one).")
@click.option("--from", "from_snapshot", help="Fork from this snapshot.")
@json_option
@click.pass_context
def thread_create(
    ctx: click.Context,
    name: str,
    objective_ref: str | None,
    from_snapshot: str | None,
    as_json: bool,
) -> None:
    """Create a thread, optionally forked from a snapshot."""
    from narrative.hierarchy import create_thread, resolve_objective
    from narrative.history import resolve_snapshot

    store = open_store(ctx)
    objective_id = (
        resolve_objective(store, objective_ref).id
        if objective_ref
        else store.config.default_objective
    )
    fork = resolve_snapshot(store, from_snapshot).id if from_snapshot else None
    created = create_thread(store, objective_id, name, fork)
    emit(as_json, "thread", created.to_dict(), created.id)


@thread.command("list")
@click.option("--objective", "objective_ref", help="Only threads of this objective.")
@json_option
@click.pass_context
def thread_list(ctx: click.Context, objective_ref: str | None, as_json: bool) -> None:
    """List threads with their head snapshot commit."""
    from narrative.hierarchy import list_threads, resolve_objective

    store = open_store(ctx)
    objective_id = resolve_objective(store, objective_ref).id if objective_ref else None
    heads = store.thread_heads()
    rows = [
        {**t.to_dict(), "head_commit": heads[t.id].hex() if t.id in heads else None}
        for t in list_threads(store, objective_id)
    ]
    emit_list(
        as_json,
        "thread_list",
        rows,
        lambda: table(rows, ["id", "name", "objective_id", "head_commit"]),
    )


@thread.command("show")
@click.argument("ref")
@json_option
@click.pass_context
def thread_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a thread with its snapshot count and runs."""
    from narrative.commits import thread_snapshots
    from narrative.hierarchy import list_runs, resolve_thread

    store = open_store(ctx)
    t = resolve_thread(store, ref)
    snaps = list(thread_snapshots(store, t.id))
    data = {
        **t.to_dict(),
        "head": snaps[0].id if snaps else None,
        "snapshots": len(snaps),
        "runs": [r.id for r in list_runs(store, t.id)],
    }
    emit(as_json, "thread_detail", data, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


@thread.command("reset")
@click.argument("thread_ref", metavar="THREAD")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.option(
    "--force",
    is_flag=True,
    help="Also move backwards or sideways (the old head stays as THREAD@{1}).",
)
@json_option
@click.pass_context
def thread_reset(
    ctx: click.Context, thread_ref: str, snapshot_ref: str, force: bool, as_json: bool
) -> None:
    """Move THREAD's head to SNAPSHOT, one of its snapshots.

    Without --force only forward (SNAPSHOT must descend from the head); with --force anywhere,
    and the head it had stays reachable as THREAD@{1} (its head log), e.g. to reset back.
    """
    from narrative.hierarchy import reset_thread, resolve_thread
    from narrative.history import resolve_snapshot

    store = open_store(ctx)
    t = resolve_thread(store, thread_ref)
    snap = resolve_snapshot(store, snapshot_ref)
    old = reset_thread(store, t.id, snap, force=force)
    data = {"thread": t.id, "head": snap.id, "previous_commit": old.hex() if old else None}
    emit(as_json, "thread_reset", data, f"thread {t.name} is now at {snap.id}")


COMMANDS = [objective, thread]
