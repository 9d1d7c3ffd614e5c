"""A warm runtime: started with an environment, it imports the runtime once and forks one for
each run, so that a run does not wait for (and fifty runs at once do not compete for) the
third of a CPU-second a fresh Python spends importing it.

The ``k8s`` pod's keep-alive starts it as its first child (``narrative runtime --warm``,
:data:`WARM_FLAG`), the process every sweep spares (:data:`providers.proctree.SWEEP_SCRIPT`). A
run's start (one exec, after that sweep) writes an order to :data:`ORDER_FILE` and sends it
``SIGUSR1``; the child it forks reads the order and becomes ``narrative runtime --connect ...``
exactly as a spawned one would be: its own session, output appended to its log, the
environment file of the spawn sourced, the spawn's marker set, the held spawn's descriptor on
:data:`~providers.base.UP_FD_VAR`, its pid and start time where the provider looks for them.

What an agent could do to it, and why that is no worse than what it can do anyway:

* it runs as the agent's user, but is non-dumpable from the start (no ``ptrace``, no
  ``/proc/PID/mem``, no ``environ``): the agent cannot change the code its children run;
* it holds nothing secret (a run's token reaches only the child, from the Secret, after the
  sweep) and reads nothing itself: the order is read by the child;
* ``SIGUSR1`` from the agent forks a runtime with an order the agent wrote: a process the agent
  could have started itself, which the next run's sweep kills like any other;
* ``SIGSTOP`` is undone by the run's start (``SIGCONT``); killing it ends the pod, as killing
  the keep-alive's ``sleep`` did before.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from narrative.processes import process_start_time

from .base import UP_FD_VAR
from .proctree import MARKER_VAR
from .sandbox import keep_environment_private

__all__ = ["ORDER_FILE", "ORDER_VERSION", "WARM_FLAG", "WARM_LINE", "Order", "read_order", "serve"]

WARM_FLAG = "--warm"
"""The ``narrative runtime`` option that starts a warm runtime."""
ORDER_FILE = "/tmp/narrative-warm-runtime.order"
"""Where a run's start leaves the order (written after the sweep emptied ``/tmp``)."""
ORDER_VERSION = "narrative-warm-1"
"""First field of an order: a child refuses any other."""
WARM_LINE = "narrative: runtime forked from the warm runtime\n"
"""What the child writes first to its log (a user reading it knows which way it started)."""
_ENV_WAIT = 180.0
"""Seconds to wait for the spawn's environment file (the kubelet projects it)."""
_KEEP_ALIVE = ("sleep", "2147483647")
"""What the process becomes when it cannot serve (it must live on: it is the pod's command)."""


class Order:
    """What a run's start asks of the warm runtime (NUL-separated fields of :data:`ORDER_FILE`:
    version, log file, environment file, up FIFO, pid file, workdir, marker, then the CLI's
    arguments)."""

    def __init__(self, fields: Sequence[str]) -> None:
        if len(fields) < 8 or fields[0] != ORDER_VERSION:
            raise ValueError("not an order of this version")
        (_, self.log, self.envfile, self.up, self.pidfile, self.workdir, self.marker) = fields[:7]
        self.args = list(fields[7:])


def read_order(path: str = ORDER_FILE) -> Order:
    """The order at ``path``, removed once read (one order starts one runtime)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return Order(data.decode().split("\0")[:-1] if data.endswith(b"\0") else [])


def serve(modules: Sequence[str], become: Callable[[list[str]], NoReturn]) -> NoReturn:
    """Import ``modules``, then fork a runtime per ``SIGUSR1``; in each child, once it is set up
    from the order, ``become(args)`` runs the CLI with the order's arguments. Never returns in
    this process; where it cannot import, it becomes a plain keep-alive ``sleep``."""
    # No collection here, ever: while importing it only costs time (fifty pods import at once),
    # and what the imports left is shared with every child as it is (a collection before the
    # freeze cost ~25 ms a pod and freed nothing the children would not share anyway).
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    except Exception as exc:
        _say(f"no warm runtime ({exc!r}); runs start a fresh one")
        os.execvp(_KEEP_ALIVE[0], list(_KEEP_ALIVE))
    keep_environment_private()
    gc.freeze()  # the children share these pages: no collection touches (copies) them
    wanted = {signal.SIGUSR1, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # taken by sigwait, never delivered
    # ...but caught all the same: SigCgt in /proc/PID/status is the readiness a run's start
    # looks for (SigBlk does not show a signal sigwait waits for)
    signal.signal(signal.SIGUSR1, _never_called)
    while True:
        received = signal.sigwait(wanted)
        _reap()
        if received != signal.SIGUSR1:
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            _say(f"cannot fork a runtime: {exc}")
            continue
        if pid == 0:
            _child(wanted, become)


def _never_called(signum: int, frame: object) -> None:
    """The handler of a blocked signal (see :func:`serve`)."""


def _say(text: str) -> None:
    """A line on stderr (the pod's log, or the child's before it takes its own)."""
    with contextlib.suppress(OSError):
        os.write(2, f"narrative: warm runtime: {text}\n".encode())


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _child(blocked: set[signal.Signals], become: Callable[[list[str]], NoReturn]) -> NoReturn:
    try:
        gc.enable()  # a run collects as any process does (only the frozen imports are spared)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        os.setsid()
        args = _take_order()
    except BaseException as exc:
        _say(f"a child cannot start: {exc!r}")
        os._exit(125)
    become(args)


def _take_order() -> list[str]:
    order = read_order()
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(order.log or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.write(1, WARM_LINE.encode())
    os.chdir(order.workdir)
    if order.envfile:
        os.environ.update(_read_env(order.envfile))
    os.environ[MARKER_VAR] = order.marker
    _record_pid(order.pidfile)
    # blocks until the spawn reads: it says "up" or sees the end of file once this closes
    up = os.open(order.up, os.O_WRONLY)
    os.dup2(up, 3)
    os.closerange(4, _max_fd())
    os.environ[UP_FD_VAR] = "3"
    return order.args


def _read_env(path: str) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines of a spawn's environment file (``spawning.env_script``:
    each value quoted by ``shlex.quote``), once the kubelet has projected it."""
    deadline = time.monotonic() + _ENV_WAIT
    while not os.access(path, os.R_OK):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the spawn's environment never reached the pod ({path})")
        time.sleep(0.1)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    env = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) != 2 or words[0] != "export" or "=" not in words[1]:
            raise ValueError(f"not an export line in {path}")
        name, _, value = words[1].partition("=")
        env[name] = value
    return env


def _record_pid(path: str) -> None:
    """``pid start`` where the provider's scripts look (``/proc/PID/stat``'s start time tells
    this process from a later one with its pid)."""
    pid = os.getpid()
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{pid} {process_start_time(pid) or '-'}\n")


def _max_fd() -> int:
    with contextlib.suppress(OSError, ValueError):
        return min(os.sysconf("SC_OPEN_MAX"), 1 << 16)
    return 1024
