"""``narrative run ...``: start runs (in the workspace, directly in an environment, or through
a hub), finish, list and show them, and stop or kill them through the hub that drives them."""

from __future__ import annotations

import sys
from typing import Any

import click

from .context import open_store
from .output import emit, emit_list, json_option, note, quiet, table, usage_line

__all__ = ["COMMANDS"]


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
@click.option("--hub", "hub_login", metavar="NAME", help="On the team hub of login NAME.")
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
    hub_login: str | None,
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

    With --hub NAME the run goes to the shared team hub you logged in to (`narrative hub
    login`): the base is pushed there, the run's events followed, and its result imported
    into this store when it ends.
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
    if hub_login is not None and (direct or not command):
        raise click.UsageError("--hub runs a command (after --) on a team hub, not --direct")
    if command and not direct:
        if snapshot_ref and thread_ref:
            raise click.UsageError("give --snapshot or --thread, not both")
        envs: tuple[str | None, ...] = environments or (None,)
        start_through_hub(
            ctx, command, envs, wanted, agent, snapshot_ref, thread_ref, timeout, as_json, hub_login
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
    from gateway.hub.direct import PhaseClock, pick_base, run_isolated

    from .env_commands import open_manager, stream_output

    if snapshot_ref and thread_ref:
        raise click.UsageError("give --snapshot or --thread, not both")
    clock = PhaseClock()
    manager = open_manager(ctx)
    manager.require_active(environment)
    base = pick_base(manager, snapshot_ref, thread_ref)
    clock.lap("base")
    outcome = run_isolated(
        manager,
        environment,
        list(command),
        base,
        agent=agent,
        timeout=timeout,
        on_output=stream_output(as_json),
        clock=clock,
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
@click.option("--hub", "hub_login", metavar="NAME", help="On the team hub of login NAME.")
@json_option
@click.pass_context
def run_list(
    ctx: click.Context, thread_ref: str | None, hub_login: str | None, as_json: bool
) -> None:
    """List agent runs (manual runs still running show how long they have waited for
    'narrative run finish'; abandoned ones are swept first, see 'run start --manual').
    With --hub NAME: your runs on that team hub (an admin's: everyone's)."""
    from narrative.hierarchy import list_runs, resolve_thread, run_age, sweep_abandoned_runs

    if hub_login is not None:
        import asyncio

        from gateway.hub.team_client import team_runs

        if thread_ref:
            raise click.UsageError("--thread lists runs of this store, not of a team hub")
        items = asyncio.run(team_runs(hub_login))
        columns = ["id", "status", "user", "environment", "started_at"]
        emit_list(as_json, "team_run_list", items, lambda: table(items, columns))
        return

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
    emit_list(as_json, "run_list", rows, lambda: table(rows, columns))


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

        text = "\n".join(f"{k}: {v}" for k, v in found.to_dict().items())
        text += "\n" + usage_line(usage) if usage is not None else ""
        return text + ("\n" + render_events(events) if events else "")

    emit(as_json, "run_detail", data, human)


def start_through_hub(
    ctx: click.Context,
    command: tuple[str, ...],
    environments: tuple[str | None, ...],
    require: list[str],
    agent: str,
    snapshot_ref: str | None,
    thread_ref: str | None,
    timeout: float | None,
    as_json: bool,
    hub_login: str | None = None,
) -> None:
    """``run start --env E [--env F ...] -- CMD`` through the hub (fan-out with several; an
    environment None: the hub selects one with the ``require`` capabilities); with
    ``hub_login``, through that team hub."""
    from gateway.hub.agent_output import output_bytes
    from gateway.hub.client import run_through_hub
    from gateway.hub.run_request import RunRequest

    store = open_store(ctx)
    requests = [
        RunRequest(
            environment=env,
            argv=list(command),
            agent=agent,
            snapshot=snapshot_ref,
            thread=thread_ref,
            timeout=timeout,
            require=require if env is None else [],
        )
        for env in environments
    ]
    many = len(requests) > 1
    timed_out: set[str] = set()
    finished: list[str] = []

    def show(run_: Any, event: dict[str, Any]) -> None:
        if many and event["type"] == "run.finished":  # the fan-out's progress, a line a run
            finished.append(run_.id)
            status, code = event.get("status"), event.get("exitCode")
            note(f"[{len(finished)}/{len(requests)}] {run_.environment} {status} (exit {code})")
        if event["type"] == "run.timed_out" or (
            event["type"] == "agent.exited" and event.get("reason") == "timeout"
        ):
            timed_out.add(run_.id)
        if event["type"] == "agent.output":
            # with --json or -q, stdout holds only the document or the run ids
            to_stdout = event.get("stream") != "stderr" and not (as_json or quiet())
            target = sys.stdout if to_stdout else sys.stderr
            data = output_bytes(event)
            if many:
                prefix = f"[{run_.environment}] ".encode()
                data = b"".join(prefix + line for line in data.splitlines(True))
            target.flush()  # text written before must come out first
            target.buffer.write(data)
            target.buffer.flush()
        elif event["type"] == "environment.selected":
            note(f"{run_.id}: in environment {event.get('environment')} ({event.get('how')})")
        elif event["type"] in ("run.error", "runtime.lost", "result.unavailable"):
            note(f"{run_.id}: {event.get('reason')}")
        elif event["type"] == "runtime.log":
            note(f"{run_.id}: the runtime's last output:")
            for line in event.get("lines") or []:
                note(f"  | {line}")

    import asyncio  # imported late: it costs every command's start-up

    if hub_login is None:
        runs = asyncio.run(run_through_hub(store, requests, show))
    else:
        from gateway.hub.team_client import run_on_team_hub

        runs = asyncio.run(run_on_team_hub(store, hub_login, requests, show))
    data = [{**r.to_dict(), "timed_out": r.id in timed_out} for r in runs]
    lines = [
        r.id if quiet() else f"{r.id} {r.status} (exit {r.exit_code}) result {r.result_snapshot}"
        for r in runs
    ]
    if many:
        emit_list(as_json, "run_result_list", data, "\n".join(lines))
    else:
        emit(as_json, "run_result", data[0], "\n".join(lines))
    failed = [r for r in runs if r.status != "succeeded"]
    for r in failed:
        note(f"run {r.id} {r.status}" + (" (timed out)" if r.id in timed_out else ""))
    if failed:
        ctx.exit(1)


def render_events(events: list[dict[str, Any]]) -> str:
    """The event log and the routes of a run, for people."""
    from gateway.hub.agent_output import output_bytes

    lines, routes = ["events:"], []
    for event in events:
        kind = event["type"]
        if kind == "call.routed":
            status = "ok" if event.get("success") else f"error {event.get('error')}"
            route = " -> ".join(event.get("route", []))
            routes.append(
                f"  {event.get('call')}: {route} (ran in {event.get('ranIn')}, "
                f"{event.get('ms')} ms, {status})"
            )
            continue
        skip = ("seq", "time", "type", "at", "rseq")
        if kind == "agent.output":
            detail = repr(output_bytes(event).decode("utf-8", "replace")[:120])
        elif kind == "runtime.log":
            detail = f"handle={event.get('handle')}" + "".join(
                f"\n    | {line}" for line in event.get("lines") or []
            )
        else:
            detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
        lines.append(f"  {event['time']} {kind} {detail}".rstrip())
    if routes:
        lines += ["routes:", *routes]
    return "\n".join(lines)


@run.command("stop")
@click.argument("run_id")
@click.option("--grace", type=click.FloatRange(0), help="Seconds before killing (hub default).")
@click.option("--hub", "hub_login", metavar="NAME", help="On the team hub of login NAME.")
@json_option
@click.pass_context
def run_stop(
    ctx: click.Context, run_id: str, grace: float | None, hub_login: str | None, as_json: bool
) -> None:
    """Ask a run's agent to stop; it is killed if it has not stopped after --grace seconds."""
    from gateway.hub.client import stop_run
    from narrative.runs import resolve_run

    if hub_login is not None:
        _control_team_run(hub_login, "runStop", {"run": run_id, "grace": grace}, as_json)
        return
    store = open_store(ctx)
    found = resolve_run(store, run_id)
    import asyncio  # imported late: it costs every command's start-up

    asyncio.run(stop_run(store, found, grace))
    emit(as_json, "run_request", {"run": found.id, "requested": "stop"}, f"stopping {found.id}")


@run.command("kill")
@click.argument("run_id")
@click.option("--hub", "hub_login", metavar="NAME", help="On the team hub of login NAME.")
@json_option
@click.pass_context
def run_kill(ctx: click.Context, run_id: str, hub_login: str | None, as_json: bool) -> None:
    """Kill a run's runtime and agent at once (the run is recorded as killed)."""
    from gateway.hub.client import kill_run
    from narrative.runs import resolve_run

    if hub_login is not None:
        _control_team_run(hub_login, "runKill", {"run": run_id}, as_json)
        return
    store = open_store(ctx)
    found = resolve_run(store, run_id)
    import asyncio  # imported late: it costs every command's start-up

    asyncio.run(kill_run(store, found))
    emit(as_json, "run_request", {"run": found.id, "requested": "kill"}, f"killing {found.id}")


def _control_team_run(name: str, action: str, payload: dict[str, Any], as_json: bool) -> None:
    import asyncio

    from gateway.hub.team_client import control_team_run

    asyncio.run(control_team_run(name, action, payload))
    requested = "stop" if action == "runStop" else "kill"
    run_id = payload["run"]
    emit(as_json, "run_request", {"run": run_id, "requested": requested}, f"{requested} {run_id}")


COMMANDS = [run]
