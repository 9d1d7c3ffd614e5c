"""Output conventions shared by every command.

``--json`` prints exactly one JSON document on stdout; human text goes to stdout without it;
notes, warnings and logs always go to stderr. ``NO_COLOR`` is honoured by rich.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

__all__ = ["emit", "json_option", "note"]


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
