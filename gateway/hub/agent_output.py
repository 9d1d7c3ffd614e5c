"""An agent's output as events, byte for byte: text while it is UTF-8, base64 when not.

Output arrives in chunks cut wherever the pipe was read, so a multi-byte character may be split
across two chunks: its first bytes are held back until the rest arrives, and text stays text.
Bytes that are not UTF-8 travel as ``data64``, so the run's event log holds exactly what the
agent wrote (a terminal, a binary dump, a Latin-1 file printed by mistake).
"""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["OutputEncoder", "output_bytes"]

_MAX_CHAR = 4  # bytes of the longest UTF-8 character


class OutputEncoder:
    """Encodes the chunks of one output stream as event fields (``data`` or ``data64``)."""

    def __init__(self) -> None:
        self._carry = b""

    def encode(self, chunk: bytes) -> dict[str, str] | None:
        """The fields for ``chunk`` (None when it only began a character)."""
        data, self._carry = self._carry + chunk, b""
        try:
            return {"data": data.decode("utf-8")}
        except UnicodeDecodeError as exc:
            cut = exc.reason == "unexpected end of data" and len(data) - exc.start < _MAX_CHAR
            if not cut:
                return {"data64": base64.b64encode(data).decode("ascii")}
            # Everything before the first error is valid: send it, keep the cut character.
            head, self._carry = data[: exc.start], data[exc.start :]
            return {"data": head.decode("utf-8")} if head else None

    def flush(self) -> dict[str, str] | None:
        """The fields for bytes still held back when the stream ended (None if there are none)."""
        data, self._carry = self._carry, b""
        return {"data64": base64.b64encode(data).decode("ascii")} if data else None


def output_bytes(event: dict[str, Any]) -> bytes:
    """The bytes an ``agent.output`` event carries."""
    if "data64" in event:
        return base64.b64decode(str(event["data64"]))
    return str(event.get("data", "")).encode("utf-8")
