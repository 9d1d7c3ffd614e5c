"""Small crash-safe file helpers shared by the store's writers."""

from __future__ import annotations

import contextlib
import os

__all__ = ["fsync_dir", "mkstemp", "unlink_quiet", "write_atomic"]


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
