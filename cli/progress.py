"""Progress bars for long transfers: rich on a terminal, nothing when piped, --json or -q."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click

__all__ = ["progress_callback"]


@contextlib.contextmanager
def progress_callback(ctx: click.Context, label: str, enabled: bool = True) -> Iterator[Any]:
    """An fsspec Callback drawing a byte progress bar, or None when no bar should show."""
    quiet = (ctx.find_root().obj or {}).get("quiet")
    if not enabled or quiet or not sys.stderr.isatty():
        yield None
        return
    from fsspec.callbacks import Callback
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    with Progress(
        f"[bold]{label}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=_stderr_console(),
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)

        class _Bar(Callback):  # type: ignore[misc]
            def set_size(self, size: int | None) -> None:
                progress.update(task, total=size)

            def relative_update(self, inc: int = 1) -> None:
                progress.update(task, advance=inc)

        yield _Bar()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
