"""``narrative serve`` (the hub), ``narrative runtime`` (inside an environment), and the run
commands that talk to a hub: ``run stop``, ``run kill``, and the hub side of ``run start``."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .context import open_store
from .hierarchy_commands import run
from .output import emit, emit_list, json_document, json_option, note, quiet
from .serving import announce_and_wait

__all__ = ["COMMANDS", "render_events", "start_through_hub"]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=3100, show_default=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True),
    help="Routing rules (proxyExecution.json) for calls passing through the hub.",
)
@click.option(
    "--handlers",
    "plugins",
    multiple=True,
    metavar="MODULE[:FUNC]",
    help="Load handler plugins (FUNC, default register, gets the handler registry).",
)
@click.option("--allow-exec", is_flag=True, help="Serve exec:run in the workspace too.")
@click.option("--allow-writes", is_flag=True, help="Let environments write the workspace.")
@click.option("--reconnect-grace", type=click.FloatRange(0.1), default=30.0, show_default=True)
@click.option("--token-ttl", type=click.FloatRange(1.0), default=900.0, show_default=True)
@json_option
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    config_path: str | None,
    plugins: tuple[str, ...],
    allow_exec: bool,
    allow_writes: bool,
    reconnect_grace: float,
    token_ttl: float,
    as_json: bool,
) -> None:
    """Serve the hub: environments, runs and the gateway, until interrupted.

    Runs started with `narrative run start --env E -- CMD` go through it; runs it finds
    unfinished from an earlier hub are adopted when their runtimes reconnect.
    """
    from gateway.config import load_config
    from gateway.hub.server import Hub

    store = open_store(ctx)
    config = load_config(config_path) if config_path else None

    async def main() -> None:
        hub = Hub(
            store,
            host=host,
            port=port,
            config=config,
            allow_exec=allow_exec,
            allow_writes=allow_writes,
            plugins=plugins,
            daemon=True,
            reconnect_grace=reconnect_grace,
            token_ttl=token_ttl,
        )
        await hub.start()
        try:
            ready = {"url": hub.url, "pid": os.getpid(), "environment": hub.environment_id}
            await announce_and_wait(
                json_document("hub_ready", ready, None)
                if as_json
                else f"hub listening on {hub.url}"
            )
        finally:
            await hub.close()

    import asyncio  # imported late: it costs every command's start-up

    asyncio.run(main())


@click.command()
@click.option(
    "--connect",
    "url",
    metavar="URL",
    help="The hub's ws:// URL, or ws+unix:///PATH of its unix socket (required).",
)
@click.option("--token", envvar="NARRATIVE_TOKEN", help="Run-scoped token (required).")
@click.option(
    "--workspace",
    type=click.Path(file_okay=False, exists=True),
    default=".",
    show_default=True,
    help="The environment's workspace.",
)
@click.option("--stop-grace", type=click.FloatRange(0), default=10.0, show_default=True)
@click.option(
    "--give-up-after",
    type=click.FloatRange(1),
    default=600.0,
    show_default=True,
    help="Seconds without a hub before stopping the agent and exiting.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Only check that no file of the workspace shadows a module of the runtime "
    "(prints one line per shadowing module; exit 1 when there is one).",
)
@click.pass_context
def runtime(
    ctx: click.Context,
    url: str | None,
    token: str | None,
    workspace: str,
    stop_grace: float,
    give_up_after: float,
    check: bool,
) -> None:
    """Run inside an environment: connect back to the hub and run its agent."""
    from gateway.hub.runtime import Runtime, shadowed_modules
    from providers.base import CHECK_DONE

    if check:
        # Plain lines, no json: a shadowed json module must not hide its own report.
        shadowed = shadowed_modules(workspace)
        for name, path in shadowed.items():
            click.echo(f"shadowed\t{name}\t{path}")
        click.echo(f"{CHECK_DONE} {'broken' if shadowed else 'ok'}")
        ctx.exit(1 if shadowed else 0)
    if not url or not token:
        raise click.UsageError("--connect and --token (or NARRATIVE_TOKEN) are required")
    store_dir = (ctx.find_root().obj or {}).get("store_dir")

    async def main() -> int:
        node = Runtime(
            url,
            token,
            workspace,
            store_dir=store_dir,
            stop_grace=stop_grace,
            give_up_after=give_up_after,
        )
        return await node.serve()

    import asyncio  # imported late: it costs every command's start-up

    ctx.exit(asyncio.run(main()))


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
) -> None:
    """``run start --env E [--env F ...] -- CMD`` through the hub (fan-out with several; an
    environment None: the hub selects one with the ``require`` capabilities)."""
    from gateway.hub.agent_output import output_bytes
    from gateway.hub.client import run_through_hub
    from gateway.hub.runs import RunRequest

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

    def show(run_: Any, event: dict[str, Any]) -> None:
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

    runs = asyncio.run(run_through_hub(store, requests, show))
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
@json_option
@click.pass_context
def run_stop(ctx: click.Context, run_id: str, grace: float | None, as_json: bool) -> None:
    """Ask a run's agent to stop; it is killed if it has not stopped after --grace seconds."""
    from gateway.hub.client import stop_run
    from narrative.runs import resolve_run

    store = open_store(ctx)
    found = resolve_run(store, run_id)
    import asyncio  # imported late: it costs every command's start-up

    asyncio.run(stop_run(store, found, grace))
    emit(as_json, "run_request", {"run": found.id, "requested": "stop"}, f"stopping {found.id}")


@run.command("kill")
@click.argument("run_id")
@json_option
@click.pass_context
def run_kill(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Kill a run's runtime and agent at once (the run is recorded as killed)."""
    from gateway.hub.client import kill_run
    from narrative.runs import resolve_run

    store = open_store(ctx)
    found = resolve_run(store, run_id)
    import asyncio  # imported late: it costs every command's start-up

    asyncio.run(kill_run(store, found))
    emit(as_json, "run_request", {"run": found.id, "requested": "kill"}, f"killing {found.id}")


COMMANDS = [serve, runtime]
