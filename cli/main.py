"""The ``narrative`` command: a git-like group of subcommands.

Exit codes: 0 ok, 1 for a NarrativeError (one clear line on stderr, no traceback), 2 for usage.
Heavy modules are imported inside commands so that ``narrative snapshot`` starts fast.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import click

from narrative.errors import NarrativeError

from .help import add_example, format_sections
from .output import fail
from .progress import reporting

__all__ = ["COMMAND_MODULES", "cli", "main"]


def _before_double_dash(args: list[str]) -> list[str]:
    """The arguments that belong to narrative (after ``--`` they belong to the command run)."""
    return args[: args.index("--")] if "--" in args else args


#: Each top-level command → the module below ``cli`` that defines it, in ``narrative --help``
#: registration order. A command's module is imported when the command is looked up, so one
#: command's start-up does not pay for every other command's imports (``narrative info``, and
#: the runtime each run starts in its environment, load one module of the ten).
COMMAND_MODULES: dict[str, str] = {
    **dict.fromkeys(
        ("init", "info", "status", "snapshot", "log", "show", "diff", "restore", "watch"),
        "core_commands",
    ),
    **dict.fromkeys(("config", "gc", "fsck"), "maintenance_commands"),
    **dict.fromkeys(("objective", "thread"), "hierarchy_commands"),
    "run": "run_commands",
    **dict.fromkeys(("export", "import", "remote", "push", "fetch", "pull"), "transfer_commands"),
    "merge": "merge_commands",
    "env": "env_commands",
    "gateway": "gateway_commands",
    **dict.fromkeys(("serve", "runtime"), "hub_commands"),
    "hub": "team_commands",
}


class _Group(click.Group):
    """Errors in one place: a NarrativeError is one line and exit 1, a usage error exit 2;
    with ``--json`` anywhere before ``--``, either is ``{"error": {"code", "message"}}`` on
    stdout instead (see :func:`cli.output.fail`).

    Commands are loaded on demand (:data:`COMMAND_MODULES`): :meth:`get_command` imports the
    module of the one command asked for; :attr:`commands` is every command (all imported)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loaded: dict[str, click.Command] = {}
        super().__init__(*args, **kwargs)

    @property
    def commands(self) -> MutableMapping[str, click.Command]:
        for module in dict.fromkeys(COMMAND_MODULES.values()):
            self._load(module)
        return self._loaded

    @commands.setter
    def commands(self, value: MutableMapping[str, click.Command]) -> None:
        self._loaded = dict(value)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._loaded and cmd_name in COMMAND_MODULES:
            self._load(COMMAND_MODULES[cmd_name])
        return self._loaded.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMAND_MODULES, *self._loaded})

    def _load(self, module_name: str) -> None:
        module = importlib.import_module(f"{__package__}.{module_name}")
        for command in module.COMMANDS:
            name = command.name or ""
            if name in self._loaded:
                continue
            _global_options(command)
            add_example(command, name)
            self._loaded[name] = command

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


class RunInstead(BaseException):
    """Raised in a process that is to run the CLI anew with ``args`` (a runtime forked by the
    warm runtime, :mod:`providers.zygote`): it unwinds the command it interrupts."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.argv = args


def main() -> None:
    """Console-script entry point."""
    status = [1]  # an exception other than SystemExit: Python's own exit status for it
    atexit.register(_end_now, status)
    args: list[str] | None = None
    while True:
        try:
            cli(args=args, prog_name="narrative")
        except RunInstead as instead:
            args = instead.argv
        except SystemExit as exc:
            code = exc.code
            status[0] = 0 if code is None else code if isinstance(code, int) else 1
            raise


def _end_now(status: list[int]) -> None:
    """End the process without the interpreter's teardown (freeing every module and object:
    10-20 ms of a 70 ms command). Registered first, this runs last of the exit handlers
    (they run last in, first out), after Python printed any error, joined the non-daemon
    threads and ran every other handler (logging's flush, ``weakref.finalize``...)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(status[0])


if __name__ == "__main__":  # pragma: no cover
    main()
