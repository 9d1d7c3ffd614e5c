"""Output conventions shared by every command.

``--json`` prints exactly one JSON document on stdout; human text goes to stdout without it;
notes, warnings and logs always go to stderr. ``NO_COLOR`` is honoured by rich.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

__all__ = ["emit", "fail", "json_option", "note", "usage_line"]


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` to a command."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(func)


def emit(as_json: bool, data: Any, human: str | Callable[[], str]) -> None:
    """Print the command's result: JSON, or the human rendering."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return
    text = human() if callable(human) else human
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def note(message: str) -> None:
    """A remark for the person at the terminal (stderr, never mixed into results; off with -q)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.find_root().obj or {}).get("quiet"):
        return
    click.echo(message, err=True)


def fail(as_json: bool, code: str, message: str, exit_code: int) -> NoReturn:
    """End the command with an error: ``{"error": {"code", "message"}}`` on stdout with
    ``--json`` (so a script reads one document either way), else one line on stderr (a usage
    error has already shown click's usage text)."""
    if as_json:
        sys.stdout.write(json.dumps({"error": {"code": code, "message": message}}) + "\n")
    elif code != "usage":
        click.echo(f"narrative: error: {message}", err=True)
    sys.exit(exit_code)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def usage_line(usage: dict[str, Any]) -> str:
    """A usage record (``providers.usage``) in a line or two: ``usage: 3.2 s wall, ...``."""

    def part(key: str, text: Callable[[Any], str], what: str) -> str:
        value = usage.get(key)
        return text(value) if isinstance(value, int | float) else f"{what} unknown"

    parts = [
        part("wall_seconds", lambda v: f"{v:.1f} s wall", "wall"),
        part("cpu_seconds", lambda v: f"{v:.1f} s CPU", "CPU"),
        part("peak_memory_bytes", lambda v: f"{_size(v)} peak", "peak"),
        part("bytes_to_environment", lambda v: f"{_size(v)} in", "in")
        + " / "
        + part("bytes_from_environment", lambda v: f"{_size(v)} out", "out"),
    ]
    runs = f" over {usage['runs']} run(s)" if "runs" in usage else ""
    line = f"usage{runs}: {', '.join(parts)} (measured by {usage.get('measured_by')})"
    phases = usage.get("phases") or {}
    if phases:
        line += "\nphases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    return line
