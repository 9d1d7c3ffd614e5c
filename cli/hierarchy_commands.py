"""Objective, thread and run commands."""

from __future__ import annotations

from typing import Any

import click

from .context import open_store
from .output import emit, emit_list, json_option, note, usage_line

__all__ = ["COMMANDS"]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    return "\n".join(
        "  ".join(str(r.get(c) if r.get(c) is not None else "-") for c in columns) for r in rows
    )


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
        lambda: _table(rows, ["id", "status", "created_at", "title"]),
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
            _table([data], ["id", "status", "title"])
            + "\n"
            + _table(data["threads"], ["id", "name", "forked_from"])
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
        lambda: _table(rows, ["id", "name", "objective_id", "head_commit"]),
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


@click.group()
def run() -> None:
    """Record agent runs on threads."""


@run.command("start", context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--thread", "thread_ref", help="Thread (id or name; default thread).")
@click.option(
    "--agent",
    help="Agent name; with no command, narrative.toml's [agents.NAME] gives the command, "
    "environment, capabilities and timeout (default: [defaults] agent, else 'agent').",
)
@click.option(
    "--env",
    "environments",
    multiple=True,
    help="Environment (repeat to fan one run out to several; default: the hub selects one).",
)
@click.option(
    "--require",
    default="",
    help="Comma-separated capabilities the environment the hub selects must have (no --env).",
)
@click.option("--snapshot", "snapshot_ref", help="Base snapshot of an isolated run.")
@click.option("--timeout", type=float, help="Stop an isolated run's command after N seconds.")
@click.option("--no-snapshot", is_flag=True, help="Do not snapshot the workspace as the base.")
@click.option(
    "--direct", is_flag=True, help="Run without a hub or runtime (the provider runs the command)."
)
@click.option(
    "--manual",
    is_flag=True,
    help="No command: record a run that you (or your agent) end with 'narrative run finish'.",
)
@json_option
@click.pass_context
def run_start(
    ctx: click.Context,
    command: tuple[str, ...],
    thread_ref: str | None,
    agent: str | None,
    environments: tuple[str, ...],
    require: str,
    snapshot_ref: str | None,
    timeout: float | None,
    no_snapshot: bool,
    direct: bool,
    manual: bool,
    as_json: bool,
) -> None:
    """Start a run; its base is a snapshot of the workspace taken now.

    With a command (after --) the run executes in environment --env through the hub (the
    store's `narrative serve`, or one embedded for the run): a runtime started in the
    environment pulls the base (--snapshot, the head of --thread, or a fresh snapshot of the
    workspace) as a bundle, runs the command with its output streamed, and the result comes
    back as a bundle on a new thread forked from the base. The workspace is not touched.
    Several --env fan the run out. Without --env the hub selects an idle environment that has
    the --require capabilities, or creates one. Exits 1 when a command fails. With -q, stdout
    holds only the run ids (the command's output goes to stderr): run=$(narrative -q run ...).

    With --manual there is no command: the run is recorded and waits for 'narrative run
    finish' (an agent working in the workspace itself); one left running longer than
    'config manual_run_timeout' (default 24h) is recorded as cancelled (abandoned).
    """
    wanted = [c.strip() for c in require.split(",") if c.strip()]
    if manual and command:
        raise click.UsageError("--manual runs no command: drop the command or --manual")
    if wanted and environments:
        raise click.UsageError("--require selects an environment for a command: not with --env")
    if not manual:  # narrative.toml: the agent's manifest and the project's defaults
        from providers.project import load_project

        settings = load_project(open_store(ctx).workspace).run(
            agent, list(command), list(environments), wanted, timeout
        )
        agent, command, timeout = settings.agent, tuple(settings.command), settings.timeout
        environments, wanted = tuple(settings.environments), settings.require
    agent = agent or "agent"
    environment = environments[0] if environments else "local"
    if wanted and (direct or not command):
        raise click.UsageError("--require selects an environment for a command run through the hub")
    if command and not direct:
        from .hub_commands import start_through_hub

        if snapshot_ref and thread_ref:
            raise click.UsageError("give --snapshot or --thread, not both")
        envs: tuple[str | None, ...] = environments or (None,)
        start_through_hub(
            ctx, command, envs, wanted, agent, snapshot_ref, thread_ref, timeout, as_json
        )
        return
    if len(environments) > 1:
        raise click.UsageError("several --env need a command run through the hub")
    if command:
        _run_isolated(ctx, command, thread_ref, agent, environment, snapshot_ref, timeout, as_json)
        return
    if direct:
        raise click.UsageError("--direct needs a command (after --)")
    if snapshot_ref or timeout is not None:
        raise click.UsageError("--snapshot and --timeout need a command (after --)")
    if not manual:
        raise click.UsageError(
            "give the command to run after -- (narrative run start --env ENV -- CMD), or "
            "--manual for a run you end yourself with 'narrative run finish'"
        )
    from narrative.hierarchy import resolve_thread, start_run, sweep_abandoned_runs
    from narrative.snapshot import take_snapshot

    store = open_store(ctx)
    _note_swept(sweep_abandoned_runs(store))
    t = resolve_thread(store, thread_ref)
    base = None
    if not no_snapshot:
        base = take_snapshot(store, t.id, message=f"base of a run by {agent}").snapshot.id
    started = start_run(store, t.id, agent, environment, base, manual=True)
    emit(as_json, "run", started.to_dict(), started.id)


def _run_isolated(
    ctx: click.Context,
    command: tuple[str, ...],
    thread_ref: str | None,
    agent: str,
    environment: str,
    snapshot_ref: str | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    from gateway.hub.direct import pick_base, run_isolated

    from .env_commands import open_manager, stream_output

    if snapshot_ref and thread_ref:
        raise click.UsageError("give --snapshot or --thread, not both")
    manager = open_manager(ctx)
    manager.require_active(environment)
    base = pick_base(manager, snapshot_ref, thread_ref)
    outcome = run_isolated(
        manager,
        environment,
        list(command),
        base,
        agent=agent,
        timeout=timeout,
        on_output=stream_output(as_json),
    )
    run = outcome.run
    data = {**run.to_dict(), "timed_out": outcome.timed_out}
    emit(
        as_json,
        "run_result",
        data,
        f"{run.id} {run.status} (exit {run.exit_code}) result {run.result_snapshot}",
    )
    if run.status != "succeeded":
        note(f"run {run.id} {run.status}" + (" (timed out)" if outcome.timed_out else ""))
        ctx.exit(1)


@run.command("finish")
@click.argument("run_id")
@click.option(
    "--status",
    type=click.Choice(["succeeded", "failed", "cancelled", "killed"]),
    default="succeeded",
    show_default=True,
)
@click.option("--exit-code", type=int, help="Exit code of the agent.")
@click.option("--no-snapshot", is_flag=True, help="Do not snapshot the result.")
@click.option("-m", "--message", default="", help="Message of the result snapshot.")
@json_option
@click.pass_context
def run_finish(
    ctx: click.Context,
    run_id: str,
    status: str,
    exit_code: int | None,
    no_snapshot: bool,
    message: str,
    as_json: bool,
) -> None:
    """Finish a run, snapshotting its result onto the run's thread."""
    from narrative.hierarchy import finish_run, get_run
    from narrative.snapshot import take_snapshot

    store = open_store(ctx)
    current = get_run(store, run_id)
    result = None
    if not no_snapshot:
        result = take_snapshot(
            store, current.thread_id, run_id, message or f"result of run {run_id}"
        ).snapshot.id
    done = finish_run(store, run_id, status, exit_code, result)
    emit(as_json, "run", done.to_dict(), f"{done.id} {done.status}")


@run.command("list")
@click.option("--thread", "thread_ref", help="Only runs on this thread.")
@json_option
@click.pass_context
def run_list(ctx: click.Context, thread_ref: str | None, as_json: bool) -> None:
    """List agent runs (manual runs still running show how long they have waited for
    'narrative run finish'; abandoned ones are swept first, see 'run start --manual')."""
    from narrative.hierarchy import list_runs, resolve_thread, run_age, sweep_abandoned_runs

    store = open_store(ctx)
    _note_swept(sweep_abandoned_runs(store))
    thread_id = resolve_thread(store, thread_ref).id if thread_ref else None
    rows = []
    for r in list_runs(store, thread_id):
        age = run_age(r)
        waiting = r.manual and r.status == "running"
        rows.append(
            {
                **r.to_dict(),
                "age_seconds": int(age) if age is not None else None,
                "waiting": f"run finish ({_duration(age)})" if waiting and age is not None else "",
            }
        )
    columns = ["id", "status", "agent", "thread", "started_at", "waiting"]
    emit_list(as_json, "run_list", rows, lambda: _table(rows, columns))


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _note_swept(runs: list[Any]) -> None:
    for run in runs:
        note(f"run {run.id} was abandoned: {run.reason} (recorded as cancelled)")


@run.command("show")
@click.argument("run_id")
@json_option
@click.pass_context
def run_show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show one run, with what it cost, its event log and the route each proxied call took."""
    from gateway.hub.events import RunEventLog
    from gateway.hub.usage_records import load_usage
    from narrative.runs import resolve_run

    store = open_store(ctx)
    found = resolve_run(store, run_id)
    events = RunEventLog(store, found.id).read()
    usage = load_usage(store, found.id)
    data = {**found.to_dict(), **({"usage": usage} if usage is not None else {}), "events": events}

    def human() -> str:
        from .hub_commands import render_events

        text = "\n".join(f"{k}: {v}" for k, v in found.to_dict().items())
        text += "\n" + usage_line(usage) if usage is not None else ""
        return text + ("\n" + render_events(events) if events else "")

    emit(as_json, "run_detail", data, human)


COMMANDS = [objective, thread, run]
