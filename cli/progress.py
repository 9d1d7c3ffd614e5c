"""Progress on a terminal: the stages the packages announce (:mod:`narrative.progress`:
files scanned, bytes hashed, files restored, bytes sent and received) drawn as a rich bar on
stderr with rate and ETA; nothing when stderr is not a terminal, with ``--json`` or ``-q``."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

__all__ = ["reporting"]


@contextlib.contextmanager
def reporting(enabled: bool = True) -> Iterator[None]:
    """Show the progress of whatever runs in the block (see the module docstring); the bar is
    only on screen while a stage runs, so commands that stream output are not disturbed, and
    rich is imported only when a stage starts (every command runs in this block)."""
    from narrative.progress import installed

    if not enabled or not sys.stderr.isatty():
        yield
        return
    reporter = _RichReporter()
    try:
        with installed(reporter):
            yield
    finally:
        reporter.finish()


def _bar() -> Any:
    """The rich progress display: label, bar, amount, rate and ETA, per the stage's unit."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Amount(ProgressColumn):
        """``12.3/40.0 MB`` for bytes, ``120/4000 files`` (or ``120 files``) for files."""

        def render(self, task: Any) -> Any:
            if task.fields.get("unit") == "bytes":
                return DownloadColumn().render(task)
            total = f"/{int(task.total)}" if task.total is not None else ""
            return Text(f"{int(task.completed)}{total} files")

    class Rate(ProgressColumn):
        """``4.2 MB/s`` for bytes, ``350 files/s`` for files."""

        def render(self, task: Any) -> Any:
            if task.fields.get("unit") == "bytes":
                return TransferSpeedColumn().render(task)
            return Text(f"{task.speed:.0f} files/s" if task.speed else "")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        Amount(),
        Rate(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )


class _RichReporter:
    """A rich task per stage, the display live only during one (``-q``, which may come after
    the subcommand, is read when a stage starts); thread-safe (workers advance stages)."""

    def __init__(self) -> None:
        self._bar: Any = None  # built at the first stage
        self._lock = threading.Lock()
        self._task: Any = None

    def start(self, label: str, total: int | None, unit: str) -> None:
        ctx = click.get_current_context(silent=True)
        if ctx is not None and (ctx.find_root().obj or {}).get("quiet"):
            return
        with self._lock:
            if self._bar is None:
                self._bar = _bar()
            if self._task is None:
                self._bar.start()
            else:  # a stage inside a stage: the inner one replaces it on screen
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(label, total=total, unit=unit)

    def advance(self, amount: int) -> None:
        task = self._task
        if task is not None:
            self._bar.update(task, advance=amount)

    def finish(self) -> None:
        with self._lock:
            if self._task is not None:
                self._bar.remove_task(self._task)
                self._task = None
                self._bar.stop()
