"""Extracting an environment's (hostile) tar into a fresh scratch directory.

Regular files and directories, nearly every member of a workspace's tar, are written here
directly: the path is checked part by part (no absolute path, no ``..``, nothing under a
symbolic link this extraction made; the directory was empty, so those are the only links in
it), the file created without following a link and filled in 1 MiB copies, with only its exec
bit kept. Python's ``data`` filter checks the same by resolving each path through the file
system (``os.path.realpath``: an ``lstat`` per part per member) and then also sets owners and
times a snapshot never reads; on a 5,000-file tar it cost about a fifth of a collect. Every
other member (a hard link, a device, a path through a link, a file over a link) still goes
through ``tarfile`` with the ``data`` filter, which keeps deciding what is refused there.
Symbolic links are data: made with whatever target they have, never followed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
from typing import IO

from narrative.errors import InvalidInput

__all__ = ["extract_tar"]

_COPY = 1 << 20
_READ_BUFFER = 1 << 20
"""tarfile's stream buffer (default 10 KiB: a read call per 20 blocks)."""


def extract_tar(stream: IO[bytes], scratch: str, strip: str, max_bytes: int) -> None:
    """Extract the tar ``stream`` into the empty directory ``scratch``, members renamed by
    removing the leading ``strip``; :class:`InvalidInput` for a member refused or when the
    regular files add up to more than ``max_bytes``."""
    try:
        _extract(stream, os.path.realpath(scratch), strip, max_bytes)
    except tarfile.TarError as exc:  # the data filter's refusals, a broken stream
        raise InvalidInput(f"refused the environment tar: {exc}") from None
    except KeyError as exc:  # a hard link to a member the stream did not hold before it
        raise InvalidInput(f"refused the environment tar: {exc.args[0]}") from None


def _extract(stream: IO[bytes], root: str, strip: str, max_bytes: int) -> None:
    links: set[tuple[str, ...]] = set()
    total = 0
    with tarfile.open(fileobj=stream, mode="r|*", bufsize=_READ_BUFFER) as tar:
        for member in tar:
            stripped = _strip(member, strip)
            if stripped is None:
                continue
            if member.isreg():
                total += member.size
                if total > max_bytes:
                    raise InvalidInput(
                        f"environment workspace exceeds the collect limit of {max_bytes} bytes"
                    )
            parts = _parts(stripped.name)
            if stripped.issym():
                links.add(_place_symlink(root, parts, stripped))
            elif not parts:
                continue  # the directory itself
            elif (stripped.isreg() or stripped.isdir()) and not _under_link(parts, links):
                _write_plain(tar, stripped, root, parts)
            else:
                tar.extract(stripped, root, filter="data")


def _strip(member: tarfile.TarInfo, strip: str) -> tarfile.TarInfo | None:
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
    return member.replace(name=name, deep=False)


def _parts(name: str) -> tuple[str, ...]:
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidInput(f"refused member of the environment tar: {name!r}")
    return parts


def _under_link(parts: tuple[str, ...], links: set[tuple[str, ...]]) -> bool:
    """Whether the path or one of its parents is a link this extraction made (``links``: where
    each really is). Exact: up to its first part that is a link, a path is where it says."""
    return bool(links) and any(parts[:i] in links for i in range(1, len(parts) + 1))


def _write_plain(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: str, parts: tuple[str, ...]
) -> None:
    """A directory, or a regular file with only its exec bit kept, at ``parts`` under
    ``root`` (no part of which is a link)."""
    path = os.path.join(root, *parts)
    if member.isdir():
        # a file of that name came first: tarfile leaves it too
        with contextlib.suppress(FileExistsError):
            os.makedirs(path, mode=0o700, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    mode = 0o755 if member.mode & 0o100 else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    source = tar.extractfile(member)
    with open(os.open(path, flags, mode), "wb") as out:
        if source is not None:
            shutil.copyfileobj(source, out, _COPY)
        os.fchmod(out.fileno(), mode)  # an existing file (a member given twice) kept its own


def _place_symlink(root: str, parts: tuple[str, ...], member: tarfile.TarInfo) -> tuple[str, ...]:
    """Create a symlink member as it is; where it is under ``root``, as parts. Its target is
    data (git stores any target, and refusing one would lose the whole result). It is never
    followed here, and no later member is written under it but through the ``data`` filter,
    which refuses a path that leads out of ``root``."""
    if not parts:
        raise InvalidInput(f"refused member of the environment tar: {member.name!r}")
    parent = os.path.realpath(os.path.join(root, *parts[:-1]))
    if parent != root and not parent.startswith(root + os.sep):
        raise InvalidInput(f"refused member of the environment tar: {member.name!r} escapes")
    os.makedirs(parent, exist_ok=True)
    dest = os.path.join(parent, parts[-1])
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise InvalidInput(f"refused member of the environment tar: {member.name!r} is a directory")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
    os.symlink(member.linkname, dest)
    return tuple(os.path.relpath(dest, root).split(os.sep))
