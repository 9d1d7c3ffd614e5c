"""The bubblewrap sandbox of commands on an SSH host (``sandbox=bwrap``, the default).

Every environment of one remote user shares that user's files and processes; the sandbox
keeps an agent to its own environment, as :mod:`providers.sandbox` does on this machine:

* the host's file system read-only; the user's home directory and ``work_dir`` replaced by
  empty directories, so no key, config or other environment of the user is visible; bound
  back: the environment's workspace (writable, the working directory), its ``tmp`` as
  ``/tmp`` (writable, emptied between runs), its hub socket directory and the runtime
  (read-only);
* a PID namespace of its own (no other process of the user is visible) and no capabilities;
* the host's network, or none but a loopback of its own with ``network=none`` (the runtime
  reaches the hub through the socket either way).

**Whether a sandbox started.** bwrap fails now and then to set a sandbox up when the host's
mounts change meanwhile (Docker starting or stopping a container: "Can't bind mount /oldroot/
on /newroot/", bubblewrap issue 650); the command never ran then, and may be started again
(as :mod:`providers.sandbox` does on this machine). So the command is wrapped in
:data:`ANNOUNCE`: inside the sandbox, before it execs the command, a shell writes
:data:`START_LINE` to descriptor 3. For an exec that is the channel's standard output, so the
line comes before anything the command writes, and :class:`ExecStart` takes it off here (the
command's standard error held back until it came: on a failed attempt that is bwrap's
reason, not the command's output). For a spawn it is a FIFO in the environment's ``procs``
directory, read by the remote script that starts it (:func:`background_attempts`), bwrap's
standard error going to a file there and the command's back to the log through descriptor 4.
The line is written before the command runs; the command holds neither descriptor (closed as
it is exec'd; bwrap's init in the sandbox closes its own copies), and ``procs`` lies in
``work_dir``, which the sandbox replaces by an empty tmpfs. So once the command runs nothing
it does takes the line back: a hostile command can at most say it started (harmless), never
that it did not.

Command lines are built here, the paths are paths on the host (``~/`` expanded there);
:class:`~providers.ssh.provider.SSHProvider` runs them.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..base import OutputFn
from ..sandbox import SANDBOX_ATTEMPTS
from .target import quote_argv

__all__ = [
    "ANNOUNCE",
    "CHECK_COMMAND",
    "EXEC_REDIRECTIONS",
    "NOT_STARTED",
    "START_LINE",
    "ExecStart",
    "RemoteSandbox",
    "StartFiles",
    "announced_argv",
    "background_attempts",
    "bwrap_argv",
    "marked_shell",
    "split_start",
]

CHECK_COMMAND = "bwrap --ro-bind / / --unshare-pid --cap-drop ALL true"
"""Exits 0 where bwrap can set a sandbox up."""
NOT_STARTED = 236
"""Exit status of :func:`background_attempts` when no attempt's sandbox was set up."""
START_LINE = b".\n"
ANNOUNCE = 'echo . >&3 && exec "$@" 2>&4 3>&- 4>&-'
"""Run by ``/bin/sh`` in the sandbox before the command (its arguments): :data:`START_LINE`
on descriptor 3, then the command, with the standard error saved on descriptor 4 and neither
of the two descriptors."""
EXEC_REDIRECTIONS = "3>&1 4>&2"
"""Those of an exec's :func:`announced_argv`: the line goes to the channel's standard output."""


@dataclass(frozen=True)
class RemoteSandbox:
    """Where one environment lives on the host (absolute paths there)."""

    home: str
    work_dir: str
    workspace: str
    tmp: str
    hub: str
    runtime: str
    """The runtime's directory ("" when the config names a runtime of its own)."""
    interpreter: str
    """The prefix of the runtime's base Python ("" when not needed)."""
    network: bool


def bwrap_argv(box: RemoteSandbox, *, background: bool) -> list[str]:
    """``bwrap`` and its options, to be followed by ``--`` and the command.

    A command run in the foreground dies with its caller (the SSH channel's shell); a spawned
    one (the runtime) outlives it and is ended by its marker instead."""
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # /tmp first: a work_dir below /tmp is then hidden and bound back like any other
    argv += ["--bind", box.tmp, "/tmp", "--setenv", "TMPDIR", "/tmp"]
    argv += ["--tmpfs", box.home, "--tmpfs", box.work_dir]
    for path in (box.interpreter, box.runtime):
        argv += ["--ro-bind", path, path] if path else []
    argv += ["--ro-bind", box.hub, box.hub, "--bind", box.workspace, box.workspace]
    argv += ["--chdir", box.workspace]
    argv += ["--unshare-pid", "--cap-drop", "ALL"]
    if not box.network:
        argv.append("--unshare-net")
    if not background:
        argv.append("--die-with-parent")
    return argv


def announced_argv(box: RemoteSandbox, argv: Sequence[str], *, background: bool) -> list[str]:
    """``argv`` in ``box``'s sandbox, saying it started (:data:`ANNOUNCE`): run with
    :data:`EXEC_REDIRECTIONS`, or by :func:`background_attempts`."""
    return [*bwrap_argv(box, background=background), "--", "/bin/sh", "-c", ANNOUNCE, "sh", *argv]


class ExecStart:
    """Passes an exec's output on to ``on_output`` as the command wrote it: without
    :data:`START_LINE`, the standard error held back until the line came (when it never comes,
    the sandbox was not set up and what was held is bwrap's; :meth:`release` passes it on when
    it is the command line's own, a missing program's message say)."""

    def __init__(self, on_output: OutputFn | None) -> None:
        self.on_output = on_output
        self.started = False
        self._head = b""
        self._held: list[bytes] = []

    def __call__(self, stream: str, chunk: bytes) -> None:
        if self.started:
            self._pass(stream, chunk)
        elif stream == "stderr":
            self._held.append(chunk)
        else:
            self._head += chunk
            if split_start(self._head)[0]:
                self.started = True
                self.release()

    def release(self) -> None:
        """Pass on what was held back."""
        held, self._held = self._held, []
        head, self._head = split_start(self._head)[1], b""
        for chunk in held:
            self._pass("stderr", chunk)
        if head:
            self._pass("stdout", head)

    def _pass(self, stream: str, chunk: bytes) -> None:
        if self.on_output is not None:
            self.on_output(stream, chunk)


def split_start(stdout: bytes) -> tuple[bool, bytes]:
    """Whether an exec's command started (:data:`START_LINE` as a whole line of its standard
    output: the first, unless a login script printed lines before), and the output without
    that line (a login script's "Welcome.", say, is no start line)."""
    if stdout.startswith(START_LINE):
        return True, stdout[len(START_LINE) :]
    at = stdout.find(b"\n" + START_LINE) + 1  # where the line starts (0: nowhere)
    if not at:
        return False, stdout
    return True, stdout[:at] + stdout[at + len(START_LINE) :]


@dataclass(frozen=True)
class StartFiles:
    """Where the script starting a spawn learns whether its sandbox started: files in the
    environment's ``procs`` directory (outside every sandbox's view), named by its marker."""

    start: str
    """The FIFO the start line comes through."""
    err: str
    """bwrap's standard error."""

    @classmethod
    def of(cls, procs: str, marker: str) -> StartFiles:
        return cls(f"{procs}/{marker}.start", f"{procs}/{marker}.err")

    def remove(self) -> str:
        """A command removing them."""
        return f"rm -f {_q(self.start)} {_q(self.err)}"


def _q(path: str) -> str:
    return quote_argv([path])


def background_attempts(prelude: str, program: str, files: StartFiles, log: str) -> str:
    """A script starting ``program`` (:func:`announced_argv` with ``background``, quoted)
    after ``prelude`` (which exits when the command cannot be run) in the background, its
    output appended to ``log``, up to :data:`SANDBOX_ATTEMPTS` times until its sandbox is set
    up. It prints the pid of the started process (bwrap, whose environment holds the marker:
    ``setsid`` forks not, as a background job of a non-interactive shell leads no process
    group) and exits 0; for each attempt whose sandbox was not set up, bwrap's reason on a line
    of its standard error; :data:`NOT_STARTED` when none was. The command holds none of the
    script's descriptors, so only the script writes its output. When ``prelude`` exits, that
    process's pid is printed as the command's: it said why in the log, as a command does."""
    return (
        f"start={_q(files.start)} err={_q(files.err)} n=0\n"
        f"while [ $n -lt {SANDBOX_ATTEMPTS} ]; do\n"
        "n=$((n + 1))\n"
        'rm -f "$start" "$err" && mkfifo -m 600 "$start" || exit 1\n'
        f'( {prelude}exec {program} 4>&2 2>"$err" ) 3>"$start" >>{_q(log)} 2>&1 </dev/null &\n'
        "p=$!\n"
        # the line: the sandbox was set up; end of file without it: it was not (its last
        # writer, bwrap, exited)
        'if read -r line < "$start" && [ "$line" = . ]; then\n'
        'rm -f "$start" "$err"; echo $p; exit 0\n'
        "fi\n"
        'wait $p; s=$?; rm -f "$start"\n'
        # no err file: the prelude exited, bwrap never ran
        '[ -e "$err" ] || { echo $p; exit 0; }\n'
        "reason=$(tr '\\n' ' ' < \"$err\"); rm -f \"$err\"\n"
        'echo "${reason:-bwrap exited with $s}" >&2\n'
        "sleep 0.05 2>/dev/null\n"
        f"done\nexit {NOT_STARTED}\n"
    )


def marked_shell(variables: Mapping[str, str], script: str) -> str:
    """``script`` run by ``/bin/sh`` with ``variables`` in its own environment (an ``export``
    would not show in ``/proc/<pid>/environ``): a kill by marker ends the script too, so no
    attempt starts after it."""
    pairs = " ".join(shlex.quote(f"{k}={v}") for k, v in variables.items())
    return f"exec env {pairs} /bin/sh -c {shlex.quote(script)}"
