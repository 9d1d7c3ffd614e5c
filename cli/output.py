"""Output conventions shared by every command.

``--json`` prints exactly one JSON document on stdout; human text goes to stdout without it;
notes, warnings and logs always go to stderr. ``NO_COLOR`` is honoured by rich.

Every JSON document is an object whose ``"kind"`` names its shape (one hand-written JSON Schema
per kind in ``docs/schema/``); a list is ``{"kind": "<item>_list", "items": [...]}``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import click

__all__ = [
    "emit",
    "emit_list",
    "fail",
    "json_document",
    "json_option",
    "note",
    "quiet",
    "table",
    "usage_line",
]


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` to a command."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(func)


def json_document(kind: str, data: Mapping[str, Any], indent: int | None = 2) -> str:
    """``data`` as the JSON document of ``kind``: ``{"kind": kind, **data}``."""
    if data.get("kind", kind) != kind:  # a field of the record would hide the document's kind
        raise ValueError(f"a {kind} document cannot have a field named kind")
    return json.dumps({"kind": kind, **data}, indent=indent)


def emit(as_json: bool, kind: str, data: Mapping[str, Any], human: str | Callable[[], str]) -> None:
    """Print the command's result: the JSON document of ``kind``, or the human rendering."""
    if as_json:
        sys.stdout.write(json_document(kind, data) + "\n")
        return
    text = human() if callable(human) else human
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def emit_list(
    as_json: bool, kind: str, items: Sequence[Any], human: str | Callable[[], str]
) -> None:
    """Print a list: ``{"kind": kind, "items": [...]}`` (``kind`` ends in ``_list``)."""
    emit(as_json, kind, {"items": list(items)}, human)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as space-separated columns, ``-`` for a missing value (for people, not scripts)."""
    return "\n".join(
        "  ".join(str(r.get(c) if r.get(c) is not None else "-") for c in columns) for r in rows
    )


def quiet() -> bool:
    """Whether ``-q`` was given (anywhere before ``--``)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and (ctx.find_root().obj or {}).get("quiet"))


def note(message: str) -> None:
    """A remark for the person at the terminal (stderr, never mixed into results; off with -q)."""
    if not quiet():
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
