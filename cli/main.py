"""The ``narrative`` command: a git-like group of subcommands.

Exit codes: 0 ok, 1 for a NarrativeError (one clear line on stderr, no traceback), 2 for usage.
Heavy modules are imported inside commands so that ``narrative snapshot`` starts fast.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import click

from narrative.errors import NarrativeError

from .help import add_example, format_sections
from .output import fail
from .progress import reporting

__all__ = ["cli", "main"]


def _before_double_dash(args: list[str]) -> list[str]:
    """The arguments that belong to narrative (after ``--`` they belong to the command run)."""
    return args[: args.index("--")] if "--" in args else args


class _Group(click.Group):
    """Errors in one place: a NarrativeError is one line and exit 1, a usage error exit 2;
    with ``--json`` anywhere before ``--``, either is ``{"error": {"code", "message"}}`` on
    stdout instead (see :func:`cli.output.fail`)."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # embedded use (click's CliRunner, tests): click's own way
            return super().main(args, prog_name, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in _before_double_dash(argv)
        try:
            with reporting(enabled=not as_json):
                code = super().main(argv, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if not as_json:
                exc.show()
            fail(as_json, "usage", exc.format_message(), exc.exit_code)
        except click.ClickException as exc:
            fail(as_json, "usage", exc.format_message(), exc.exit_code)
        except click.Abort:
            fail(as_json, "aborted", "aborted", 1)
        except NarrativeError as exc:
            fail(as_json, exc.code, str(exc), 1)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(1)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # every store write is staged and published by rename: the store stays valid
            where = f" writing {exc.filename}" if exc.filename else ""
            message = (
                f"no space left on device{where}; the operation was abandoned and the store "
                "is still valid (free some space and retry)"
            )
            fail(as_json, "no_space", message, 1)
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_sections(self, ctx, formatter)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-C", "directory", type=click.Path(file_okay=False), help="Run as if started in DIR.")
@click.option(
    "--store",
    "store_dir",
    envvar="NARRATIVE_STORE",
    type=click.Path(file_okay=False),
    help="Store directory (default: the store of the workspace marked by the nearest "
    ".narrative/, kept in the per-user data directory; env NARRATIVE_STORE).",
)
@click.option("-v", "--verbose", count=True, help="More logging on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(package_name="narrative-engine")
@click.pass_context
def cli(
    ctx: click.Context, directory: str | None, store_dir: str | None, verbose: int, quiet: bool
) -> None:
    """Snapshot, ship, restore, diff and merge agent workspaces."""
    ctx.ensure_object(dict)
    ctx.obj["store_dir"] = store_dir
    ctx.obj["quiet"] = False
    _set_verbosity(ctx, verbose, quiet)
    _change_directory(directory)


def _set_verbosity(ctx: click.Context, verbose: int, quiet: bool) -> None:
    if not (verbose or quiet):
        return
    # Imported only on demand: logging costs a noticeable share of start-up time.
    import logging

    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    if quiet:
        ctx.find_root().obj["quiet"] = True


def _change_directory(directory: str | None) -> None:
    if directory:
        try:
            os.chdir(directory)
        except OSError as exc:
            raise click.UsageError(f"cannot change to {directory}: {exc.strerror}") from exc


def _global_options(command: click.Command) -> None:
    """The global options work after the subcommand too (``narrative log -q``, ``narrative
    run list -C DIR``), as hidden options of every command; after ``--`` nothing is parsed, so
    ``run start -- python -v`` keeps its ``-v``."""

    def store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.find_root().obj["store_dir"] = value

    def verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            _set_verbosity(ctx, value if param.name == "verbose" else 0, param.name == "quiet")

    def directory(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        _change_directory(value)

    path = click.Path(file_okay=False)
    command.params += [
        click.Option(["-C", "directory"], type=path, hidden=True, expose_value=False,
                     callback=directory, is_eager=True),
        click.Option(["--store", "store_dir"], type=path, hidden=True, expose_value=False,
                     callback=store),
        click.Option(["-v", "--verbose"], count=True, hidden=True, expose_value=False,
                     callback=verbosity),
        click.Option(["-q", "--quiet"], is_flag=True, hidden=True, expose_value=False,
                     callback=verbosity),
    ]  # fmt: skip
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _global_options(sub)


def _register() -> None:
    from . import (
        core_commands,
        env_commands,
        gateway_commands,
        hierarchy_commands,
        hub_commands,
        maintenance_commands,
        merge_commands,
        run_commands,
        team_commands,
        transfer_commands,
    )

    modules = (
        core_commands,
        maintenance_commands,
        hierarchy_commands,
        run_commands,
        transfer_commands,
        merge_commands,
        env_commands,
        gateway_commands,
        hub_commands,
        team_commands,
    )
    for module in modules:
        for command in module.COMMANDS:
            _global_options(command)
            add_example(command, command.name or "")
            cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="narrative")


if __name__ == "__main__":  # pragma: no cover
    main()
