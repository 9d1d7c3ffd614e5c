"""Small crash-safe file helpers shared by the store's writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time

__all__ = [
    "WORKSPACE_TMP_PREFIX",
    "fsync_dir",
    "is_locked",
    "is_workspace_tmp",
    "mkstemp",
    "remove_stale_workspace_tmp",
    "unlink_quiet",
    "write_atomic",
]

WORKSPACE_TMP_PREFIX = ".narrative-tmp-"
"""Prefix of the temporary files restore, merge and the gateway write next to their targets
in a workspace (then rename over them): never snapshotted, and removed once stale."""
_WORKSPACE_TMP = re.compile(re.escape(WORKSPACE_TMP_PREFIX) + r"[0-9a-f]{16}")
_STALE_TMP_SECONDS = 10.0


def is_workspace_tmp(name: str) -> bool:
    """Whether a file name is one of our in-flight temporary files."""
    return _WORKSPACE_TMP.fullmatch(name) is not None


def remove_stale_workspace_tmp(path: str, mtime_ns: int) -> None:
    """Remove a temporary file left by a killed writer (no change for a while: a live writer
    renames it within moments of its last write)."""
    if time.time() - mtime_ns / 1e9 > _STALE_TMP_SECONDS:
        unlink_quiet(path)


def mkstemp(prefix: str, dir: str) -> tuple[int, str]:
    """Create a new file ``dir/prefix<random>`` (mode 0600), like :func:`tempfile.mkstemp`.

    Kept here so the store's writers do not import :mod:`tempfile` (which pulls in ``random``,
    ``shutil`` and the compression modules): that import is a measurable part of a short CLI
    command such as ``narrative merge``.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        path = os.path.join(dir, prefix + os.urandom(8).hex())
        try:
            return os.open(path, flags, 0o600), os.path.abspath(path)
        except FileExistsError:
            continue


def unlink_quiet(path: str) -> None:
    """Remove a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new content, never a mix."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = mkstemp(".tmp-", directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


def is_locked(path: str) -> bool:
    """Whether a live process holds an exclusive ``flock`` on ``path`` (a file that cannot be
    opened is locked by nobody); the kernel drops such a lock when its holder dies."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
