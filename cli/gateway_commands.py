"""Gateway commands: serve a gateway, issue tokens, make calls, explain routes."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import click

from narrative.errors import InvalidInput, NarrativeError, StoreError
from narrative.jsonio import parse_json

from .context import open_store
from .output import emit, json_document, json_option, note
from .serving import announce_and_wait
from .tls_options import client_trust_options, server_tls, server_tls_options

if TYPE_CHECKING:
    from pathlib import Path

    from gateway.config import ProxyExecutionConfig
    from narrative.store import Store

__all__ = ["COMMANDS"]

_KEY_NAME = "gateway.key"
_DEFAULT_CONFIG = "proxyExecution.json"
#: Lifetime of the token a serving gateway mints for its own outgoing --connect links.
_LINK_TTL = 24 * 3600.0


def _key_path(ctx: click.Context, key_file: str | None) -> Path:
    """``--key-file``, else ``gateway.key`` in the store directory."""
    from pathlib import Path

    if key_file:
        return Path(key_file)
    return Path(open_store(ctx).git_dir) / _KEY_NAME


def _signer(ctx: click.Context, key_file: str | None) -> Any:
    from gateway.tokens import TokenSigner, load_or_create_key

    return TokenSigner(load_or_create_key(_key_path(ctx, key_file)), "gateway")


def _config(path: str | None) -> tuple[ProxyExecutionConfig, str | None]:
    from gateway.config import ProxyExecutionConfig, load_config

    if path is None and os.path.exists(_DEFAULT_CONFIG):
        path = _DEFAULT_CONFIG
    if path is None:
        return ProxyExecutionConfig(), None
    return load_config(path), path


_key_option = click.option(
    "--key-file",
    type=click.Path(dir_okay=False),
    envvar="NARRATIVE_GATEWAY_KEY",
    help="Signing key (default: gateway.key in the store; env NARRATIVE_GATEWAY_KEY).",
)
_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help=f"Routing rules (default: ./{_DEFAULT_CONFIG} if present, else all local).",
)


@click.group()
def gateway() -> None:
    """Proxy Execution Gateway: run capability calls here or in another environment."""


@gateway.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=3100, show_default=True)
@_config_option
@click.option("--env", "env_id", default="gateway", show_default=True, help="This environment.")
@click.option("--run", "run_id", help="Accept only tokens for this run.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    help="Directory the file and exec handlers are confined to (default: the workspace).",
)
@click.option("--capability", "capabilities", multiple=True, help="Declare a capability.")
@click.option(
    "--handlers",
    "plugins",
    multiple=True,
    metavar="MODULE[:FUNC]",
    help="Load handler plugins (FUNC, default register, gets the handler registry).",
)
@click.option("--connect", "connects", multiple=True, metavar="URL", help="Dial a peer gateway.")
@click.option(
    "--token",
    envvar="NARRATIVE_TOKEN",
    help="Token for --connect (default: minted for --env with the key; env NARRATIVE_TOKEN).",
)
@server_tls_options
@client_trust_options
@click.option("--max-frame", type=click.IntRange(1024), default=1 << 20, show_default=True)
@click.option("--transport-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True)
@click.option("--execution-timeout", type=click.FloatRange(0.1), default=300.0, show_default=True)
@_key_option
@json_option
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    config_path: str | None,
    env_id: str,
    run_id: str | None,
    root: str | None,
    capabilities: tuple[str, ...],
    plugins: tuple[str, ...],
    connects: tuple[str, ...],
    token: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    insecure: bool,
    fingerprint: str | None,
    ca_file: str | None,
    max_frame: int,
    transport_timeout: float,
    execution_timeout: float,
    key_file: str | None,
    as_json: bool,
) -> None:
    """Serve a gateway (ProviderServer) until interrupted; prints its URL first."""
    from gateway.builtins import install_builtins
    from gateway.limits import Limits
    from gateway.node import Gateway
    from gateway.plugins import RemoteExecutionPlugin
    from gateway.tls import client_ssl_context

    tls = server_tls(host, tls_cert, tls_key, insecure)
    config, _ = _config(config_path)
    key_path = _key_path(ctx, key_file)
    signer = _signer(ctx, key_file)
    deny = [str(key_path)]
    try:
        store: Store | None = open_store(ctx)
    except StoreError:  # no store (possible with --key-file): the current directory
        store = None
    if store is not None:
        deny.append(store.git_dir)
    if root is None:
        root = store.workspace if store is not None else os.getcwd()
    limits = Limits(
        execution_timeout=execution_timeout,
        transport_timeout=transport_timeout,
        max_frame=max_frame,
    )
    try:
        node = Gateway(env_id, config=config, capabilities=capabilities, limits=limits)
        install_builtins(node.handlers, root, deny=deny)
        if plugins:
            from gateway.hub.server import load_handler_plugin

            for spec in plugins:
                load_handler_plugin(spec, node.handlers)
        link_token = token or signer.issue(run_id or "local", env_id, _LINK_TTL)
    except ValueError as exc:  # GatewayError subclasses included: a bad --env/--run/...
        if isinstance(exc, NarrativeError):
            raise
        raise InvalidInput(str(exc)) from None

    async def main() -> None:
        from gateway.errors import Unavailable

        server_ssl = tls.context if tls is not None else None
        plugin = RemoteExecutionPlugin(
            node, signer, host=host, port=port, ssl=server_ssl, run_id=run_id
        )
        await plugin.start()
        try:
            for url in connects:
                try:
                    trust = client_ssl_context(url, fingerprint=fingerprint, ca_file=ca_file)
                    await node.connect(url, link_token, ssl=trust)
                except Unavailable as exc:
                    note(f"{exc}; retrying in the background")
            ready = {"url": plugin.url, "environment": env_id, "pid": os.getpid(), "root": root}
            human = f"gateway {env_id} listening on {plugin.url} (root {root})"
            await announce_and_wait(
                json_document("gateway_ready", ready, None) if as_json else human
            )
        finally:
            await plugin.stop()
            await node.close()

    try:
        import asyncio  # imported late: it costs every command's start-up

        asyncio.run(main())
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@gateway.command()
@click.option("--run", "run_id", required=True, help="Run the token is scoped to.")
@click.option("--env", "env_id", required=True, help="Environment allowed to connect with it.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 90s, 15m, 1h, 7d.")
@_key_option
@json_option
@click.pass_context
def token(
    ctx: click.Context, run_id: str, env_id: str, ttl: str, key_file: str | None, as_json: bool
) -> None:
    """Issue a run-scoped token (HMAC-signed with the store's gateway key)."""
    import time

    from gateway.tokens import parse_ttl

    try:
        seconds = parse_ttl(ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    signer = _signer(ctx, key_file)
    now = time.time()
    try:
        value = signer.issue(run_id, env_id, seconds, now=now)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    data = {"token": value, "run": run_id, "environment": env_id, "expires_at": now + seconds}
    emit(as_json, "token", data, value)


@gateway.command()
@click.argument("kind", metavar="TYPE")
@click.argument("action", metavar="ACTION")
@click.option("--payload", default="{}", show_default=True, help="JSON object for the handler.")
@click.option("--url", default="ws://127.0.0.1:3100", show_default=True, help="Gateway URL.")
@click.option("--token", envvar="NARRATIVE_TOKEN", help="Token (env NARRATIVE_TOKEN).")
@click.option("--target", help="Run in exactly this environment.")
@click.option("--timeout", type=click.FloatRange(0.001), default=60.0, show_default=True)
@client_trust_options
@json_option
def call(
    kind: str,
    action: str,
    payload: str,
    url: str,
    token: str | None,
    target: str | None,
    timeout: float,
    fingerprint: str | None,
    ca_file: str | None,
    as_json: bool,
) -> None:
    """Call TYPE ACTION through a gateway; partial results stream to stderr."""
    from gateway.client import GatewayClient
    from gateway.limits import Limits

    if not token:
        raise click.UsageError("no token: pass --token or set NARRATIVE_TOKEN")
    try:
        body = parse_json(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    if not isinstance(body, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--payload")
    partials: list[Any] = []

    async def main() -> Any:
        limits = Limits(transport_timeout=min(timeout, 10.0))
        client = GatewayClient(url, token, fingerprint=fingerprint, ca_file=ca_file, limits=limits)
        async with client:
            async with client.stream(kind, action, body, timeout=timeout, target=target) as run:
                async for part in run:
                    partials.append(part)
                    if not as_json:
                        _show_partial(part)
            return run.result

    import asyncio

    result = asyncio.run(main())
    if as_json:
        emit(True, "call_result", {"result": result, "partials": partials}, "")
    else:
        click.echo(json.dumps(result, indent=2))


def _show_partial(part: Any) -> None:
    if isinstance(part, dict) and isinstance(part.get("data"), str):
        click.echo(part["data"], nl=False, err=True)
    else:
        click.echo(json.dumps(part), err=True)


@gateway.command()
@click.argument("kind", metavar="[TYPE", required=False)
@click.argument("action", metavar="ACTION]", required=False)
@_config_option
@json_option
def routes(kind: str | None, action: str | None, config_path: str | None, as_json: bool) -> None:
    """List the routing rules by precedence, or explain which one a TYPE ACTION call takes."""
    from gateway.router import RouteMatch, Router

    config, path = _config(config_path)
    router = Router(config)

    def row(m: RouteMatch) -> dict[str, Any]:
        rule = m.rule.model_dump(exclude_none=True, exclude_defaults=True)
        return {"rule": m.key or "(default)", "mode": m.rule.mode, **rule}

    def show(m: RouteMatch) -> str:
        data = row(m)
        where = ", ".join(f"{k}={v}" for k, v in data.items() if k not in ("rule", "mode"))
        return f"{data['rule']:<24} {data['mode']:<6} {where}".rstrip()

    if kind is not None:
        if action is None:
            raise click.UsageError("give both TYPE and ACTION")
        found = router.match(kind, action)
        data = {"call": f"{kind}:{action}", "config": path, **row(found)}
        emit(as_json, "route", data, f"{kind}:{action} -> {show(found)}")
        return
    rows = [row(m) for m in router.explain()]
    emit(
        as_json,
        "route_table",
        {"config": path, "hopLimit": config.hopLimit, "rules": rows},
        lambda: "\n".join(
            [f"# {path or 'no config: every call runs locally'}; hop limit {config.hopLimit}"]
            + [show(m) for m in router.explain()]
        ),
    )


COMMANDS = [gateway]
