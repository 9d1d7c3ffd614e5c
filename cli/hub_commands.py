"""``narrative serve`` (the hub) and ``narrative runtime`` (inside an environment)."""

from __future__ import annotations

import os

import click

from .context import open_store
from .output import json_document, json_option
from .serving import announce_and_wait

__all__ = ["COMMANDS"]


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
@click.option(
    "--reconnect-grace",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds a runtime may stay disconnected before its run fails.",
)
@click.option(
    "--unreachable-grace",
    type=click.FloatRange(0.1),
    default=600.0,
    show_default=True,
    help="Seconds a runtime may stay disconnected while its environment's host is unreachable.",
)
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
    unreachable_grace: float,
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
            unreachable_grace=unreachable_grace,
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


COMMANDS = [serve, runtime]
