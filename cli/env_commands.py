"""``narrative env ...``: create, drive and inspect environments."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from narrative.jsonio import parse_json

from .context import open_store
from .output import emit, emit_list, json_option, note, usage_line

if TYPE_CHECKING:
    from providers.manager import EnvironmentManager

__all__ = ["COMMANDS", "open_manager", "parse_config", "stream_output"]

DEFAULT_PARALLEL = 16
"""Environments one command creates or drives at a time (each mostly waits on its backend)."""

parallel_option = click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=DEFAULT_PARALLEL,
    show_default=True,
    help="With several names: how many at a time.",
)


def open_manager(ctx: click.Context) -> EnvironmentManager:
    from providers.manager import EnvironmentManager

    return EnvironmentManager(open_store(ctx))


def parse_config(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that parses as JSON (numbers, lists, objects) is used so."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--config")
        try:
            config[key] = parse_json(value)
        except ValueError:
            config[key] = value
    return config


def stream_output(as_json: bool) -> Any:
    """An output callback writing the command's streams through (stdout to stderr under --json,
    so that stdout holds only the JSON document)."""

    def write(stream: str, chunk: bytes) -> None:
        target = sys.stderr if as_json or stream == "stderr" else sys.stdout
        target.buffer.write(chunk)
        target.flush()

    return write


def _row(record: Any) -> dict[str, Any]:
    return dict(record.model_dump(mode="json"))


def _human(data: dict[str, Any]) -> str:
    keys = [
        "id", "name", "provider", "state", "resource_id", "capabilities", "resources",
        "last_error",
    ]  # fmt: skip
    lines = [f"{k}: {data[k]}" for k in keys if data.get(k) not in (None, [], {})]
    usage = [usage_line(data["usage"])] if data.get("usage", {}).get("runs") else []
    return "\n".join([*lines, *usage, *(f"warning: {w}" for w in data.get("warnings", []))])


@click.group()
def env() -> None:
    """Environments (local directory, worktree, Docker, E2B) that runs execute in."""


class _CreateCommand(click.Command):
    """``env create``, whose --help lists the config keys of ``--provider P`` (generated from
    the provider's pydantic model: types, defaults, each field's docstring)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --help is eager: it runs before --provider is parsed, so read it from the raw args
        for i, arg in enumerate(args):
            if arg == "--provider" and i + 1 < len(args):
                ctx.meta["help_provider"] = args[i + 1]
            elif arg.startswith("--provider="):
                ctx.meta["help_provider"] = arg.partition("=")[2]
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from narrative.errors import NarrativeError
        from providers.base import config_help
        from providers.registry import available, get_provider_class

        name = ctx.meta.get("help_provider")
        if name is None:
            with formatter.section("Providers (--provider P --help lists P's --config keys)"):
                formatter.write_dl([(p, "") for p in available()])
        else:
            try:
                rows = config_help(get_provider_class(name).config_model)
            except NarrativeError as exc:
                rows = [("(unavailable)", str(exc))]
            with formatter.section(
                f"--config keys of the {name} provider (KEY=VALUE; JSON values)"
            ):
                formatter.write_dl(rows)
        super().format_epilog(ctx, formatter)


@env.command("create", cls=_CreateCommand)
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--provider",
    help="Provider name (default: narrative.toml's profile or default, else the first that "
    "meets --require).",
)
@click.option("--require", default="", help="Comma-separated capabilities, e.g. gpu,python.")
@click.option("--config", "config_pairs", multiple=True, metavar="KEY=VALUE", help="Config.")
@click.option("--no-start", is_flag=True, help="Create without starting.")
@parallel_option
@json_option
@click.pass_context
def env_create(
    ctx: click.Context,
    names: tuple[str, ...],
    provider: str | None,
    require: str,
    config_pairs: tuple[str, ...],
    no_start: bool,
    parallel: int,
    as_json: bool,
) -> None:
    """Create environments NAMES (several alike, side by side), picking a provider that has
    the required capabilities.

    narrative.toml fills in what is not given: [environments.NAME] (provider, config,
    resources), [defaults] provider, [providers.P] base config and [resources] limits.
    With several names, the names and settings are checked before any is created, and one
    that fails does not stop the others (exit 1 when any failed).
    """
    manager = open_manager(ctx)
    progress = _Progress("created", len(names))
    outcomes = manager.create_many(
        names,
        provider=provider,
        config=parse_config(config_pairs),
        require=require.split(","),
        start=not no_start,
        workers=parallel,
        on_done=progress.done,
    )
    for outcome in outcomes:
        if not isinstance(outcome, Exception):
            which = f"{outcome.name}: " if len(names) > 1 else ""
            for warning in _warnings(manager, outcome):
                note(f"warning: {which}{warning}")
    _emit_outcomes(ctx, as_json, outcomes, lambda r: f"{r.name} ({r.provider}) {r.state.value}")


class _Progress:
    """One line on stderr per environment as it ends, counted (only when there are several)."""

    def __init__(self, verb: str, total: int) -> None:
        self.verb, self.total, self.ended = verb, total, 0

    def done(self, name: str, outcome: Any) -> None:
        if self.total < 2:
            return
        self.ended += 1  # (the GIL makes the count exact; only the order of lines may vary)
        what = f"failed: {outcome}" if isinstance(outcome, Exception) else self.verb
        note(f"[{self.ended}/{self.total}] {name} {what}")


def _emit_outcomes(
    ctx: click.Context, as_json: bool, outcomes: list[Any], line: Callable[[Any], str]
) -> None:
    """One environment as before; several as a list (the failed ones as errors on stderr)."""
    records = [o for o in outcomes if not isinstance(o, Exception)]
    failures = [o for o in outcomes if isinstance(o, Exception)]
    if len(outcomes) == 1:
        if failures:
            raise failures[0]
        record = records[0]
        emit(as_json, "environment", _row(record), line(record))
        return
    emit_list(
        as_json,
        "environment_list",
        [_row(r) for r in records],
        "\n".join(line(r) for r in records),
    )
    if failures:
        note(f"error: {len(failures)} of {len(outcomes)} environments failed")
        ctx.exit(1)


def _warnings(manager: EnvironmentManager, record: Any) -> list[str]:
    """The provider's isolation warnings, and the project's limits it cannot enforce."""
    found = list(manager.provider(record).warnings())
    if record.unenforced:
        asked = ", ".join(f"{k}={record.resources[k]}" for k in record.unenforced)
        found.append(f"resource limits not enforced by the {record.provider} provider: {asked}")
    return found


@env.command("list")
@click.option("--all", "include_archived", is_flag=True, help="Include archived environments.")
@json_option
@click.pass_context
def env_list(ctx: click.Context, include_archived: bool, as_json: bool) -> None:
    """List environments."""
    rows = [_row(r) for r in open_manager(ctx).environments(include_archived)]

    def human() -> str:
        return "\n".join(
            f"{r['name']:20} {r['provider']:10} {r['state']:14} {r['id']}" for r in rows
        )

    emit_list(as_json, "environment_list", rows, human)


@env.command("show")
@click.argument("name")
@json_option
@click.pass_context
def env_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one environment's record (with warnings about its isolation and what its runs
    cost)."""
    from gateway.hub.usage_records import environment_usage

    manager = open_manager(ctx)
    record = manager.get(name)
    usage = environment_usage(manager.store, record.name, record.created_at)
    data = {**_row(record), "warnings": _warnings(manager, record), "usage": usage}
    emit(as_json, "environment_detail", data, lambda: _human(data))


def _lifecycle(action: str, done: str, doc: str) -> click.Command:
    @click.argument("names", nargs=-1, required=True)
    @parallel_option
    @json_option
    @click.pass_context
    def command(ctx: click.Context, names: tuple[str, ...], parallel: int, as_json: bool) -> None:
        manager = open_manager(ctx)
        for name in names:  # every name must be known before any is acted on
            manager.get(name)
        act = getattr(manager, action)
        progress = _Progress(done, len(names))
        outcomes = manager.for_each(names, lambda i: act(names[i]), parallel, progress.done)
        _emit_outcomes(ctx, as_json, outcomes, lambda r: f"{r.name} {r.state.value}")

    command.__doc__ = doc
    return env.command(action)(command)


_lifecycle("start", "started", "Start (or resume) environments NAMES (several side by side).")
_lifecycle("stop", "stopped", "Stop environments NAMES, keeping their state.")
_lifecycle("restart", "restarted", "Stop and start environments NAMES.")
_lifecycle(
    "delete", "deleted", "Destroy environments' resources and archive their records (any state)."
)


@env.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@json_option
@click.pass_context
def env_exec(
    ctx: click.Context, name: str, command: tuple[str, ...], timeout: float | None, as_json: bool
) -> None:
    """Run a command in an environment (put it after --); exits with the command's code."""
    result = open_manager(ctx).exec(
        name, list(command), timeout=timeout, on_output=stream_output(as_json)
    )
    if as_json:
        emit(
            True, "exec_result", {"exit_code": result.exit_code, "timed_out": result.timed_out}, ""
        )
    if result.timed_out:
        note(f"command timed out after {timeout}s")
    ctx.exit(result.exit_code)


@env.command("logs")
@click.argument("name")
@click.option("--tail", type=click.IntRange(min=1), help="Only the last N lines.")
@click.option(
    "--runtime",
    "runtime_log",
    is_flag=True,
    help="The output of the hub's runtimes instead (copied from the environment first).",
)
@json_option
@click.pass_context
def env_logs(
    ctx: click.Context, name: str, tail: int | None, runtime_log: bool, as_json: bool
) -> None:
    """Show an environment's log: lifecycle events and command output, or with --runtime what
    the runtimes started in it printed."""
    logs = open_manager(ctx).logs
    lines = logs.runtime_lines(name, tail) if runtime_log else logs.lines(name, tail)
    emit_list(as_json, "log_line_list", lines, "\n".join(lines))


@env.command("health")
@click.argument("names", nargs=-1)
@json_option
@click.pass_context
def env_health(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Check environments now (all by default) and update their states."""
    reports = open_manager(ctx).check_health(names or None)
    rows = [
        {"name": r.name, "health": r.health, "state": r.state, "detail": r.detail} for r in reports
    ]

    def human() -> str:
        lines = [f"{r['name']:20} {r['health']:12} {r['state']}" for r in rows]
        return "\n".join(
            line + (f"  ({r['detail']})" if r["detail"] else "")
            for line, r in zip(lines, rows, strict=True)
        )

    emit_list(as_json, "health_list", rows, human)


@env.command("watch")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
    help="Seconds between health checks.",
)  # fmt: skip
@click.option("--count", type=click.IntRange(min=1), help="Stop after N checks.")
@click.pass_context
def env_watch(ctx: click.Context, interval: float, count: int | None) -> None:
    """Reconnect every environment, then check their health every --interval seconds."""
    import time

    manager = open_manager(ctx)
    for report in manager.reconnect_all():
        note(f"{report.name}: {report.health} ({report.state})")
    done = 0
    while count is None or done < count:
        time.sleep(interval)
        for report in manager.check_health():
            click.echo(f"{report.name:20} {report.health:12} {report.state}")
        done += 1


@env.command("sweep")
@json_option
@click.pass_context
def env_sweep(ctx: click.Context, as_json: bool) -> None:
    """Delete resources labelled with this store that no environment record knows."""
    swept = open_manager(ctx).sweep()
    emit_list(as_json, "swept_resource_list", swept, "\n".join(swept) or "nothing to sweep")


@env.group("image")
def env_image() -> None:
    """Images for the docker provider (built offline; nothing is ever pulled)."""


@env_image.command("build")
@click.option(
    "--tag", default=None, metavar="NAME:TAG",
    help="Image name (default: the docker provider's default image).",
)  # fmt: skip
@click.option("--base-url", default=None, help="Docker daemon address (default: DOCKER_HOST).")
@json_option
def env_image_build(tag: str | None, base_url: str | None, as_json: bool) -> None:
    """Build the default docker image: a skeleton that runs this host's Python and
    narrative, mounted read-only (env create builds it on first use; this rebuilds it)."""
    from providers.docker.client import build_default_image
    from providers.docker.config import DEFAULT_IMAGE

    name = tag or DEFAULT_IMAGE
    image_id = build_default_image(name, base_url)
    emit(as_json, "image", {"image": name, "id": image_id}, f"built {name} ({image_id[:19]})")


COMMANDS = [env]
