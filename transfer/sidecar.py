"""The ``.sha256`` sidecar, which marks an artifact as published, and the names kept beside
artifacts.

An artifact at ``URL`` is a data object plus a sidecar ``URL.sha256`` holding its sha256 in
``sha256sum`` format. **An artifact counts as published exactly when its sidecar exists**: the
sidecar is written last, after the data is complete and visible under its final name;
overwriting an artifact first removes the old sidecar (:func:`unpublish`), so no reader ever
pairs new data with an old digest (it sees "not published" for that moment instead); removing
an artifact removes the sidecar first. Names ending in ``.sha256`` or ``.lock`` and hidden
``.<name>.<hex>.tmp`` files are the storage layer's bookkeeping: they are never listed as
artifacts and cannot be published to (:func:`check_artifact_path`).
"""

from __future__ import annotations

import logging

from fsspec import AbstractFileSystem

from .fsio import put_small, read_capped, rm_if_exists
from .storage_base import (
    LOCK_SUFFIX,
    SIDECAR_SUFFIX,
    TMP_SUFFIX,
    check_artifact_path,
    redact,
    sidecar_text,
)
from .verified_local import HEX64, SIDECAR_LIMIT, not_published, parse_sidecar

__all__ = [
    "HEX64",
    "SIDECAR_SUFFIX",
    "check_artifact_path",
    "is_bookkeeping",
    "not_published",
    "read_sidecar",
    "restore_sidecar",
    "sidecar_text",
    "unpublish",
]

logger = logging.getLogger(__name__)


def is_bookkeeping(name: str) -> bool:
    """Whether ``name`` is a sidecar, lock, temporary or stale-lock file, never an artifact."""
    return (
        name.endswith((SIDECAR_SUFFIX, LOCK_SUFFIX))
        or (name.startswith(".") and name.endswith(TMP_SUFFIX))
        or ".stale-" in name
    )


def read_sidecar(fs: AbstractFileSystem, path: str, url: str) -> str | None:
    """The digest recorded for ``path``, or None when it is not published."""
    try:
        raw = read_capped(fs, path + SIDECAR_SUFFIX, SIDECAR_LIMIT, url + SIDECAR_SUFFIX)
    except FileNotFoundError:
        return None
    return parse_sidecar(raw, url)


def unpublish(fs: AbstractFileSystem, side: str) -> bytes | None:
    """Remove a sidecar before its data is replaced; return its old content, if any."""
    try:
        old = bytes(fs.cat_file(side))
    except FileNotFoundError:
        return None
    rm_if_exists(fs, side)
    return old


def restore_sidecar(fs: AbstractFileSystem, side: str, content: bytes, url: str) -> None:
    """Put an old sidecar back after a failed overwrite (logged, never raised)."""
    try:
        put_small(fs, side, content)
    except Exception:
        logger.warning("could not restore the sidecar of %s", redact(url), exc_info=True)
