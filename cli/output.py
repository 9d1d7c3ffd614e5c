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

__all__ = ["emit", "fail", "json_option", "note"]


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
