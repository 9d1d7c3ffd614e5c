"""Identifiers for objectives, threads, runs and snapshots.

Ids are ``<kind>-<20 chars>``: 10 random Crockford base32 characters followed by 10 of
millisecond time. Random first, so that a short prefix (as with git commit ids) is enough to name
one; unique across machines without coordination; never changed once written into git objects.
"""

from __future__ import annotations

import os
import re
import time

from .errors import InvalidInput

__all__ = ["KINDS", "RULE_KEY_PATTERN", "is_id", "new_id", "validate_id"]

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
KINDS = {
    "objective": "obj",
    "thread": "th",
    "run": "run",
    "snapshot": "snap",
    "environment": "env",
    "workspace": "ws",
}
_SEG = r"(?:\*|[A-Za-z0-9_][A-Za-z0-9._-]{0,63})"
#: A capability routing key (``type``, ``type:action``, with ``*`` allowed for either segment):
#: the key of a ``proxyExecution.json`` rule and a route of a hybrid environment, named here
#: so that the gateway and the providers, which may not import each other, share one pattern.
RULE_KEY_PATTERN = rf"^{_SEG}(?::{_SEG})?$"
_ID_RE = re.compile(r"^(obj|th|run|snap|env|ws)-[0-9a-hjkmnp-tv-z]{20}$")


def _random_bits50() -> int:
    """50 random bits from the OS (as ``secrets.randbits(50)``, without importing secrets,
    which pulls in ``random``, ``hmac`` and ``base64`` on every CLI start)."""
    return int.from_bytes(os.urandom(7), "big") >> 6


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(kind: str) -> str:
    """A fresh id for ``kind`` (one of :data:`KINDS`)."""
    prefix = KINDS[kind]
    return f"{prefix}-{_b32(_random_bits50(), 10)}{_b32(time.time_ns() // 1_000_000, 10)}"


def is_id(value: str, kind: str | None = None) -> bool:
    """Whether ``value`` is a well-formed id (of ``kind`` if given)."""
    if not _ID_RE.match(value):
        return False
    return kind is None or value.startswith(KINDS[kind] + "-")


def validate_id(value: str, kind: str) -> str:
    """Return ``value`` if it is a well-formed id of ``kind``, else raise InvalidInput."""
    if not is_id(value, kind):
        raise InvalidInput(f"malformed {kind} id: {value!r}")
    return value
