"""The bubblewrap sandbox of directory environments (``worktree``, ``local``).

An agent in such an environment runs as the user, on the user's machine. Unless its
environment says ``sandbox=none``, every command it runs (``exec``) and the runtime the hub
spawns there (with the agent below it) run under ``bwrap`` (Debian package ``bubblewrap``):

* the whole file system read-only (``--ro-bind / /``), the environment's checkout writable,
  and a private ``/tmp``;
* the user's workspace, the store, the gateway key and the usual secret locations of the home
  directory (:data:`HOME_SECRETS`) hidden: an empty tmpfs over a directory, ``/dev/null`` over
  a file (the interpreter and the package directories are bound back read-only when a hidden
  directory holds them, e.g. a ``.venv`` inside the workspace);
* a fresh PID namespace (``--unshare-pid``: no other process of the user is visible), fresh
  ``/dev`` and ``/proc``, every capability dropped (so root inside cannot read another
  process's memory or a non-dumpable process's ``/proc/<pid>/environ``);
* the network shared, or none with ``network=none`` (``--unshare-net``: only a loopback of
  its own); either way the runtime reaches the hub through a unix socket in a private
  directory bound read-only into the sandbox (:attr:`SandboxPlan.shared`).

This module builds command lines and tells whether a sandbox started;
:class:`~providers.directory.DirectoryProvider` runs them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .base import ProviderConfig
from .errors import ExecFailed, SandboxUnavailable

__all__ = [
    "HOME_SECRETS",
    "SANDBOX_ATTEMPTS",
    "SandboxConfig",
    "SandboxPlan",
    "SandboxStart",
    "bwrap_options",
    "find_bwrap",
    "inside_sandbox",
    "installation_root",
    "interpreter_paths",
    "keep_environment_private",
    "never_started",
    "require_bwrap",
    "sandbox_attempts",
    "sandboxed",
    "secret_paths",
]

#: Where credentials usually live in a home directory (relative to ``$HOME``).
HOME_SECRETS = (
    ".ssh",
    ".aws",
    ".azure",
    ".kube",
    ".docker",
    ".gnupg",
    ".netrc",
    ".npmrc",
    ".pypirc",
    ".git-credentials",
    ".password-store",
    ".vault-token",
    ".terraform.d",
    ".config/gcloud",
    ".config/gh",
    ".config/hub",
    ".config/git/credentials",
    ".config/rclone",
    ".config/op",
    ".config/narrative",
    ".local/share/keyrings",
    ".local/share/narrative",
    ".local/state/narrative",
    ".cargo/credentials",
    ".cargo/credentials.toml",
)

_INSTALL_HINT = (
    "install it (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
    "or create the environment with --config sandbox=none (no sandbox: the agent can read "
    "and write everything you can)"
)


class SandboxConfig(ProviderConfig):
    """The sandbox settings shared by the directory providers' configurations."""

    sandbox: Literal["bwrap", "none"] = "bwrap"
    """``bwrap``: commands and the runtime run under bubblewrap (refused where it is missing);
    ``none``: they run as the user, with everything the user can reach."""
    network: Literal["host", "none"] = "host"
    """``host``: the sandbox shares the machine's network (so an agent reaches every service
    listening on the machine, loopback included); ``none``: no network at all but a loopback
    of its own (runs through the hub still work: the runtime reaches the hub through a unix
    socket bound into the sandbox)."""


@dataclass(frozen=True)
class SandboxPlan:
    """What one sandboxed command may touch."""

    writable: str
    """The environment's checkout (also the working directory)."""
    hidden: tuple[str, ...] = ()
    """Paths replaced by an empty tmpfs (directories) or ``/dev/null`` (files)."""
    exposed: tuple[str, ...] = ()
    """Paths bound back read-only when a hidden directory holds them (the interpreter)."""
    shared: tuple[str, ...] = ()
    """Directories bound read-only at their own path whatever hides them (the directory of
    the hub's unix socket, which lies in the hidden store)."""
    network: bool = True
    die_with_parent: bool = True
    """Kill the sandbox when its caller dies (not for the runtime: it outlives a hub restart)."""


def find_bwrap() -> str | None:
    """The ``bwrap`` executable on ``PATH``, or None."""
    return shutil.which("bwrap")


def require_bwrap() -> str:
    """The ``bwrap`` executable.

    Raises:
        SandboxUnavailable: it is not installed.
    """
    found = find_bwrap()
    if found is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {_INSTALL_HINT}")
    return found


def inside_sandbox() -> bool:
    """Whether this process runs in a bubblewrap sandbox already (PID 1 of its namespace is
    bwrap's init). A nested environment (a run's agent driving environments of its own) runs
    in that sandbox: the outer one confines it, and without capabilities bwrap cannot make
    another."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            program = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(program) == b"bwrap"


def secret_paths(home: str | None = None) -> list[str]:
    """The existing :data:`HOME_SECRETS` of ``home`` (default ``$HOME``)."""
    home = home if home is not None else os.path.expanduser("~")
    if not home or home == "/":
        return []
    paths = (os.path.join(home, rel) for rel in HOME_SECRETS)
    return [path for path in paths if os.path.lexists(path)]


def installation_root() -> str:
    """The directory holding this distribution's packages (site-packages, or a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreter_paths() -> list[str]:
    """What the default runtime needs to read: the interpreter's prefixes and the directories
    of this distribution's packages."""
    packages = [os.path.join(installation_root(), name) for name in _PACKAGES]
    return [sys.prefix, sys.base_prefix, *packages]


_PACKAGES = ("narrative", "transfer", "providers", "gateway", "cli")


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _outermost(paths: Iterable[str], covered: Sequence[str]) -> list[str]:
    """``paths`` (resolved, existing) without those inside another one or inside ``covered``."""
    resolved = sorted(
        {os.path.realpath(p) for p in paths if os.path.lexists(p)}, key=lambda p: (len(p), p)
    )
    kept: list[str] = []
    for path in resolved:
        if not any(_inside(path, outer) for outer in (*covered, *kept)):
            kept.append(path)
    return kept


def bwrap_options(plan: SandboxPlan, environment: Mapping[str, str]) -> list[str]:
    """bwrap's options for ``plan``, the command's environment included.

    Mounts apply in order: the read-only root, the private ``/tmp``, the hidden paths, the
    exposed paths and the writable checkout, so the checkout stays reachable even when it lies
    in a hidden directory (a worktree inside the store, an environment under /tmp); last the
    hidden directories' tmpfs are made read-only.
    """
    writable = os.path.realpath(plan.writable)
    cmd = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # Hidden under /tmp too: the private /tmp is writable, the hidden paths must not be.
    hidden = _outermost(plan.hidden, [])
    for path in hidden:
        if _inside(path, writable):
            continue  # the checkout is the environment's own: nothing in it is hidden from it
        if os.path.isdir(path):
            cmd += ["--tmpfs", path]
        else:
            cmd += ["--ro-bind", os.devnull, path]
    for path in _outermost(plan.exposed, []):
        if any(_inside(path, h) for h in ["/tmp", *hidden]) and os.path.exists(path):
            cmd += ["--ro-bind", path, path]
    for path in plan.shared:
        cmd += ["--ro-bind", path, path]
    cmd += ["--bind", writable, writable, "--chdir", writable]
    # Read-only once the mount points inside them exist: a write there fails rather than
    # landing in a tmpfs that vanishes with the sandbox.
    for path in hidden:
        if os.path.isdir(path) and not _inside(path, writable):
            cmd += ["--remount-ro", path]
    cmd += ["--unshare-pid", "--cap-drop", "ALL"]
    if plan.die_with_parent:
        cmd.append("--die-with-parent")
    if not plan.network:
        cmd.append("--unshare-net")
    cmd.append("--clearenv")
    for key, value in {**environment, **_PRIVATE_DIRS}.items():
        cmd += ["--setenv", key, value]
    return cmd


# Where a sandboxed process writes what would go to the (read-only, partly hidden) home
# directory: its private /tmp. Environments a run nests keep their checkouts there too.
_PRIVATE_DIRS = {
    "TMPDIR": "/tmp",
    "XDG_DATA_HOME": "/tmp/.local/share",
    "XDG_STATE_HOME": "/tmp/.local/state",
    "XDG_CACHE_HOME": "/tmp/.cache",
}


class SandboxStart:
    """Whether a sandboxed command started. bwrap sets the sandbox up before it runs the
    command, and may fail to (see :func:`sandboxed`); the command, wrapped by
    :data:`_ANNOUNCE`, first writes one byte to its standard input, which is the write end of a
    pipe read here."""

    def __init__(self) -> None:
        # stdin: the write end, the command's standard input (Popen's ``stdin``)
        self._read, self.stdin = os.pipe()

    def close_writer(self) -> None:
        """Called once the command was started: the started processes hold the write end."""
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1

    def started(self, timeout: float) -> bool:
        """Wait until the command says it runs (True), every process that could say so has
        exited (False: the sandbox was not set up), or ``timeout`` seconds passed (False)."""
        self.close_writer()
        try:
            # poll, not select: a hub holding many connections has descriptors above 1023
            waiting = select.poll()
            waiting.register(self._read, select.POLLIN)
            ready = waiting.poll(timeout * 1000)
            return bool(ready) and os.read(self._read, 1) == b"."
        finally:
            self.close()

    def close(self) -> None:
        self.close_writer()
        if self._read >= 0:
            os.close(self._read)
            self._read = -1


SANDBOX_ATTEMPTS = 5
"""How often a command is started when bwrap did not set its sandbox up (here or on an ssh
host): each attempt that did not ran nothing."""


def sandbox_attempts(attempts: int = SANDBOX_ATTEMPTS) -> Iterator[int]:
    """The numbers of ``attempts`` attempts, pausing a little longer before each next one (the
    mounts that changed under bwrap settle)."""
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.02 * attempt)
        yield attempt


def never_started(program: str, reasons: Sequence[str]) -> ExecFailed:
    """The error of a command whose sandbox bwrap never set up, ``reasons`` its attempts'."""
    why = reasons[-1] if reasons else "bwrap failed"
    return ExecFailed(
        f"cannot run {program!r}: its sandbox did not start ({len(reasons)} times): {why}"
    )


_ANNOUNCE = 'printf . >&0 && exec "$@" < /dev/null'
"""What runs in the sandbox before the command: one byte to :class:`SandboxStart`'s pipe on
standard input (a single-digit descriptor: dash takes no other), then the command with
/dev/null as its standard input, so the command never holds the pipe."""


@contextlib.contextmanager
def sandboxed(
    bwrap: str, plan: SandboxPlan, argv: Sequence[str], environment: Mapping[str, str]
) -> Iterator[tuple[list[str], dict[str, str], tuple[int, ...], SandboxStart]]:
    """``(command, environment, pass_fds, start)`` for :class:`subprocess.Popen` running
    ``argv`` in ``plan``'s sandbox with ``environment``, with ``start.stdin`` as its standard
    input; ``start.started()`` then says whether the sandbox was set up and the command runs.

    bwrap reads its options, the command's environment among them, from an unlinked file
    (``--args FD``, closed before the command starts) and runs with an empty environment
    itself: neither its command line nor the environment of its init process (PID 1 of the
    namespace, which the agent can read) holds the command's variables (the runtime's token).
    Popen must be called inside the block.

    Setting the sandbox up fails now and then when the machine's mounts change meanwhile:
    bwrap remounts each mount below ``/`` read-only, and one that goes away first (Docker
    starting or stopping a container) fails it with "Can't bind mount /oldroot/ on /newroot/"
    (bubblewrap issue 650). The command never ran then; ``start`` tells the caller, which may
    start it again.
    """
    options = bwrap_options(plan, environment)
    start = SandboxStart()
    try:
        with tempfile.TemporaryFile() as args:
            args.write(b"".join(os.fsencode(option) + b"\0" for option in options))
            args.flush()
            args.seek(0)
            fd = args.fileno()
            announced = ["/bin/sh", "-c", _ANNOUNCE, "sh", *argv]
            yield [bwrap, "--args", str(fd), "--", *announced], {}, (fd,), start
    except BaseException:
        start.close()
        raise
    start.close_writer()


def keep_environment_private() -> None:
    """Make this process non-dumpable, so that processes it starts (the agent) cannot read its
    ``/proc/<pid>/environ`` or memory without ``CAP_SYS_PTRACE`` (which the sandbox drops).
    Best effort: a no-op where ``prctl`` does not exist."""
    pr_set_dumpable = 4
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)
