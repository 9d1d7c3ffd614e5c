"""The processes of directory environments (``local``, ``worktree``) on this machine.

Commands see the caller's environment without the variables that point git at a repository
(``GIT_DIR``, ``GIT_WORK_TREE``, ``GIT_INDEX_FILE``, ...: the list of
``git rev-parse --local-env-vars``), so a ``git`` run in the directory never writes the
caller's repository; the variables a call passes are added on top (:func:`command_env`).

A command's output is streamed as it arrives and the command reaped with ``wait4``, which
gives its CPU time and peak memory (:func:`wait_streaming`); on timeout its process group is
killed. Background processes run in a session of their own, with ``NARRATIVE_SPAWN_ID`` in
their environment. Their handle is ``proc:<pid>:<start>:<token>`` (``start``: the start time
from ``/proc/<pid>/stat``, which guards against a reused pid); :func:`signal_spawned` signals
the process group and every process still carrying the token (descendants that left the
group), so it needs Linux's ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

from narrative.errors import InvalidInput
from narrative.processes import proc_stat

from .base import ExecResult, OutputFn, Signal
from .usage import ReapedProcesses, rusage_usage

__all__ = [
    "SPAWN_MARKER_VAR",
    "SUBREAPER",
    "check_spawn_handle",
    "command_env",
    "kill_marked",
    "marked_processes",
    "signal_spawned",
    "spawned_alive",
    "take_reaped_usage",
    "track_spawned",
    "wait_streaming",
]

_CHUNK = 64 * 1024

SPAWN_MARKER_VAR = "NARRATIVE_SPAWN_ID"
"""Set in a spawned process's environment (and so inherited by its descendants)."""

# What ``git rev-parse --local-env-vars`` lists: the variables that tie git to one repository.
_GIT_REPO_VARS = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "GIT_OBJECT_DIRECTORY",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_GRAFT_FILE",
        "GIT_INDEX_FILE",
        "GIT_NO_REPLACE_OBJECTS",
        "GIT_REPLACE_REF_BASE",
        "GIT_PREFIX",
        "GIT_INTERNAL_SUPER_PREFIX",
        "GIT_SHALLOW_FILE",
        "GIT_COMMON_DIR",
    }
)
_GIT_CONFIG_PAIRS = ("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_")
_HANDLE = re.compile(r"proc:([1-9][0-9]{0,9}):([0-9]{1,20}):([0-9a-f]{24})")
_SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL}


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a command run in a directory environment: the caller's, minus the
    variables that point git at a repository (``GIT_CONFIG_KEY_<n>``/``VALUE_<n>`` go with
    ``GIT_CONFIG_COUNT``), plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _GIT_REPO_VARS and not key.startswith(_GIT_CONFIG_PAIRS)
    }
    env.update(extra or {})
    return env


def track_spawned(proc: subprocess.Popen[bytes], token: str) -> str:
    """The handle of a process just spawned with ``token``; a daemon thread reaps it (so it
    never lingers as a zombie while this process lives) and records its rusage for
    :func:`take_reaped_usage`."""
    # Read before the reaper starts: even a process that exited at once is still a zombie.
    stat = proc_stat(proc.pid)
    start = stat[19] if stat is not None else "0"
    handle = f"proc:{proc.pid}:{start}:{token}"

    def reap() -> None:
        usage = _wait_rusage(proc)
        if usage is not None:
            _REAPED.record(handle, usage)

    threading.Thread(target=reap, name=f"reap-{proc.pid}", daemon=True).start()
    return handle


def take_reaped_usage(handle: str, timeout: float) -> resource.struct_rusage | None:
    """The rusage of the spawned process ``handle`` once this process reaped it (waiting up to
    ``timeout`` seconds); None if it did not."""
    return _REAPED.take(handle, timeout=timeout)


def signal_spawned(handle: str, sig: Signal) -> None:
    """Signal the process group of the spawned process and every process that still carries
    its token."""
    pid, start, token = _parse_handle(handle)
    _kill_all(lambda: _tree(pid, start, token), sig)


def spawned_alive(handle: str) -> bool:
    """Whether the spawned process still runs (not a zombie, not a reused pid)."""
    pid, start, _token = _parse_handle(handle)
    stat = proc_stat(pid)
    return stat is not None and stat[19] == start and stat[0] not in ("Z", "X")


def check_spawn_handle(handle: str) -> None:
    """Raise InvalidInput unless ``handle`` is a handle of a spawned process."""
    _parse_handle(handle)


def kill_marked(var: str, value: str) -> None:
    """Kill every process carrying ``var=value`` in its environment, never this process or
    its ancestors."""
    spared = _ancestors(os.getpid())
    _kill_all(lambda: set(marked_processes(value, var)) - spared, "kill")


def _parse_handle(handle: str) -> tuple[int, str, str]:
    match = _HANDLE.fullmatch(handle) if isinstance(handle, str) else None
    if match is None:
        raise InvalidInput(f"not a process handle of a directory environment: {handle!r}")
    return int(match[1]), match[2], match[3]


def _tree(pid: int, start: str, token: str) -> set[int]:
    """The live processes of a spawned tree: its process group and whoever carries its token."""
    targets = set(marked_processes(token))
    stat = proc_stat(pid)
    members = _group_members(pid)
    # The pid still names our group when it is the leader (same start time), or when the leader
    # is gone: a pid is not reused while a process group of that number has members.
    if stat is None or stat[19] == start:
        targets.update(members)
    return targets


def _kill_all(find: Callable[[], set[int]], sig: Signal) -> None:
    """Send ``sig`` to the processes ``find`` returns; when killing, they are stopped first,
    so that none reacts to another's death by starting something new, and it is repeated
    until none is left (a process may fork while it is being killed)."""
    for _round in range(20 if sig == "kill" else 1):
        targets = find()
        if not targets:
            return
        if sig == "kill":
            for target in targets:
                _send(target, signal.SIGSTOP)
        for target in targets:
            _send(target, _SIGNALS[sig])
        if sig == "kill":
            time.sleep(0.01)


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its ancestors."""
    found = set()
    while pid > 0 and pid not in found:
        found.add(pid)
        stat = proc_stat(pid)
        pid = int(stat[1]) if stat is not None else 0
    return found


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in _pids():
        stat = proc_stat(pid)
        if stat is not None and stat[2] == str(pgid) and stat[0] not in ("Z", "X"):
            members.append(pid)
    return members


def marked_processes(token: str, var: str = SPAWN_MARKER_VAR) -> list[int]:
    """The processes whose (initial) environment carries ``var=token`` (by default: the
    processes of the spawn with that token)."""
    needle = f"{var}={token}".encode()
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours to read (not a process we started)
        # any other failure (out of descriptors) is raised: a marked process skipped would
        # outlive the reset that was to end it, and reach the next run
    return found


def _send(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, number)


def _pump(stream: IO[bytes], name: str, sink: list[bytes], on_output: OutputFn | None) -> None:
    while chunk := stream.read1(_CHUNK):  # type: ignore[attr-defined]
        sink.append(chunk)
        if on_output is not None:
            on_output(name, chunk)


def wait_streaming(
    proc: subprocess.Popen[bytes],
    timeout: float | None,
    on_output: OutputFn | None,
    measured_by: str | None = None,
) -> ExecResult:
    """Stream both pipes as output arrives; on timeout kill the command's process group. The
    command is reaped with ``wait4``: with ``measured_by``, its CPU time and peak memory come
    back with it."""
    out: list[bytes] = []
    err: list[bytes] = []
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, "stdout", out, on_output), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "stderr", err, on_output), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    reaped: list[resource.struct_rusage | None] = []
    reaper = threading.Thread(target=lambda: reaped.append(_wait_rusage(proc)), daemon=True)
    reaper.start()
    try:
        reaper.join(timeout)
    except BaseException:
        _kill_group(proc)
        reaper.join()
        raise
    timed_out = reaper.is_alive()
    if timed_out:
        _kill_group(proc)
        reaper.join()
    for pump in pumps:
        pump.join()
    proc.stdout.close()
    proc.stderr.close()
    code = proc.returncode if proc.returncode is not None else proc.wait()
    rusage = reaped[0] if reaped else None
    usage = rusage_usage(rusage, measured_by) if rusage is not None and measured_by else None
    return ExecResult(
        code if not timed_out else 124, b"".join(out), b"".join(err), timed_out, usage
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


SUBREAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
ends = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
child = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, setsigdef=ends)
for number in ends:
    signal.signal(number, signal.SIG_IGN)
code = 1
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
"""Runs a sandboxed command (bwrap) outside the sandbox and waits for it and for the sandbox's
init, which bwrap leaves unreaped when it exits: the CPU time and peak memory of everything
that ran in there then add up in this process's ``wait4`` rusage, which its caller reads.
Stopping signals are for the command (this one waits until it has ended: it is how a handle
tells whether the command still runs), which gets them by process group or tree."""

_REAPED = ReapedProcesses()
"""The rusage of the processes this process spawned (:func:`track_spawned`), by
handle: a hub reads its run's runtime's when the run ends."""


def _wait_rusage(proc: subprocess.Popen[bytes]) -> resource.struct_rusage | None:
    """Reap ``proc`` with ``wait4`` (setting its return code); its rusage, covering every
    descendant it waited for. None when someone else reaped it."""
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage
