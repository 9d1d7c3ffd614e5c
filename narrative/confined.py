"""File access confined to one directory, immune to symlink swaps.

Checking a path and then opening it by name loses to an attacker who swaps a directory for a
symlink in between. :class:`ConfinedRoot` never opens by name from outside: it opens the root
once per operation and then each component relative to its parent's file descriptor
(``os.open(name, flags, dir_fd=parent)``) with ``O_NOFOLLOW`` (and ``O_DIRECTORY`` for
directories), so whatever is swapped in, no symlink is ever followed and nothing outside the
root is ever reached. Paths must pass the path rule (:func:`narrative.paths.check_path`) first,
so ``.git`` and the top-level ``.narrative`` are out of reach too.

Writes go to a temporary name in the target's own directory and are renamed over it relative
to that directory's descriptor, so readers see the old or the new content, never a mix, and a
symlink in the target's place is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import InvalidInput, UnsafePath
from .fsutil import WORKSPACE_TMP_PREFIX
from .paths import check_path, is_safe_path

__all__ = ["ConfinedRoot", "Entry"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO planted in the root must not hang the caller.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC


@dataclass(frozen=True)
class Entry:
    """One entry of :meth:`ConfinedRoot.walk`: its path below the root, kind and size."""

    path: str
    kind: str  # "dir", "file", "symlink" or "other"
    size: int


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file" if stat.S_ISREG(mode) else "other"


class ConfinedRoot:
    """Reads and writes below ``root`` through directory descriptors only.

    Args:
        root: The directory (it is resolved once, here; the root itself is trusted).

    Every method takes a ``/``-separated path relative to the root and raises
    :class:`~narrative.errors.UnsafePath` for a path the path rule refuses or one that runs
    into a symlink; ``FileNotFoundError``/``NotADirectoryError`` when a component is missing
    or is not a directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise InvalidInput(f"{root} is not a directory")

    def _open_root(self) -> int:
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)

    def _descend(self, parts: list[str], path: str, *, create: bool) -> int:
        """Open the directory ``parts`` below the root, one component at a time."""
        fd = self._open_root()
        try:
            for depth, part in enumerate(parts):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):  # a racing creator is fine
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise self._refusal(exc, fd, path, parts[: depth + 1]) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _refusal(exc: OSError, dir_fd: int, path: str, parts: list[str]) -> OSError | UnsafePath:
        """The error for a component that would not open: running into a symlink is a refusal.

        ``O_NOFOLLOW`` says ELOOP for a symlink, or ENOTDIR with ``O_DIRECTORY``; ENOTDIR
        is also what a plain file says. The lstat here only picks the message (the open has
        refused already): a plain file stays ENOTDIR, anything else (a symlink, or a name
        swapped again since) is a symlink refusal.
        """
        if exc.errno == errno.ENOTDIR:
            with contextlib.suppress(OSError):
                info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                if not (stat.S_ISLNK(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                    return exc
        elif exc.errno != errno.ELOOP:
            return exc
        return UnsafePath(path, f"{'/'.join(parts)!r} is a symbolic link")

    @staticmethod
    def _split(path: str | bytes) -> tuple[str, list[str]]:
        checked = check_path(path)
        return checked, checked.split("/")

    def open_dir(self, path: str | bytes = "") -> int:
        """A descriptor of the directory ``path`` (``""`` or ``"."``: the root); caller closes."""
        if path in ("", ".", b"", b"."):
            return self._open_root()
        checked, parts = self._split(path)
        return self._descend(parts, checked, create=False)

    @contextlib.contextmanager
    def parent(self, path: str | bytes, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """``(descriptor of path's directory, path's last component)``, for ``*at`` calls.

        Args:
            path: The path.
            create: Create missing directories on the way (mode 0755).
        """
        checked, parts = self._split(path)
        fd = self._descend(parts[:-1], checked, create=create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def directories(self, paths: Iterable[str]) -> Iterator[dict[str, int]]:
        """Descriptors of the directories ``paths`` and their parents (``""``: the root),
        created where missing (mode 0755), each opened relative to its parent's with
        ``O_NOFOLLOW``: for many ``*at`` calls in a row (a restore of many files) without
        walking down from the root for each. All are closed on exit.

        Raises:
            UnsafePath: a path the path rule refuses, or a symlink on the way.
        """
        wanted: set[str] = set()
        for path in paths:
            if path in ("", "."):
                continue
            parts = check_path(path).split("/")
            wanted.update("/".join(parts[: depth + 1]) for depth in range(len(parts)))
        fds = {"": self._open_root()}
        try:
            for path in sorted(wanted):  # a parent sorts before its children
                parent, _, name = path.rpartition("/")
                dir_fd = fds[parent]
                try:
                    fds[path] = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                except FileNotFoundError:
                    with contextlib.suppress(FileExistsError):  # a racing creator is fine
                        os.mkdir(name, 0o755, dir_fd=dir_fd)
                    try:
                        fds[path] = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                    except OSError as exc:
                        raise self._refusal(exc, dir_fd, path, path.split("/")) from None
                except OSError as exc:
                    raise self._refusal(exc, dir_fd, path, path.split("/")) from None
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    def read_bytes(self, path: str | bytes, limit: int | None = None) -> bytes:
        """The content of the regular file ``path``; at most ``limit + 1`` bytes are read, so
        a caller can tell an over-long file by the length.

        Raises:
            UnsafePath: refused by the path rule, or a symlink on the way or at the end.
            InvalidInput: ``path`` is not a regular file.
        """
        with self.parent(path) as (dir_fd, name):
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                shown = os.fsdecode(path)
                raise self._refusal(exc, dir_fd, shown, shown.split("/")) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidInput(f"not a regular file: {os.fsdecode(path)}")
        with os.fdopen(fd, "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)

    def write_bytes(
        self, path: str | bytes, data: bytes, *, mode: int = 0o644, durable: bool = False
    ) -> None:
        """Replace (or create) the file ``path`` with ``data``, creating its directories.

        Args:
            path: The file.
            data: Its new content.
            mode: Permission bits of a new file (before the umask).
            durable: fsync the file and its directory before returning.

        Raises:
            UnsafePath: refused by the path rule, or a symlink on the way.
            IsADirectoryError: ``path`` is a directory.
        """
        with self.parent(path, create=True) as (dir_fd, name):
            tmp = WORKSPACE_TMP_PREFIX + os.urandom(8).hex()
            fd = os.open(tmp, _CREATE_FLAGS, mode, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                # rename(2) replaces a symlink in the target's place; it never follows it
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                if durable:
                    os.fsync(dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise

    def unlink(self, path: str | bytes) -> None:
        """Remove the file (or symlink, not its target) ``path``.

        Raises:
            IsADirectoryError: ``path`` is a directory.
        """
        with self.parent(path) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)

    def symlink(self, path: str | bytes, target: str | bytes) -> None:
        """Create the symlink ``path`` (its directories too) pointing at ``target``, which is
        stored as it is, never resolved.

        Raises:
            UnsafePath: refused by the path rule, or a symlink on the way.
            FileExistsError: something is at ``path`` already.
        """
        with self.parent(path, create=True) as (dir_fd, name):
            os.symlink(target, name, dir_fd=dir_fd)

    def walk(self, path: str | bytes = "", *, recursive: bool = True) -> Iterator[Entry]:
        """The entries below the directory ``path``, sorted per directory, top-down.

        Symlinks are listed, never followed; names the path rule refuses (``.git`` anywhere,
        ``.narrative`` at the top) are skipped, and never descended into.
        """
        top_fd = self.open_dir(path)
        base = "" if path in ("", ".", b"", b".") else os.fsdecode(path)
        try:
            for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=top_fd):
                below = dirpath[2:] if dirpath.startswith("./") else ""
                prefix = "/".join(p for p in (base, below) if p)
                kept = []
                for name in sorted(dirnames + filenames):
                    rel = f"{prefix}/{name}" if prefix else name
                    if not is_safe_path(rel):
                        continue
                    try:
                        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except FileNotFoundError:  # removed while we looked
                        continue
                    kind = _kind(info.st_mode)
                    if kind == "dir":
                        kept.append(name)
                    yield Entry(rel, kind, info.st_size)
                dirnames[:] = sorted(kept) if recursive else []
        finally:
            os.close(top_fd)
