"""The ``ssh`` provider: one directory per environment on a remote Linux host.

The resource id is ``ssh:<env id>``; the host, login and directories come from the
environment's config, so a fresh process reconnects with nothing else. On the host, under
``work_dir``::

    envs/<env id>/ws      the workspace (commands run here)
    envs/<env id>/tmp     TMPDIR of its commands, emptied between runs
    envs/<env id>/procs   output logs of spawned processes
    envs/<env id>/hub     (0700) the socket through which the runtime reaches the hub
    envs/<env id>/owner   the store's owner label (``env sweep`` finds leaked environments)
    runtime/<key>         the runtime (:mod:`providers.ssh.install`)

Every command carries the environment's marker and its own (:mod:`providers.proctree`), so a
timeout, a signal or the end of a run reaches the whole process tree by marker, whatever
process groups it made; a spawned process runs in a new session (``setsid``) with its output
in ``procs/``, and outlives the SSH connection. Snapshots travel as tar streams over the
connection: a collect's tar is hostile input (:func:`providers.shipping.snapshot_from_tar`).

A sandboxed command says when its sandbox was set up (:mod:`providers.ssh.sandbox`); one that
bwrap failed to set up never ran, and is started again: an exec from here (an attempt is a
round trip, the line taken off its output), a spawn by the one remote script starting it.

With ``hub=tunnel`` (the default) the runtime dials ``envs/<id>/hub/hub.sock`` on the host,
which the SSH connection forwards to the hub's socket on this machine
(:meth:`providers.ssh.session.Session.forward_socket`, kept up across reconnects): the host
needs no route to the hub, and the hub no address the host can reach.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, ClassVar

from narrative.errors import InvalidInput
from narrative.ids import is_id

from ..base import (
    SPAWN_LOG_LIMIT,
    BaseProvider,
    ExecResult,
    Health,
    HubSocket,
    OutputFn,
    ProviderConfig,
    ProviderContext,
    Signal,
    SpawnLog,
    check_relative_path,
    tail_argv,
    tail_read,
)
from ..errors import (
    ExecFailed,
    ProviderError,
    ProviderUnavailable,
    ResourceGone,
    ResultTooLarge,
    SandboxUnavailable,
)
from ..proctree import MARKER_VAR, environment_marker, signal_argv
from ..records import HUB_SOCKET, hub_socket_dir
from ..sandbox import SANDBOX_ATTEMPTS, never_started, sandbox_attempts
from ..shipping import scratch_dir, snapshot_from_tar, write_snapshot_tar
from .config import SSHConfig
from .install import (
    check_installable,
    ensure_runtime,
    interpreter_prefix,
    runtime_argv,
    runtime_dir,
    runtime_installed,
)
from .sandbox import (
    CHECK_COMMAND,
    EXEC_REDIRECTIONS,
    NOT_STARTED,
    ExecStart,
    RemoteSandbox,
    StartFiles,
    announced_argv,
    background_attempts,
    marked_shell,
    split_start,
)
from .target import enter_workspace, make_target, quote_argv, run_env

if TYPE_CHECKING:
    from narrative.models import Snapshot

    from .session import Session

__all__ = ["SSHProvider"]

log = logging.getLogger(__name__)

_RESOURCE = re.compile(r"ssh:([A-Za-z0-9_-]{1,64})")
_NO_WORKSPACE = 237
"""Exit status of a command line whose workspace is missing (then checked: the resource is
gone, or the command itself exited so)."""
_PROBE_TIMEOUT = 10.0
"""Seconds for a short probe of the host (is a process alive, is the workspace there)."""
_HANDLE = re.compile(r"ssh:([1-9][0-9]{0,9}):([0-9a-f]{24})")
_SPAWN_START_TIMEOUT = 120.0
"""Seconds a spawn's sandbox may take to be set up (all its attempts)."""


class _Capped:
    """A file that refuses more than ``limit`` bytes (a collect's tar is the host's to size)."""

    def __init__(self, out: IO[bytes], limit: int) -> None:
        self.out, self.limit, self.size = out, limit, 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise ResultTooLarge(f"the environment's workspace exceeds {self.limit} bytes")
        return self.out.write(data)


def _session(config: SSHConfig) -> Session:
    from .session import session_for  # asyncssh only once an environment is used

    return session_for(
        make_target(
            config.host,
            config.port,
            config.user,
            config.key_file,
            config.known_hosts,
            config.host_key,
            config.connect_timeout,
        )
    )


def _check_sandbox(session: Session, config: SSHConfig) -> None:
    """bwrap sets a sandbox up on the host; tried again when it did not (it fails now and then
    while the host's mounts change: bubblewrap issue 650), but not when it is missing."""
    if config.sandbox != "bwrap":
        return
    for _attempt in sandbox_attempts():
        result = session.run(CHECK_COMMAND, timeout=60)
        if result.exit_code == 0:
            return
        detail = result.stderr.decode(errors="replace").strip() or f"exit {result.exit_code}"
        if result.exit_code == 127:  # not installed: no use trying again
            break
        log.info("ssh %s: bwrap did not set a sandbox up: %s", session.target.label, detail)
    raise SandboxUnavailable(
        f"ssh {session.target.label}: no working bubblewrap on the host ({detail}); "
        "install it there (Debian: apt-get install bubblewrap) or pass --config "
        "sandbox=none to run agents with everything the remote user can reach"
    )


class SSHProvider(BaseProvider):
    name = "ssh"
    category = "hybrid"
    resets_without_store: ClassVar[bool] = True  # its workspace lives elsewhere
    capabilities: ClassVar[frozenset[str]] = frozenset({"ssh", "remote", "exec", "files", "python"})
    config_model = SSHConfig
    preference = 70
    runtime_hint = (
        "the host needs Python 3.11+ (--config python=...); the runtime is installed there "
        "from the wheelhouse, or set --config runtime=..."
    )

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        super().__init__(context, config)
        assert isinstance(config, SSHConfig)
        self.cfg = config
        self.session = _session(config)

    @classmethod
    def check_config(cls, config: ProviderConfig) -> None:
        """Before anything is recorded: the host answers, its key is trusted, the login works,
        it has a working sandbox (unless ``sandbox=none``), and a runtime or a Python the
        wheelhouse fits."""
        assert isinstance(config, SSHConfig)
        session = _session(config)
        _check_sandbox(session, config)
        if config.runtime is None and not runtime_installed(session, config.work_dir):
            check_installable(session, config.python, config.wheelhouse)

    # -- paths ----------------------------------------------------------------------------------

    def _env_id(self, resource_id: str) -> str:
        match = _RESOURCE.fullmatch(resource_id) if isinstance(resource_id, str) else None
        if match is None:
            raise InvalidInput(f"not a resource of an ssh environment: {resource_id!r}")
        return match[1]

    def _dir(self, resource_id: str, *parts: str) -> str:
        return "/".join((self.cfg.work_dir, "envs", self._env_id(resource_id), *parts))

    def _q(self, path: str) -> str:
        return quote_argv([path])

    def _in_workspace(self, resource_id: str, path: str) -> str:
        return self._dir(resource_id, "ws", check_relative_path(path))

    def _marks(self, marker: str) -> dict[str, str]:
        """The environment's marker and the command's (:mod:`providers.proctree`)."""
        var, value = environment_marker(self.context.env_id)
        return {var: value, MARKER_VAR: marker}

    @property
    def _sandboxed(self) -> bool:
        return self.cfg.sandbox == "bwrap"

    def _prelude(self, resource_id: str, argv: Sequence[str]) -> str:
        ws, tmp = self._dir(resource_id, "ws"), self._dir(resource_id, "tmp")
        return enter_workspace(ws, tmp, argv[0], _NO_WORKSPACE)

    def _program(
        self,
        resource_id: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        marker: str,
        *,
        background: bool = False,
    ) -> str:
        """``argv`` with its variables, in its sandbox (saying it started) unless there is
        none; a spawned one in a session of its own."""
        variables = {**self.cfg.env, **(env or {}), **self._marks(marker)}
        prefix = ["setsid"] if background else []
        if self._sandboxed:
            argv = announced_argv(self._box(resource_id), argv, background=background)
        return f"{run_env(variables)}{quote_argv([*prefix, *argv])}"

    def _start_files(self, resource_id: str, marker: str) -> StartFiles:
        return StartFiles.of(self._dir(resource_id, "procs"), marker)

    def _box(self, resource_id: str) -> RemoteSandbox:
        absolute = self.session.absolute
        runtime = interpreter = ""
        if not self.cfg.runtime:
            self._ensure_runtime()
            runtime = absolute(runtime_dir(self.cfg.work_dir))
            interpreter = interpreter_prefix(self.session, self.cfg.work_dir)
        return RemoteSandbox(
            home=absolute("~"),
            work_dir=absolute(self.cfg.work_dir),
            workspace=absolute(self._dir(resource_id, "ws")),
            tmp=absolute(self._dir(resource_id, "tmp")),
            hub=absolute(self._dir(resource_id, "hub")),
            runtime=runtime,
            interpreter=interpreter,
            network=self.cfg.network == "host",
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        resource_id = f"ssh:{self.context.env_id}"
        dirs = [self._dir(resource_id, name) for name in ("ws", "tmp", "procs", "hub")]
        owner = self._dir(resource_id, "owner")
        self.session.check(
            f"mkdir -p {' '.join(self._q(d) for d in dirs)} && chmod 700 {self._q(dirs[-1])} && "
            f"printf %s {shlex.quote(self.context.owner)} > {self._q(owner)}",
            "creating the environment's directories",
        )
        if self.cfg.runtime is None:
            self._ensure_runtime()
        return resource_id

    def start(self, resource_id: str) -> None:
        """Nothing to start on the host: its directories are there (the manager's lifecycle
        table says whether the environment is started)."""
        self.reconnect(resource_id)

    def stop(self, resource_id: str) -> None:
        """End every process of the environment; its files stay."""
        self.end_leftovers(resource_id)

    def delete(self, resource_id: str) -> None:
        base = self._dir(resource_id)
        self.end_leftovers(resource_id)
        self.session.unforward(self._remote_socket(resource_id))
        self.session.check(
            f"if [ -d {self._q(base)} ]; then chmod -R u+rwx {self._q(base)} 2>/dev/null; "
            f"rm -rf {self._q(base)}; fi",
            "deleting the environment",
        )

    def reconnect(self, resource_id: str) -> None:
        probe = f"test -d {self._q(self._dir(resource_id, 'ws'))}"
        if self.session.run(probe, timeout=_PROBE_TIMEOUT).exit_code != 0:
            raise ResourceGone(resource_id)

    def health(self, resource_id: str) -> Health:
        try:
            self.reconnect(resource_id)
        except ResourceGone:
            return Health.GONE
        except ProviderUnavailable:
            return Health.UNREACHABLE
        return Health.OK

    def list_resources(self) -> list[str]:
        envs = self._q(f"{self.cfg.work_dir}/envs")
        script = (
            f'for d in {envs}/*/; do [ -f "$d/owner" ] || continue; '
            f'[ "$(cat "$d/owner")" = {shlex.quote(self.context.owner)} ] && '
            'basename "$d"; done; true'
        )
        out = self.session.check(script, "listing environments")
        return sorted(
            f"ssh:{name}" for name in out.decode().split() if _RESOURCE.fullmatch(f"ssh:{name}")
        )

    def environment_of(self, resource_id: str) -> str | None:
        match = _RESOURCE.fullmatch(resource_id)
        return match[1] if match and is_id(match[1], "environment") else None

    def warnings(self) -> list[str]:
        if self.cfg.sandbox == "bwrap":
            return []
        user = self.session.target.user
        return [
            f"ssh: sandbox=none: commands run as {user} on {self.cfg.host} with everything "
            f"{user} can reach there, the other environments of {user} included"
        ]

    # -- commands -------------------------------------------------------------------------------

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the workspace. In the sandbox an attempt whose sandbox bwrap did
        not set up (the command never ran) is made again, up to
        :data:`~providers.sandbox.SANDBOX_ATTEMPTS` times, each logged.

        Raises:
            ExecFailed: the sandbox never started.
        """
        if not argv:
            raise InvalidInput("empty command")
        prelude = self._prelude(resource_id, argv)
        deadline = None if timeout is None else time.monotonic() + timeout
        reasons: list[str] = []
        for _attempt in sandbox_attempts(SANDBOX_ATTEMPTS if self._sandboxed else 1):
            marker = secrets.token_hex(12)
            command = f"{prelude}exec {self._program(resource_id, argv, env, marker)}"
            watch = ExecStart(on_output) if self._sandboxed else None
            if watch is not None:
                command += f" {EXEC_REDIRECTIONS}"
            result = self.session.run(
                command,
                on_output=watch or on_output,
                timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0),
                on_timeout=quote_argv(signal_argv(marker, "kill")),
            )
            if result.exit_code == _NO_WORKSPACE:
                self.reconnect(resource_id)  # ResourceGone when the workspace is
            started, stdout = split_start(result.stdout) if watch else (True, result.stdout)
            # the prelude's exits (no workspace, no such program) are the command line's own
            if started or result.timed_out or result.exit_code in (127, _NO_WORKSPACE):
                if watch is not None:
                    watch.release()
                return ExecResult(result.exit_code, stdout, result.stderr, result.timed_out)
            reasons.append(
                result.stderr.decode(errors="replace").strip() or f"exit {result.exit_code}"
            )
            log.info("ssh: the sandbox of %s did not start: %s", self.context.env_name, reasons[-1])
        raise never_started(argv[0], reasons)

    def end_leftovers(self, resource_id: str) -> None:
        var, value = environment_marker(self.context.env_id)
        self.session.check(quote_argv(signal_argv(value, "kill", var)), "ending leftover processes")

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` in a new session on the host; the handle is ``ssh:<pid>:<marker>``.
        The output goes to ``procs/<marker>.log`` in the environment's directory on the host
        (with a ``log_path``; else nowhere), which :meth:`read_spawn_log` reads. In the
        sandbox one remote script starts it until its sandbox is set up (up to
        :data:`~providers.sandbox.SANDBOX_ATTEMPTS` times, each failed one logged here).

        Raises:
            ExecFailed: the sandbox never started.
        """
        if not argv:
            raise InvalidInput("empty command")
        marker = secrets.token_hex(12)
        output = self._log(resource_id, marker) if log_path is not None else "/dev/null"
        prelude = self._prelude(resource_id, argv)
        program = self._program(resource_id, argv, env, marker, background=True)
        check = f"test -d {self._q(self._dir(resource_id, 'ws'))} || exit {_NO_WORKSPACE}\n"
        if self._sandboxed:
            files = self._start_files(resource_id, marker)
            script = check + background_attempts(prelude, program, files, output)
            kill = quote_argv(signal_argv(marker, "kill"))
            result = self.session.run(
                marked_shell(self._marks(marker), script),
                timeout=_SPAWN_START_TIMEOUT,
                on_timeout=f"{kill}; {files.remove()}",
            )
        else:
            # a background job of a non-interactive shell leads no process group, so setsid
            # needs no fork and $! is the process itself
            result = self.session.run(
                f"{check}( {prelude}exec {program} ) >>{self._q(output)} 2>&1 </dev/null & echo $!"
            )
        if result.exit_code == _NO_WORKSPACE:
            raise ResourceGone(resource_id)
        reasons = result.stderr.decode(errors="replace").splitlines() if self._sandboxed else []
        for why in reasons:
            log.info("ssh: the sandbox of %s did not start: %s", self.context.env_name, why)
        if result.timed_out:
            raise ExecFailed(
                f"cannot run {argv[0]!r}: its sandbox did not start in {_SPAWN_START_TIMEOUT:g}s"
            )
        if self._sandboxed and result.exit_code == NOT_STARTED:
            raise never_started(argv[0], reasons)
        out = result.stdout
        pid = out.decode().strip()
        if not pid.isdigit():
            raise ProviderError(f"ssh: no process id for {argv[0]!r}: {out[:100]!r}")
        return f"ssh:{pid}:{marker}"

    def _log(self, resource_id: str, marker: str) -> str:
        return self._dir(resource_id, "procs", f"{marker}.log")

    def _handle(self, handle: str) -> tuple[int, str]:
        match = _HANDLE.fullmatch(handle) if isinstance(handle, str) else None
        if match is None:
            raise InvalidInput(f"not a process handle of an ssh environment: {handle!r}")
        return int(match[1]), match[2]

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        _pid, marker = self._handle(handle)
        self.session.check(quote_argv(signal_argv(marker, sig)), f"signalling {handle}")

    def alive(self, resource_id: str, handle: str) -> bool:
        """Whether the spawned pid still runs with the handle's marker (a zombie's environment
        reads empty, and a reused pid lacks the marker)."""
        pid, marker = self._handle(handle)
        probe = f"grep -qzxF {shlex.quote(f'{MARKER_VAR}={marker}')} /proc/{pid}/environ"
        return self.session.run(probe, timeout=_PROBE_TIMEOUT).exit_code == 0

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        _pid, marker = self._handle(handle)
        argv = tail_argv(self._log(resource_id, marker), since, limit)
        try:
            result = self.session.run(quote_argv(argv))
        except ProviderError:
            return SpawnLog(0, b"")
        return tail_read(result.exit_code, result.stdout)

    def runtime_command(self) -> list[str]:
        """The configured ``runtime``, else the one installed under ``work_dir`` (installed
        first when the host lacks the version this machine runs)."""
        if self.cfg.runtime:
            return list(self.cfg.runtime)
        self._ensure_runtime()
        return runtime_argv(self.cfg.work_dir)

    def _ensure_runtime(self) -> None:
        ensure_runtime(self.session, self.cfg.python, self.cfg.work_dir, self.cfg.wheelhouse)

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        """With ``hub=tunnel``: the socket in the environment's ``hub`` directory on the host,
        forwarded to the hub's socket here through the SSH connection."""
        if self.cfg.hub != "tunnel":
            return None
        local = os.path.join(hub_socket_dir(self.context.env_id), HUB_SOCKET)
        remote = self._remote_socket(resource_id)
        self.session.forward_socket(remote, local)
        return HubSocket(local, remote)

    def _remote_socket(self, resource_id: str) -> str:
        path = self._dir(resource_id, "hub", HUB_SOCKET)
        return self.session.absolute(path)

    # -- files ----------------------------------------------------------------------------------

    def read_file(self, resource_id: str, path: str) -> bytes:
        target = self._q(self._in_workspace(resource_id, path))
        result = self.session.run(f"[ -f {target} ] || exit 3; cat {target}")
        if result.exit_code == 3:
            raise FileNotFoundError(f"no file {path} in {resource_id}")
        if result.exit_code != 0:
            raise ProviderError(
                f"ssh: reading {path} failed: {result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        target = self._in_workspace(resource_id, path)
        parent = self._q(target.rsplit("/", 1)[0])
        self.session.check(
            f"mkdir -p {parent} && cat > {self._q(target)}", f"writing {path}", stdin=data
        )

    def delete_file(self, resource_id: str, path: str) -> None:
        target = self._q(self._in_workspace(resource_id, path))
        result = self.session.run(
            f"[ -d {target} ] && exit 4; [ -e {target} ] || [ -L {target} ] || exit 3; "
            f"rm -f {target}"
        )
        if result.exit_code == 3:
            raise FileNotFoundError(f"no file {path} in {resource_id}")
        if result.exit_code == 4:
            raise IsADirectoryError(f"{path} is a directory")
        if result.exit_code != 0:
            raise ProviderError(f"ssh: deleting {path} failed")

    # -- snapshots ------------------------------------------------------------------------------

    def _empty(self, resource_id: str, names: Sequence[str]) -> str:
        dirs = " ".join(self._q(self._dir(resource_id, name)) for name in names)
        return f"chmod -R u+rwx {dirs} 2>/dev/null; rm -rf {dirs} && mkdir -p {dirs}"

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        self._put(resource_id, snapshot, ["ws"])

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the workspace and the environment's TMPDIR, then restore ``snapshot``."""
        if snapshot is None:
            self.session.check(self._empty(resource_id, ["ws", "tmp"]), "emptying the workspace")
        else:
            self._put(resource_id, snapshot, ["ws", "tmp"])

    def _put(self, resource_id: str, snapshot: Snapshot, empty: Sequence[str]) -> None:
        with tempfile.TemporaryFile() as tar:
            write_snapshot_tar(self.context.store, snapshot, tar)
            tar.seek(0)
            result = self.session.run(
                f"{self._empty(resource_id, empty)} && "
                f"tar -x -f - -C {self._q(self._dir(resource_id, 'ws'))}",
                stdin=tar,
                timeout=3600,
            )
        if result.exit_code != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise ProviderError(f"ssh: restoring into {resource_id} failed: {detail}")

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        limit = min(self.cfg.max_collect_bytes, self.cfg.max_result_bytes)
        with tempfile.TemporaryFile() as tar:
            result = self.session.run(
                f"cd {self._q(self._dir(resource_id, 'ws'))} && tar -c -f - .",
                stdout=_Capped(tar, limit + (64 << 20)).write,
                timeout=3600,
            )
            if result.exit_code != 0:
                detail = result.stderr.decode(errors="replace").strip()
                raise ProviderError(f"ssh: collecting from {resource_id} failed: {detail}")
            tar.seek(0)
            return snapshot_from_tar(
                self.context.store,
                tar,
                scratch_dir(self.context.store, self.context.env_id),
                thread_id,
                run_id,
                message,
                strip="./",
                max_bytes=limit,
            )
