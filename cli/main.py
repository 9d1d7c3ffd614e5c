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

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Turns NarrativeError into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NarrativeError as exc:
            click.echo(f"narrative: error: {exc}", err=True)
            ctx.exit(1)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # every store write is staged and published by rename: the store stays valid
            where = f" writing {exc.filename}" if exc.filename else ""
            click.echo(
                f"narrative: error: no space left on device{where}; the operation was "
                "abandoned and the store is still valid (free some space and retry)",
                err=True,
            )
            ctx.exit(1)


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
    if verbose or quiet:
        # Imported only on demand: logging costs a noticeable share of start-up time.
        import logging

        level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO
        logging.basicConfig(
            level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
    if directory:
        try:
            os.chdir(directory)
        except OSError as exc:
            raise click.UsageError(f"cannot change to {directory}: {exc.strerror}") from exc
    ctx.ensure_object(dict)
    ctx.obj["store_dir"] = store_dir
    ctx.obj["quiet"] = quiet


def _register() -> None:
    from . import (
        core_commands,
        env_commands,
        gateway_commands,
        hierarchy_commands,
        hub_commands,
        merge_commands,
        transfer_commands,
    )

    modules = (
        core_commands,
        hierarchy_commands,
        transfer_commands,
        merge_commands,
        env_commands,
        gateway_commands,
        hub_commands,
    )
    for module in modules:
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="narrative")


if __name__ == "__main__":  # pragma: no cover
    main()
