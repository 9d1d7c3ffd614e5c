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

Only command lines are built here; the paths are absolute paths on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHECK_COMMAND", "SANDBOX_ATTEMPTS", "RemoteSandbox", "bwrap_argv"]

CHECK_COMMAND = "bwrap --ro-bind / / --unshare-pid --cap-drop ALL true"
"""Exits 0 where bwrap can set a sandbox up."""
SANDBOX_ATTEMPTS = 5
"""How often a command is started when bwrap did not set its sandbox up."""


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
