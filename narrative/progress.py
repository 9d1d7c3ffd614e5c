"""Progress of long operations, reported to whoever listens (the CLI draws bars on a terminal).

Library code never prints. It announces a stage (``with stage("hashing", total, "bytes") as
advance:``) and advances it; with no reporter installed (the default, and always in library
use) that costs one global read. The reporter is process-wide rather than a context variable
because hashing and restoring run on worker threads, which do not inherit context variables;
its methods must therefore be thread-safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = ["Reporter", "ignore", "installed", "stage"]


class Reporter(Protocol):
    """Receives stages and their advances (from several threads at once)."""

    def start(self, label: str, total: int | None, unit: str) -> None:
        """A stage begins: ``total`` units of ``unit`` (``files`` or ``bytes``), None unknown."""

    def advance(self, amount: int) -> None:
        """``amount`` more units of the current stage are done."""

    def finish(self) -> None:
        """The current stage ended."""


#: the installed reporter, in a one-slot list so that :func:`installed` can swap it
_installed: list[Reporter | None] = [None]


def ignore(_amount: int) -> None:
    """An advance that goes nowhere (what :func:`stage` yields when nobody listens)."""


@contextlib.contextmanager
def stage(
    label: str, total: int | None = None, unit: str = "files"
) -> Iterator[Callable[[int], None]]:
    """Announce a stage; yields the function that advances it."""
    reporter = _installed[0]
    if reporter is None:
        yield ignore
        return
    reporter.start(label, total, unit)
    try:
        yield reporter.advance
    finally:
        reporter.finish()


@contextlib.contextmanager
def installed(reporter: Reporter | None) -> Iterator[None]:
    """Send every stage to ``reporter`` while the block runs (None: to nobody)."""
    previous, _installed[0] = _installed[0], reporter
    try:
        yield
    finally:
        _installed[0] = previous
