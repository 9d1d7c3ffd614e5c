"""``narrative serve`` (the hub) and ``narrative runtime`` (inside an environment)."""

from __future__ import annotations

import contextlib
import os
from typing import NoReturn

import click

from .context import open_store
from .output import json_document, json_option
from .serving import announce_and_wait
from .tls_options import client_trust_options, server_tls, server_tls_options

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
@server_tls_options
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Serve wss:// with a self-signed certificate, made once and kept in the store; "
    "its fingerprint is printed for clients to pin.",
)
@click.option(
    "--advertise-url",
    metavar="URL",
    help="The URL runtimes and clients are told to dial (default: the listening one).",
)
@click.option(
    "--web-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the web view on 127.0.0.1 (0: a free one; 'narrative hub ui' logs in).",
)
@click.option("--no-web", is_flag=True, help="Serve no web view.")
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
    tls_cert: str | None,
    tls_key: str | None,
    insecure: bool,
    tls_self_signed: bool,
    advertise_url: str | None,
    web_port: int,
    no_web: bool,
    as_json: bool,
) -> None:
    """Serve the hub: environments, runs and the gateway, until interrupted.

    Runs started with `narrative run start --env E -- CMD` go through it; runs it finds
    unfinished from an earlier hub are adopted when their runtimes reconnect.

    Off loopback the hub serves wss:// (--tls-cert/--tls-key, or --tls-self-signed);
    clients pin the printed fingerprint (sha256:HEX) with --fingerprint.

    The hub's web view listens on 127.0.0.1 (--web-port); `narrative hub ui` prints a
    one-time login URL for it.
    """
    from gateway.config import load_config
    from gateway.hub.server import Hub, hub_tls_directory
    from gateway.hub.web import WebView
    from gateway.tls import self_signed_certificate

    store = open_store(ctx)
    config = load_config(config_path) if config_path else None
    if advertise_url is not None and not advertise_url.startswith(("ws://", "wss://")):
        raise click.BadParameter("must be a ws:// or wss:// URL", param_hint="--advertise-url")
    hosts = [host, *([_url_host(advertise_url)] if advertise_url else [])]
    tls = server_tls(
        host,
        tls_cert,
        tls_key,
        insecure,
        (lambda: self_signed_certificate(hub_tls_directory(store), hosts))
        if tls_self_signed
        else None,
    )

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
            tls=tls,
            advertise_url=advertise_url,
        )
        web = None if no_web else WebView(hub, port=web_port)
        if web is not None:
            await web.start()  # first: the hub announces the view's URL with its own
        try:
            await hub.start()
            try:
                ready = {
                    "url": hub.url,
                    "fingerprint": hub.fingerprint,
                    "pid": os.getpid(),
                    "environment": hub.environment_id,
                    "web": hub.web_url,
                }
                pin = f" (certificate fingerprint {hub.fingerprint})" if hub.fingerprint else ""
                view = f"; web view on {hub.web_url} (log in: narrative hub ui)" if web else ""
                await announce_and_wait(
                    json_document("hub_ready", ready, None)
                    if as_json
                    else f"hub listening on {hub.url}{pin}{view}"
                )
            finally:
                await hub.close()
        finally:
            if web is not None:
                await web.close()

    import asyncio  # imported late: it costs every command's start-up

    asyncio.run(main())


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


@click.command()
@click.option(
    "--connect",
    "url",
    metavar="URL",
    help="The hub's ws:// or wss:// URL, or ws+unix:///PATH of its unix socket (required).",
)
@click.option("--token", envvar="NARRATIVE_TOKEN", help="Run-scoped token (required).")
@client_trust_options
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
@click.option(
    "--delegate-hub",
    envvar="NARRATIVE_DELEGATE_HUB",
    metavar="LOGIN",
    help="Hand the agent to another hub as a run of its own, with this login "
    "(set by the remote provider).",
)
@click.option(
    "--delegate-env",
    envvar="NARRATIVE_DELEGATE_ENV",
    metavar="NAME",
    help="The environment on that hub the agent's run goes to.",
)
@click.option(
    "--warm",
    is_flag=True,
    hidden=True,
    help="Import the runtime, then fork one per SIGUSR1 with the order a run's start left "
    "(providers.zygote; started by a k8s pod's keep-alive).",
)
@click.pass_context
def runtime(
    ctx: click.Context,
    url: str | None,
    token: str | None,
    fingerprint: str | None,
    ca_file: str | None,
    workspace: str,
    stop_grace: float,
    give_up_after: float,
    check: bool,
    delegate_hub: str | None,
    delegate_env: str | None,
    warm: bool,
) -> None:
    """Run inside an environment: connect back to the hub and run its agent."""
    from gateway.hub.runtime import RUNTIME_MODULES, Runtime, shadowed_modules
    from providers.base import CHECK_DONE

    if warm:
        from providers.zygote import serve

        from .main import RunInstead

        def become(args: list[str]) -> NoReturn:
            raise RunInstead(args)

        from narrative.entrypoints import entry_points_in

        with contextlib.suppress(Exception):  # else each forked runtime lists them itself
            entry_points_in("")  # plugins listed once here, not by every forked runtime
        serve((*RUNTIME_MODULES, "asyncio"), become)

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
            fingerprint=fingerprint,
            ca_file=ca_file,
            delegate=(delegate_hub, delegate_env) if delegate_hub and delegate_env else None,
        )
        return await node.serve()

    import asyncio  # imported late: it costs every command's start-up

    ctx.exit(asyncio.run(main()))


COMMANDS = [serve, runtime]
