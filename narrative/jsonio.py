"""JSON parsing for input that may be hostile (remote indexes, tokens, records, frames).

``json.loads`` raises ``RecursionError`` on a deeply nested document, which callers that catch
``ValueError`` for bad input let through as a traceback. Every reader of the package parses
through :func:`parse_json`, so that all of them refuse such a document the same way; a test
keeps any other ``json.load``/``json.loads`` call from coming back.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import IO, Any

__all__ = ["load_json", "parse_json"]


def parse_json(data: str | bytes | bytearray, **options: Any) -> Any:
    """``json.loads`` (with its keyword ``options``) that signals every kind of bad input as
    ``ValueError`` (including ``UnicodeDecodeError`` and a document nested too deeply)."""
    try:
        return json.loads(data, **options)
    except RecursionError:
        raise ValueError("JSON document nested too deeply") from None


def load_json(f: IO[bytes] | IO[str]) -> Any:
    """:func:`parse_json` of a whole open file."""
    return parse_json(f.read())
