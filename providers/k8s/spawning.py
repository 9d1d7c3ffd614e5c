"""How the ``k8s`` provider names and starts background processes in a pod: their handles,
log files, the environment they get through the Secret, and the one command that (optionally
readies the pod for a run and) starts one."""

from __future__ import annotations

import base64
import logging
import re
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from narrative.errors import InvalidInput

from ..base import SPAWN_LOG_LIMIT, OutputFn, SpawnLog, tail_argv, tail_read, tail_start
from ..emptying import SWEPT_CUE, sweep_empty_then_argv
from ..errors import ProviderError
from ..proctree import MARKER_VAR, spawn_log_in_environment
from .config import K8sConfig
from .manifests import ENV_MOUNT
from .podexec import END_CUE, SPAWN_SCRIPT, HeldExec, PodExec, on_line, wrap

__all__ = [
    "HOLD_SAYS",
    "PodSpawn",
    "RUNTIME_UP_HOLD",
    "SpawnEnds",
    "env_script",
    "parse_handle",
    "spawn_command",
    "spawn_log",
    "warm_args",
]

RUNTIME_UP_HOLD = 30.0
"""Longest hold of a runtime's spawn waiting for it to be up (a slower runtime is looked at
by the hub as before)."""
HOLD_SAYS = ("up", "ended", "waiting")
"""What a held spawn prints once its runtime is up, ended first, or slower than the hold."""
_HELD_KEPT = 4096
"""Held spawns kept for their end (one a running runtime): more, and the oldest is forgotten."""
_END_LOGS_KEPT = 64
"""Ended runtimes' logs kept for the read that follows their end."""

log = logging.getLogger(__name__)

_HANDLE = re.compile(r"k8s:([0-9a-f]{24})")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_handle(handle: str) -> str:
    """The marker of a handle ``k8s:<marker>`` (``InvalidInput`` for anything else)."""
    match = _HANDLE.fullmatch(handle)
    if match is None:
        raise InvalidInput(f"not a process handle of the k8s provider: {handle!r}")
    return match.group(1)


def spawn_log(marker: str) -> str:
    """Where in the pod the output of the process with ``marker`` goes."""
    return spawn_log_in_environment(marker)


def env_script(env: Mapping[str, str]) -> str:
    """The shell lines that export ``env`` (sourced from the Secret by :data:`SPAWN_SCRIPT`)."""
    for name in env:
        if not _NAME.fullmatch(name):
            raise InvalidInput(f"not an environment variable name: {name!r}")
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def spawn_command(
    workdir: str,
    marker: str,
    argv: Sequence[str],
    *,
    logfile: str,
    envfile: str,
    hold: bool,
    empty_first: Sequence[str] | None = None,
    warm_args: int | None = None,
    after_end: Sequence[str] | None = None,
) -> list[str]:
    """The exec that starts ``argv`` detached (see :data:`SPAWN_SCRIPT`); ``hold``: it prints
    ``up``, ``ended`` or ``waiting`` once the process says it is up or ends; ``after_end``
    (with ``hold``): it then goes on until the process ended, prints
    :data:`~providers.k8s.podexec.END_CUE` and runs that command; ``empty_first``: before all
    that, every earlier process of the pod is killed and these directories emptied;
    ``warm_args``: the last that many of ``argv`` are ``narrative``'s arguments, which the
    pod's warm runtime (when it has a ready one) runs instead of ``argv`` (only after that
    emptying: nothing else may run)."""
    held = f"{RUNTIME_UP_HOLD:g}" if hold else ""
    warm = str(warm_args) if warm_args and empty_first is not None else ""
    after = shlex.join(after_end) if hold and after_end else ""
    launcher = ["sh", "-c", SPAWN_SCRIPT, "spawn", logfile, envfile, held, warm, after, *argv]
    command = wrap(workdir, launcher, {MARKER_VAR: marker})
    return command if empty_first is None else sweep_empty_then_argv(True, empty_first, command)


def warm_args(cfg: K8sConfig, argv: Sequence[str]) -> int | None:
    """How many of ``argv``'s last arguments the pod's warm runtime can run instead (None: it
    cannot: ``argv`` is not the runtime its pod started warm)."""
    prefix = [*cfg.runtime_command(), "runtime"]
    if not cfg.warm_runtime or list(argv[: len(prefix)]) != prefix:
        return None
    return len(argv) - len(prefix) + 1


class PodSpawn:
    """One spawn in a pod: its command, and the exec that runs it with its environment handed
    in through a key of the environment's Secret at the right moment."""

    def __init__(
        self, cfg: K8sConfig, marker: str, patch_secret: Callable[[dict[str, str | None]], None]
    ) -> None:
        self.cfg, self.marker, self.patch_secret = cfg, marker, patch_secret
        self.key = f"spawn-{marker}"
        self.handed = False
        self._taken_back = False
        self._lock = threading.Lock()

    def command(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        *,
        logfile: str,
        hold: bool,
        empty_first: Sequence[str] | None,
    ) -> list[str]:
        """The exec's argv (see :func:`spawn_command`)."""
        return spawn_command(
            self.cfg.workdir,
            self.marker,
            argv,
            logfile=logfile,
            envfile=f"{ENV_MOUNT}/{self.key}" if env else "",
            hold=hold,
            empty_first=empty_first,
            warm_args=warm_args(self.cfg, argv),
            # a held spawn's exec reads the log once its process ended (see run_held)
            after_end=tail_argv(logfile, 0, SPAWN_LOG_LIMIT) if logfile else ["true"],
        )

    def run(
        self,
        pods: PodExec,
        pod: str,
        command: list[str],
        env: Mapping[str, str] | None,
        *,
        after_sweep: bool,
        on_output: OutputFn | None = None,
    ) -> bytes:
        """Run ``command`` in ``pod``; its stdout (also given to ``on_output``). The spawn's
        environment goes into the Secret before it, or with ``after_sweep``, once its sweep
        killed every process of the last run (a run's token: one left running could read it
        there; the spawn waits for the projection). The key is removed once the exec returned,
        if :meth:`take_back` did not remove it before."""

        def hand_env() -> None:
            if env and not self.handed:
                self.handed = True
                data = base64.b64encode(env_script(env).encode()).decode()
                self.patch_secret({self.key: data})

        watch = on_line(SWEPT_CUE, hand_env) if after_sweep else None

        def output(stream: str, chunk: bytes) -> None:
            for each in (watch, on_output):
                if each is not None:
                    each(stream, chunk)

        try:
            if not after_sweep:
                hand_env()
            return pods.quiet(pod, command, "spawn", on_output=output)
        finally:
            self.take_back()

    def run_held(
        self,
        pods: PodExec,
        pod: str,
        command: list[str],
        env: Mapping[str, str] | None,
        after_sweep: bool,
    ) -> HeldExec:
        """:meth:`run` (a held spawn's ``command``) by a thread of its own, returning once it
        said whether the runtime is up (:data:`HOLD_SAYS`), its environment then taken back out
        of the Secret. The exec goes on until the runtime ended (see :class:`SpawnEnds`)."""
        held = HeldExec(
            lambda out: self.run(pods, pod, command, env, after_sweep=after_sweep, on_output=out),
            HOLD_SAYS,
        )
        try:
            held.wait_line()
        finally:
            self.take_back()  # the runtime has read its environment (or never will)
        return held

    def take_back(self) -> None:
        """Remove the spawn's environment from the Secret (once; nothing when it was not
        handed in): called once the process has read it, which a held spawn's exec says long
        before it returns."""
        with self._lock:
            if self.handed and not self._taken_back:
                self._taken_back = True
                self.patch_secret({self.key: None})


class SpawnEnds:
    """What the provider learns of its runtimes' ends without an exec of its own: the spawns'
    execs, open until their runtime ended (:class:`~providers.k8s.podexec.HeldExec`), and the
    end of a log read by the exec that saw its runtime end, for the read that follows. Both
    bounded: a wait or a read that never comes leaks nothing."""

    def __init__(self) -> None:
        self._held: dict[str, HeldExec] = {}
        self._logs: dict[str, SpawnLog] = {}

    def hold(self, handle: str, held: HeldExec) -> None:
        self._held[handle] = held
        _bound(self._held, _HELD_KEPT)

    def from_held(self, handle: str, seconds: float) -> bool | None:
        """From the spawn's held exec: False while the runtime runs after ``seconds``, True once
        it ended (its log kept), None when there is none or it broke off (look another way)."""
        held = self._held.get(handle)
        if held is None:
            return None
        try:
            result = held.wait_end(seconds)
        except (ProviderError, OSError) as exc:
            log.debug("the held spawn of %s broke off: %s", handle, exc)
            result = None
        else:
            if result is None:
                return False
        self._held.pop(handle, None)
        if result is None:
            return None
        # the end is the exec's status 0, which only its own script gives, after the process
        # is gone; the cue only marks where the log read starts (the agent, writing to that
        # script's stdout through /proc, could print one early: the last one is the script's)
        _, cue, after = result.rpartition(f"\n{END_CUE}\n".encode())
        if not cue:
            return None  # ended without saying so: look the usual way
        self.keep_log(handle, after)
        return True

    def keep_log(self, handle: str, printed: bytes) -> None:
        """Keep what a :func:`~providers.base.tail_argv` read printed at the runtime's end."""
        if printed:  # nothing printed: no log, or the read failed (read again)
            self._logs[handle] = tail_read(0, printed)
            _bound(self._logs, _END_LOGS_KEPT)

    def take_log(self, handle: str, since: int, limit: int) -> SpawnLog | None:
        """The kept end of ``handle``'s log as a read now would give it (an ended process's
        log is whole), or None (read it)."""
        ended = self._logs.pop(handle, None)
        if ended is None:
            return None
        start = tail_start(ended.size, since, limit)
        if start < ended.start:
            return None
        return SpawnLog(ended.size, ended.data[start - ended.start :])


def _bound(kept: dict[str, Any], most: int) -> None:
    while len(kept) > most:  # the oldest first
        kept.pop(next(iter(kept)))
