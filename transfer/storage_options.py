"""Storage options: the ``KEY=VALUE`` pairs of ``--storage-option`` and the
``NARRATIVE_STORAGE_*`` environment variables parsed into the nested dicts fsspec takes,
deep-merged by priority, and flattened back (credentials shown as ``***``) for listings.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from narrative.errors import InvalidInput
from narrative.jsonio import parse_json

__all__ = [
    "flat_storage_options",
    "merge_storage_options",
    "parse_storage_options",
    "storage_options_from_env",
]


_OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _parse_value(text: str) -> Any:
    try:
        return parse_json(text)
    except ValueError:
        return text


def _assign(tree: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise InvalidInput(f"storage option {source}: {where!r} is already set to a value")
        node = child
    last = keys[-1]
    if isinstance(node.get(last), dict) and isinstance(value, dict):
        node[last] = merge_storage_options(node[last], value)
    else:
        node[last] = value


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (the CLI's ``--storage-option``) into storage options.

    Values are JSON when they parse as JSON (numbers, ``true``/``false``, ``null``, objects,
    quoted strings) and plain strings otherwise. Dots in the key nest:
    ``client_kwargs.endpoint_url=http://127.0.0.1:9000`` gives
    ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``. A later pair overrides
    an earlier one; JSON objects merge with keys set before them.

    Args:
        pairs: The ``KEY=VALUE`` strings, in command-line order.

    Returns:
        The nested options dict.

    Raises:
        InvalidInput: A pair has no ``=``, an empty or malformed key, or nests below a key
            that already holds a plain value.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if not isinstance(pair, str):
            raise InvalidInput(f"storage option must be a KEY=VALUE string, got {pair!r}")
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise InvalidInput(f"storage option {pair!r} is not KEY=VALUE")
        keys = key.split(".")
        if not all(_OPTION_KEY.fullmatch(k) for k in keys):
            raise InvalidInput(
                f"storage option {pair!r}: key {key!r} must be dot-separated names "
                "(letters, digits, '_' or '-')"
            )
        _assign(out, keys, _parse_value(raw), repr(pair))
    return out


def storage_options_from_env(
    prefix: str = "NARRATIVE_STORAGE_", *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Collect storage options from environment variables.

    ``NARRATIVE_STORAGE_KEY=abc`` gives ``{"key": "abc"}``; a double underscore nests, so
    ``NARRATIVE_STORAGE_CLIENT_KWARGS__ENDPOINT_URL=http://...`` gives
    ``{"client_kwargs": {"endpoint_url": "http://..."}}``. Keys are lowercased; values are
    parsed like :func:`parse_storage_options` values.

    Args:
        prefix: The variable-name prefix to collect.
        environ: The environment to read (default: ``os.environ``).

    Returns:
        The nested options dict (empty when no variable matches).

    Raises:
        InvalidInput: A variable has an empty or malformed key, or conflicts with another.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        keys = name[len(prefix) :].lower().split("__")
        if not all(_OPTION_KEY.fullmatch(k) for k in keys):
            raise InvalidInput(
                f"environment variable {name}: expected {prefix}KEY or {prefix}KEY__SUBKEY"
            )
        _assign(out, keys, _parse_value(env[name]), name)
    return out


def merge_storage_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two option dicts, ``override`` winning (e.g. env defaults, then CLI flags).

    Args:
        base: The lower-priority options.
        override: The higher-priority options.

    Returns:
        A new dict; nested dicts are merged key by key, anything else is replaced.
    """
    out: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = merge_storage_options(out[key], value)
        else:
            out[key] = value
    return out


#: option names that hold credentials (``key``/``secret``/``token`` of s3fs, botocore's
#: ``aws_secret_access_key``, passwords...): shown as ``***``, never printed
_SECRET_OPTION = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?)(_|$)", re.I)


def flat_storage_options(options: Mapping[str, Any], *, redact: bool = True) -> dict[str, str]:
    """Options as the dotted ``KEY=VALUE`` pairs ``--storage-option`` takes, with the values
    of credential options replaced by ``***`` (for listings and logs)."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            for sub, text in flat_storage_options(value, redact=redact).items():
                out[f"{key}.{sub}"] = text
        elif redact and _SECRET_OPTION.search(str(key)):
            out[str(key)] = "***"
        else:
            out[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return out
