"""How the ``k8s`` provider names and starts background processes in a pod: their handles,
log files, the environment they get through the Secret, and the one command that (optionally
readies the pod for a run and) starts one."""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable, Mapping, Sequence

from narrative.errors import InvalidInput

from ..emptying import SWEPT_CUE, sweep_empty_then_argv
from ..proctree import MARKER_VAR, spawn_log_in_environment
from .config import K8sConfig
from .manifests import ENV_MOUNT
from .podexec import SPAWN_SCRIPT, PodExec, on_line, wrap

__all__ = [
    "PodSpawn",
    "RUNTIME_UP_HOLD",
    "env_script",
    "parse_handle",
    "spawn_command",
    "spawn_log",
    "warm_args",
]

RUNTIME_UP_HOLD = 30.0
"""Longest hold of a runtime's spawn waiting for it to be up (a slower runtime is looked at
by the hub as before)."""

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
) -> list[str]:
    """The exec that starts ``argv`` detached (see :data:`SPAWN_SCRIPT`); ``hold``: it returns
    once the process says it is up or ends; ``empty_first``: before that, every earlier
    process of the pod is killed and these directories emptied; ``warm_args``: the last that
    many of ``argv`` are ``narrative``'s arguments, which the pod's warm runtime (when it has
    a ready one) runs instead of ``argv`` (only after that emptying: nothing else may run)."""
    held = f"{RUNTIME_UP_HOLD:g}" if hold else ""
    warm = str(warm_args) if warm_args and empty_first is not None else ""
    launcher = ["sh", "-c", SPAWN_SCRIPT, "spawn", logfile, envfile, held, warm, *argv]
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
        )

    def run(
        self,
        pods: PodExec,
        pod: str,
        command: list[str],
        env: Mapping[str, str] | None,
        *,
        after_sweep: bool,
    ) -> None:
        """Run ``command`` in ``pod``; the spawn's environment goes into the Secret before it,
        or with ``after_sweep``, once its sweep killed every process of the last run (a run's
        token: one left running could read it there; the spawn waits for the projection). The
        key is removed once the exec returned."""

        def hand_env() -> None:
            if env and not self.handed:
                self.handed = True
                data = base64.b64encode(env_script(env).encode()).decode()
                self.patch_secret({self.key: data})

        try:
            if after_sweep:
                pods.quiet(pod, command, "spawn", on_output=on_line(SWEPT_CUE, hand_env))
            else:
                hand_env()
                pods.quiet(pod, command, "spawn")
        finally:
            if self.handed:
                self.patch_secret({self.key: None})
