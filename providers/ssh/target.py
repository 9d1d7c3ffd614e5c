"""Where an ``ssh`` environment lives and how a command line for it is written: plain data and
quoting, without ``asyncssh``, so that a provider's class (its settings, capabilities,
preference) loads without the SSH library (:func:`providers.registry.pick_provider` loads every
provider's class)."""

from __future__ import annotations

import getpass
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "SSHTarget",
    "default_key_file",
    "enter_workspace",
    "make_target",
    "quote_argv",
    "run_env",
]


@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to log in, and which host key to trust."""

    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str
    host_key: str | None
    connect_timeout: float

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def default_key_file() -> str:
    """``~/.ssh/id_ed25519`` if it exists, else ``~/.ssh/id_rsa``."""
    for name in ("id_ed25519", "id_rsa"):
        path = os.path.expanduser(f"~/.ssh/{name}")
        if os.path.exists(path):
            return path
    return os.path.expanduser("~/.ssh/id_ed25519")


def make_target(
    host: str,
    port: int,
    user: str | None,
    key_file: str | None,
    known_hosts: str,
    host_key: str | None,
    connect_timeout: float,
) -> SSHTarget:
    return SSHTarget(
        host,
        port,
        user or getpass.getuser(),
        os.path.expanduser(key_file) if key_file else default_key_file(),
        os.path.expanduser(known_hosts),
        host_key,
        connect_timeout,
    )


def quote_argv(argv: Sequence[str]) -> str:
    """A shell command line for ``argv``; an argument starting with ``~/`` is expanded by the
    remote shell to the remote user's home (the rest stays quoted)."""
    return " ".join(
        f'"$HOME"/{shlex.quote(arg[2:])}' if arg.startswith("~/") else shlex.quote(arg)
        for arg in argv
    )


def run_env(env: Mapping[str, str]) -> str:
    """``env K=V ...`` for a command line (empty when there is nothing to set)."""
    if not env:
        return ""
    return "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "


def enter_workspace(workspace: str, tmp: str, program: str, missing: int) -> str:
    """Shell lines that enter ``workspace`` (exit status ``missing`` when it is not there),
    set ``TMPDIR`` to ``tmp`` and exit 127 when ``program`` cannot be found, as a shell says
    (not the exit 1 of a sandbox that could not exec it)."""
    cannot = shlex.quote(f"cannot run {program!r}: No such file or directory")
    return (
        f"cd {quote_argv([workspace])} 2>/dev/null || exit {missing}\n"
        f"TMPDIR={quote_argv([tmp])}; export TMPDIR\n"
        f"command -v {quote_argv([program])} >/dev/null || {{ echo {cannot} >&2; exit 127; }}\n"
    )
