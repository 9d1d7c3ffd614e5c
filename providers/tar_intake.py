"""Extracting an environment's (hostile) tar into a fresh scratch directory.

Regular files and directories, nearly every member of a workspace's tar, are written through
:class:`~narrative.confined.ConfinedRoot` (each part opened relative to its parent with
``O_NOFOLLOW``, the path rule of :mod:`narrative.paths` first), the file filled in 1 MiB copies
with only its exec bit kept. Python's ``data`` filter checks a path by resolving it through the
file system (``os.path.realpath``: an ``lstat`` per part per member) and then also sets owners
and times a snapshot never reads; on a 5,000-file tar it cost about a fifth of a collect. Every
other member (a device, a path the rule refuses or one with a link on the way or in its place)
still goes through ``tarfile`` with the ``data`` filter, which keeps deciding what is refused
there. Symbolic links are data: made with whatever target they have, never followed. A hard
link is made here too, only to a file extracted before it (see :func:`_hard_link`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO

from narrative.confined import ConfinedRoot
from narrative.errors import InvalidInput, UnsafePath
from narrative.paths import is_safe_path

__all__ = [
    "READ_BUFFER",
    "check_total",
    "extract_members",
    "extract_tar",
    "member_parts",
    "refusals",
    "strip_member",
]

_COPY = 1 << 20
READ_BUFFER = 1 << 20
"""tarfile's stream buffer (default 10 KiB: a read call per 20 blocks)."""
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def extract_tar(stream: IO[bytes], scratch: str, strip: str, max_bytes: int) -> None:
    """Extract the tar ``stream`` into the empty directory ``scratch``, members renamed by
    removing the leading ``strip``; :class:`InvalidInput` for a member refused or when the
    regular files add up to more than ``max_bytes``."""
    with refusals(), tarfile.open(fileobj=stream, mode="r|*", bufsize=READ_BUFFER) as tar:
        extract_members(tar, tar, scratch, strip, max_bytes)


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Errors of reading or extracting an environment's tar as one :class:`InvalidInput`."""
    try:
        yield
    except tarfile.TarError as exc:  # the data filter's refusals, a broken stream
        raise InvalidInput(f"refused the environment tar: {exc}") from None
    except KeyError as exc:  # tarfile's lookup of a member by name, should one still happen
        raise InvalidInput(f"refused the environment tar: {exc.args[0]}") from None


def check_total(total: int, member: tarfile.TarInfo, max_bytes: int) -> int:
    """``total`` plus the size of ``member`` if it is a regular file; refused over the limit."""
    if member.isreg():
        total += member.size
        if total > max_bytes:
            raise InvalidInput(
                f"environment workspace exceeds the collect limit of {max_bytes} bytes"
            )
    return total


def extract_members(
    tar: tarfile.TarFile,
    members: Iterable[tarfile.TarInfo],
    scratch: str,
    strip: str,
    max_bytes: int,
    total: int = 0,
) -> None:
    """Extract ``members`` of the stream ``tar`` (the rest of it, when another reader took
    the first ones and left ``total`` bytes of regular files) into ``scratch``."""
    root = ConfinedRoot(scratch)
    for member in members:
        stripped = strip_member(member, strip)
        if stripped is None:
            continue
        total = check_total(total, member, max_bytes)
        parts = member_parts(stripped.name)
        if stripped.issym():
            _place_symlink(root.root, parts, stripped)
        elif not parts:
            continue  # the directory itself
        elif stripped.islnk():
            _hard_link(root.root, parts, stripped)
        elif not (
            (stripped.isreg() or stripped.isdir())
            and _write_plain(tar, stripped, root, "/".join(parts))
        ):
            tar.extract(stripped, root.root, filter="data")


def strip_member(member: tarfile.TarInfo, strip: str) -> tarfile.TarInfo | None:
    name = member.name
    if name.startswith("/"):
        raise InvalidInput(f"refused member of the environment tar: absolute path {name!r}")
    if strip:
        if name.rstrip("/") == strip.rstrip("/"):
            return None
        if not name.startswith(strip):
            raise InvalidInput(
                f"unexpected member {name!r} outside {strip!r} in the environment tar"
            )
        name = name[len(strip) :]
        if member.islnk() and member.linkname.startswith(strip):
            # the engine names a hard link's target as it names members: strip it alike (else
            # the link points nowhere in the scratch directory and the whole collect fails)
            return member.replace(name=name, linkname=member.linkname[len(strip) :], deep=False)
    return member.replace(name=name, deep=False)


def member_parts(name: str) -> tuple[str, ...]:
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidInput(f"refused member of the environment tar: {name!r}")
    return parts


def _write_plain(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: ConfinedRoot, path: str
) -> bool:
    """A directory, or a regular file with only its exec bit kept, at ``path``, opened through
    ``root`` (each part relative to its parent, never following a link). False, with nothing
    read or written, where the path rule refuses ``path`` (``.git``...) or a link lies on the
    way or in its place: the ``data`` filter decides those, as every other member."""
    if not is_safe_path(path):
        return False
    try:
        with root.parent(path, create=True) as (dir_fd, name):
            if member.isdir():
                try:
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                except FileExistsError:  # a file of that name is left, as tarfile leaves it
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    return not stat.S_ISLNK(info.st_mode)
                return True
            mode = 0o755 if member.mode & 0o100 else 0o644
            try:
                fd = os.open(name, _CREATE, mode, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link in its place
                    return False
                raise
            source = tar.extractfile(member)
            with open(fd, "wb") as out:
                if source is not None:
                    shutil.copyfileobj(source, out, _COPY)
                os.fchmod(out.fileno(), mode)  # a file given twice kept its first mode
    except UnsafePath:  # a link on the way
        return False
    return True


def _hard_link(root: str, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
    """Make a hard link member: only to a regular file already extracted in ``root`` (not
    through a symbolic link in its place), only at a name not yet taken; refused otherwise.
    Its mode is set as ``tarfile`` sets it: the exec bit rule, on the inode both names share.

    Not through ``tarfile``: where its ``os.link`` fails (a directory, nothing there yet, a name
    taken, a file on the way), it looks the target up among the members by the names as they
    were read, not as they were stripped, and in a stream that lookup reads every header left.
    The same tar then gave different trees with and without a prefix, and what followed the
    link decided whether it was refused. A real tree's tar never holds such a link: a file
    system links no directory, and a tar names each path once."""
    source_parts = member_parts(member.linkname)
    if member.linkname.startswith("/") or not source_parts:
        raise InvalidInput(
            f"refused the environment tar: hard link {member.name!r} to {member.linkname!r}"
        )
    source = _in_real_parent(root, source_parts)
    place = _in_real_parent(root, parts)
    try:
        mode = os.lstat(source).st_mode
        if (
            not stat.S_ISREG(mode)
            or not _inside(root, source)
            or not _inside(root, place)
            or os.path.lexists(place)
        ):
            raise FileExistsError(place)
        upper = os.path.join(root, *parts[:-1])
        if not os.path.exists(upper):  # as tarfile makes a member's directories
            os.makedirs(upper)
        os.link(source, place, follow_symlinks=False)
    except OSError:
        raise InvalidInput(
            f"refused the environment tar: hard link {member.name!r} to {member.linkname!r}: "
            "links are kept only to a file the tar held before them, at a name not yet taken"
        ) from None
    os.chmod(place, 0o755 if member.mode & 0o100 else 0o644)


def _in_real_parent(root: str, parts: tuple[str, ...]) -> str:
    """``parts`` below ``root`` with every link on the way resolved, the last part not."""
    return os.path.join(os.path.realpath(os.path.join(root, *parts[:-1])), parts[-1])


def _inside(root: str, path: str) -> bool:
    """Whether ``path`` (resolved) lies below ``root``, never ``root`` itself."""
    return path.startswith(root + os.sep)


def _place_symlink(root: str, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
    """Create a symlink member as it is: its target is data (git stores any target, and
    refusing one would lose the whole result). It is never followed here, and no later member
    is written under it but through the ``data`` filter, which refuses a path that leads out
    of ``root``."""
    if not parts:
        raise InvalidInput(f"refused member of the environment tar: {member.name!r}")
    dest = _in_real_parent(root, parts)
    if not _inside(root, dest):
        raise InvalidInput(f"refused member of the environment tar: {member.name!r} escapes")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise InvalidInput(f"refused member of the environment tar: {member.name!r} is a directory")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
    os.symlink(member.linkname, dest)
