"""Unix-socket addresses of a gateway server: ``ws+unix:///absolute/path/of.sock``.

A hub serves the runtime of an environment without a network (a Docker container with
``network=none``, a bubblewrap sandbox with ``--unshare-net``) on a unix socket in a private
directory (mode 0700) that is bind-mounted into the environment; the URL names the socket as
the environment sees it. The WebSocket handshake over it is the same as over TCP (the run
token in ``Authorization``), so a socket admits exactly who a TCP port would.

A unix socket's path is limited to about 100 bytes; longer ones (a store deep in a temporary
directory) are bound and dialled through ``/proc/self/fd/<directory fd>/<name>``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator

from .errors import ProtocolError

__all__ = ["UNIX_SCHEME", "bind_unix", "dialable_path", "unix_socket_path", "unix_url"]

UNIX_SCHEME = "ws+unix://"
"""The scheme of a gateway address that is a unix socket."""

# sockaddr_un.sun_path is 108 bytes on Linux, NUL included; stay clear of the edge.
_MAX_PATH = 100


def unix_url(path: str) -> str:
    """The URL of the gateway listening on the unix socket ``path`` (absolute)."""
    if not os.path.isabs(path):
        raise ProtocolError(f"a unix socket address must be absolute: {path!r}")
    return UNIX_SCHEME + path


def unix_socket_path(url: str) -> str | None:
    """The socket path of a ``ws+unix://`` URL; None for any other URL.

    Raises:
        ProtocolError: the URL names a relative path or holds a NUL.
    """
    if not url.startswith(UNIX_SCHEME):
        return None
    path = url[len(UNIX_SCHEME) :]
    if not os.path.isabs(path) or "\x00" in path:
        raise ProtocolError(f"not a unix socket address: {url!r}")
    return path


@contextlib.contextmanager
def dialable_path(path: str) -> Iterator[str]:
    """``path``, or, when it is too long for a socket address, the same socket through
    ``/proc/self/fd`` (valid until the block ends)."""
    if len(os.fsencode(path)) <= _MAX_PATH:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path``; a stale socket left there (by a hub that died)
    is replaced, anything else at that path is an error.

    Raises:
        OSError: the directory is missing, or ``path`` holds something else.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with dialable_path(path) as address:
            sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
