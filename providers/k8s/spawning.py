"""How the ``k8s`` provider names and starts background processes in a pod: their handles,
log files, the environment they get through the Secret, and the one command that (optionally
readies the pod for a run and) starts one."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

from narrative.errors import InvalidInput

from ..emptying import sweep_empty_then_argv
from ..proctree import MARKER_VAR, spawn_log_in_environment
from .podexec import SPAWN_SCRIPT, wrap

__all__ = [
    "RUNTIME_UP_HOLD",
    "env_script",
    "parse_handle",
    "spawn_command",
    "spawn_log",
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
) -> list[str]:
    """The exec that starts ``argv`` detached (see :data:`SPAWN_SCRIPT`); ``hold``: it returns
    once the process says it is up or ends; ``empty_first``: before that, every earlier
    process of the pod is killed and these directories emptied."""
    held = f"{RUNTIME_UP_HOLD:g}" if hold else ""
    launcher = ["sh", "-c", SPAWN_SCRIPT, "spawn", logfile, envfile, held, *argv]
    command = wrap(workdir, launcher, {MARKER_VAR: marker})
    return command if empty_first is None else sweep_empty_then_argv(True, empty_first, command)
