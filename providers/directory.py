"""Environments that are a directory on this machine: the shared base of ``local`` and
``worktree``.

Commands run as child processes of the caller in the directory (a new session, so a timeout
kills the whole process group), inside a bubblewrap sandbox unless the environment says
``sandbox=none`` (:mod:`providers.sandbox`: the file system read-only but for the directory,
the user's workspace, the store, the keys and the home directory's secrets hidden). How they
are started, streamed, reaped, found and signalled is :mod:`providers.directory_processes`.

Every command, spawned process and sandbox (``bwrap`` itself) carries the environment's marker
(:func:`providers.proctree.environment_marker`), by which
:meth:`~DirectoryProvider.end_leftovers` kills what earlier runs left before the next starts, and
what runs there when the environment is stopped or deleted.

The directory's files are restored incrementally: the tree it was last restored to or
collected as is recorded beside the environment, and a restore writes only what differs
while the directory still holds it; what it holds that was never captured is snapshotted onto
the environment's own thread before anything overwrites it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, ClassVar

from narrative.errors import InvalidInput, RestoreError
from narrative.fsutil import write_atomic
from narrative.models import Snapshot
from narrative.restore import materialize, materialize_confined
from narrative.runs import incoming_ref
from narrative.snapshot import take_snapshot

from .base import (
    RUNTIME_BOOTSTRAP,
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
    tail_start,
)
from .directory_processes import (
    SPAWN_MARKER_VAR,
    SUBREAPER,
    check_spawn_handle,
    command_env,
    kill_marked,
    signal_spawned,
    spawned_alive,
    take_reaped_usage,
    track_spawned,
    wait_streaming,
)
from .directory_workspace import (
    EMPTY_TREE,
    empty_directory,
    holds_tree,
    known_tree,
    remember_tree,
    sync_changes,
)
from .errors import ExecFailed, ResourceGone
from .keys import key_path
from .proctree import environment_marker
from .records import HUB_SOCKET, hub_socket_dir
from .sandbox import (
    SandboxPlan,
    SandboxStart,
    inside_sandbox,
    installation_root,
    interpreter_paths,
    never_started,
    require_bwrap,
    sandbox_attempts,
    sandboxed,
    secret_paths,
)
from .usage import ProcessUsage, UsageMeter, rusage_usage

__all__ = ["DirectoryProvider"]

log = logging.getLogger(__name__)


class DirectoryProvider(BaseProvider):
    """A provider whose resource id is an absolute directory path."""

    category = "local"
    capabilities: ClassVar[frozenset[str]] = frozenset({"exec", "files", "git", "python"})
    spawn_log_on_host: ClassVar[bool] = True

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        super().__init__(context, config)
        self.meters = 0
        """Meters open on the environment: while one is, sandboxed commands run under the
        subreaper (:data:`~providers.directory_processes.SUBREAPER`), as spawned ones always
        do; otherwise a command does not pay for its start."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, resource_id: str) -> None:
        self.reconnect(resource_id)

    def stop(self, resource_id: str) -> None:
        """End every process of the environment (as stopping a container does); its files
        stay as they are."""
        self.end_leftovers(resource_id)

    def reconnect(self, resource_id: str) -> None:
        if not os.path.isdir(resource_id):
            raise ResourceGone(resource_id)

    # -- files ----------------------------------------------------------------------------------

    def _path(self, resource_id: str, path: str) -> str:
        rel = check_relative_path(path)
        root = os.path.realpath(resource_id)
        full = os.path.join(root, rel)
        # a symlink inside the directory must not lead the operation outside it
        parent = os.path.realpath(os.path.dirname(full))
        if parent != root and not parent.startswith(root + os.sep):
            raise InvalidInput(f"path escapes the environment's workspace: {path}")
        return full

    def read_file(self, resource_id: str, path: str) -> bytes:
        full = self._path(resource_id, path)
        if os.path.islink(full):
            raise InvalidInput(f"{path} is a symlink")
        try:
            with open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise InvalidInput(f"no such file in the environment: {path}") from None
        except IsADirectoryError:
            raise InvalidInput(f"{path} is a directory") from None

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        full = self._path(resource_id, path)
        if os.path.islink(full) or os.path.isdir(full):
            raise InvalidInput(f"{path} is a symlink or a directory")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        self._path(resource_id, path)  # parents created: check again for symlinked dirs
        write_atomic(full, data, durable=False)

    def delete_file(self, resource_id: str, path: str) -> None:
        full = self._path(resource_id, path)
        if os.path.isdir(full) and not os.path.islink(full):
            raise InvalidInput(f"{path} is a directory")
        try:
            os.unlink(full)
        except FileNotFoundError:
            raise InvalidInput(f"no such file in the environment: {path}") from None

    # -- workspace ------------------------------------------------------------------------------

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        """Make the directory hold exactly ``snapshot``.

        When it still holds the tree it was last restored to or collected as (the usual case
        between runs), only the paths that differ are written, like a checkout switching
        commits. Otherwise whatever it holds is first snapshotted onto the environment's own
        thread, so a restore never destroys work that was not captured, and it is rewritten.
        """
        self.reconnect(resource_id)
        known = self._known_tree()
        try:
            if known is not None and holds_tree(self.context.store, resource_id, known):
                if sync_changes(self.context.store, resource_id, known, snapshot):
                    self._remember(snapshot.tree)
                    return
            elif os.listdir(resource_id):
                self._save_to_env_thread(resource_id, f"left in {self.context.env_name}")
            empty_directory(resource_id)
            materialize(self.context.store, snapshot, resource_id)
        except OSError as exc:
            raise RestoreError(f"cannot restore into {resource_id}: {exc}") from exc
        self._remember(snapshot.tree)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the directory (what it holds that was never captured is first snapshotted
        onto the environment's thread) and restore ``snapshot`` into it through confined
        opens. A sandboxed command's private ``/tmp`` is a tmpfs of its own sandbox: fresh for
        every command and every run already."""
        self.reconnect(resource_id)
        try:
            if os.listdir(resource_id):
                self.save_leftovers(resource_id, f"left in {self.context.env_name}")
            empty_directory(resource_id)
            if snapshot is not None:
                materialize_confined(self.context.store, snapshot, resource_id)
        except OSError as exc:
            raise RestoreError(f"cannot reset {resource_id}: {exc}") from exc
        self._remember(snapshot.tree if snapshot is not None else EMPTY_TREE.hex())

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process carrying this environment's marker (a sandboxed command's
        processes die with its sandbox's PID namespace already; this catches those of
        ``sandbox=none`` and of a runtime whose hub went away). Never this process or its
        ancestors, which carry it when a run in this environment drives the environment."""
        var, value = environment_marker(self.context.env_id)
        kill_marked(var, value)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        self.reconnect(resource_id)
        snapshot = take_snapshot(
            self.context.store,
            thread_id=thread_id,
            run_id=run_id,
            message=message,
            workspace=resource_id,
            stage_as=incoming_ref(run_id) if run_id else None,  # a result: screened first
        ).snapshot
        self._remember(snapshot.tree)
        return snapshot

    def _remember(self, tree: str) -> None:
        remember_tree(self.context.store, self.context.env_id, tree)

    def _known_tree(self) -> bytes | None:
        return known_tree(self.context.store, self.context.env_id)

    def save_leftovers(self, resource_id: str, message: str) -> Snapshot | None:
        """Snapshot the directory onto the environment's thread (created on first use), unless
        it holds exactly what was last restored or collected (then it is saved already)."""
        if holds_tree(self.context.store, resource_id, self._known_tree()):
            return None
        return self._save_to_env_thread(resource_id, message)

    def _save_to_env_thread(self, resource_id: str, message: str) -> Snapshot:
        from narrative.hierarchy import create_thread, list_threads

        store = self.context.store
        name = f"env/{self.context.env_name}"
        objective = store.config.default_objective
        thread = next((t for t in list_threads(store, objective) if t.name == name), None)
        if thread is None:
            thread = create_thread(store, objective, name)
        return self.collect(resource_id, thread.id, None, message)

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
        self.reconnect(resource_id)
        if not argv:
            raise InvalidInput("no command given")
        measured_by = self._exec_measured_by()  # (before the command: it decides how it runs)
        environment = command_env({**(env or {}), **self._marker_env()})
        proc = self._popen(resource_id, argv, environment, False, subprocess.PIPE, subprocess.PIPE)
        return wait_streaming(proc, timeout, on_output, measured_by)

    def _exec_measured_by(self) -> str | None:
        """Who measures a command's CPU and memory: its ``wait4`` — of the subreaper that a
        sandboxed command runs under while a meter is open (bwrap's alone leaves out the
        sandbox), else of the command itself; None: not measured."""
        if not self.sandbox_enabled or inside_sandbox():
            return f"{self.name}: wait4 rusage of the command (unsandboxed)"
        if self.meters > 0:
            return f"{self.name}: wait4 rusage of the command (in its bwrap sandbox)"
        return None

    # -- background processes -------------------------------------------------------------------

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` in the directory, in a new session, detached from the caller.

        Output is appended to ``log_path`` (created if missing), else discarded. While the
        caller lives, a daemon thread waits for the process so that it never lingers as a
        zombie; once the caller has exited, the process is an orphan reaped by init.
        """
        self.reconnect(resource_id)
        if not argv:
            raise InvalidInput("no command given")
        token = secrets.token_hex(12)
        environment = command_env({**(env or {}), **self._marker_env(), SPAWN_MARKER_VAR: token})
        output: IO[bytes] | None = None
        try:
            if log_path is not None:
                os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
                output = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
            stdout = output if output is not None else subprocess.DEVNULL
            stderr = subprocess.STDOUT if output is not None else subprocess.DEVNULL
            proc = self._popen(resource_id, argv, environment, True, stdout, stderr)
        except OSError as exc:
            raise ExecFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            if output is not None:
                output.close()
        return track_spawned(proc, token)

    def _popen(
        self,
        resource_id: str,
        argv: Sequence[str],
        environment: dict[str, str],
        background: bool,
        stdout: IO[bytes] | int,
        stderr: IO[bytes] | int,
    ) -> subprocess.Popen[bytes]:
        """``argv`` started in the directory, in a new session, in the sandbox unless there
        is none; once the sandbox was set up. When bwrap fails to set it up (the machine's
        mounts changed meanwhile, see :func:`~providers.sandbox.sandboxed`: here 4 commands in
        18,000 while Docker tests ran) the command never ran, and it is started again.

        Raises:
            ExecFailed: the program cannot be run, or the sandbox never started.
        """
        reasons: list[str] = []
        for _attempt in sandbox_attempts():
            try:
                with self._command(resource_id, argv, environment, background) as launch:
                    cmd, cmd_env, fds, start = launch
                    proc = subprocess.Popen(
                        cmd,
                        cwd=resource_id,
                        env=cmd_env,
                        pass_fds=fds,
                        stdin=start.stdin if start is not None else subprocess.DEVNULL,
                        stdout=stdout,
                        stderr=stderr,
                        start_new_session=True,
                    )
            except OSError as exc:
                raise ExecFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
            if start is None or start.started(_SANDBOX_START_TIMEOUT):
                return proc
            reasons.append(_why_not_started(proc))
            log.info("the sandbox of %s did not start: %s", self.context.env_name, reasons[-1])
        raise never_started(argv[0], reasons)

    def usage_meter(self, resource_id: str) -> UsageMeter:
        how = "in its bwrap sandbox" if self.sandbox_enabled else "unsandboxed"
        return _ReapedMeter(
            f"{self.name}: wait4 rusage of the runtime's process tree ({how})", self
        )

    def _marker_env(self) -> dict[str, str]:
        var, value = environment_marker(self.context.env_id)
        return {var: value}

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        """Signal the process group of the spawned process and every process that still
        carries its token."""
        signal_spawned(handle, sig)

    def alive(self, resource_id: str, handle: str) -> bool:
        return spawned_alive(handle)

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The end of ``log_path``, the host file :meth:`spawn` appended the output to (the
        handle does not name it; without it there is nothing to read). The file is shared by
        every process spawned with it, so its end may hold earlier processes' output too."""
        check_spawn_handle(handle)
        if log_path is None:
            return SpawnLog(0, b"")
        try:
            with open(log_path, "rb") as f:
                start = tail_start(os.fstat(f.fileno()).st_size, since, limit)
                f.seek(start)
                data = f.read(limit)  # the file may grow meanwhile: the size is what was read
        except (FileNotFoundError, IsADirectoryError):
            return SpawnLog(0, b"")
        return SpawnLog(start + len(data), data)

    # -- sandbox --------------------------------------------------------------------------------

    @property
    def sandbox_enabled(self) -> bool:
        """Whether commands run under bubblewrap (every setting but ``sandbox=none``)."""
        return getattr(self.config, "sandbox", "none") != "none"

    @classmethod
    def check_config(cls, config: ProviderConfig) -> None:
        """Refuse a sandboxed environment where ``bwrap`` is missing.

        Raises:
            SandboxUnavailable: the message says how to install it.
        """
        if getattr(config, "sandbox", "none") != "none" and not inside_sandbox():
            require_bwrap()

    def check_sandbox(self) -> None:
        """:meth:`check_config` of this environment's configuration (also when the provider
        is used without the manager)."""
        self.check_config(self.config)

    def warnings(self) -> list[str]:
        """What the user should know about this environment's isolation."""
        if self.sandbox_enabled:
            return []
        return [
            "no sandbox (sandbox=none): commands and agents run as you, with your whole file "
            "system, home directory secrets, workspace and store in reach"
        ]

    def hidden_paths(self) -> list[str]:
        """What a sandboxed command must not see: the user's workspace, the store, the gateway
        key and the home directory's secrets (see :mod:`providers.sandbox`)."""
        from narrative.location import data_dir

        store = self.context.store
        # data_dir: every store, worktree checkout and index of the user (this environment's
        # own checkout, when it lies there, is bound back writable)
        paths = [store.workspace, store.git_dir, key_path(store), data_dir(), *secret_paths()]
        configured_key = os.environ.get("NARRATIVE_GATEWAY_KEY")
        if configured_key:
            paths.append(configured_key)
        return paths

    @contextlib.contextmanager
    def _command(
        self,
        resource_id: str,
        argv: Sequence[str],
        environment: dict[str, str],
        background: bool,
    ) -> Iterator[tuple[list[str], dict[str, str], tuple[int, ...], SandboxStart | None]]:
        """``(command, environment, pass_fds, start)`` running ``argv`` in the environment's
        sandbox (as it is with ``sandbox=none``, ``start`` None); Popen is called inside the
        block, with ``start.stdin`` as standard input (see :func:`~providers.sandbox.sandboxed`).

        ``background`` is a spawned process (the runtime): it outlives its caller, since a hub
        that restarts adopts it, so it is not tied to the caller's life.
        """
        if not self.sandbox_enabled or inside_sandbox():
            yield list(argv), environment, (), None
            return
        bwrap = require_bwrap()
        _check_program(resource_id, argv[0], environment)
        # the runtime (a background process) reaches the hub through the socket directory, if
        # the environment has one (a subclass may have its runtime dial the hub's address)
        socket = self.hub_socket(resource_id) if background else None
        shared = (os.path.dirname(socket.host_path),) if socket is not None else ()
        plan = SandboxPlan(
            writable=resource_id,
            hidden=tuple(self.hidden_paths()),
            exposed=tuple(interpreter_paths()),
            shared=shared,
            network=getattr(self.config, "network", "host") != "none",
            die_with_parent=not background,
        )
        with sandboxed(bwrap, plan, argv, environment) as (sandbox, bwrap_env, fds, start):
            # bwrap itself carries the marker too: killing its init (PID 1 of the sandbox's
            # namespace) ends every process in there, also one that dropped its environment
            measured = background or self.meters > 0
            command = [sys.executable, "-I", "-S", "-c", SUBREAPER] if measured else []
            yield [*command, *sandbox], {**bwrap_env, **self._marker_env()}, fds, start

    def runtime_command(self) -> list[str]:
        """The configured ``runtime``, else this interpreter in isolated mode running this
        installation's ``cli`` (see :data:`RUNTIME_BOOTSTRAP`)."""
        runtime: list[str] | None = getattr(self.config, "runtime", None)
        if runtime:
            return list(runtime)
        return [sys.executable, "-I", "-c", RUNTIME_BOOTSTRAP, installation_root()]

    def health(self, resource_id: str) -> Health:
        """GONE without the directory; otherwise the runtime's import check
        (:meth:`~providers.base.BaseProvider.check_runtime`).

        Raises:
            RuntimeBroken: the runtime does not start, or a module of the workspace shadows
                one of its own (named in the message).
        """
        if not os.path.isdir(resource_id):
            return Health.GONE
        self.check_runtime(resource_id)
        return Health.OK

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        """The environment's private socket directory, bound read-only into the sandbox at
        the same path (so the runtime reaches the hub even with ``network=none``)."""
        path = os.path.join(hub_socket_dir(self.context.env_id), HUB_SOCKET)
        return HubSocket(path, path)


def _check_program(cwd: str, program: str, environment: Mapping[str, str]) -> None:
    """Raise ExecFailed for a program that does not exist (as Popen does outside a sandbox;
    inside, bwrap would start and the command fail with exit code 1)."""
    if os.sep in program:
        found = os.access(os.path.join(cwd, program), os.X_OK)
    else:
        found = shutil.which(program, path=environment.get("PATH", os.defpath)) is not None
    if not found:
        raise ExecFailed(f"cannot run {program!r}: No such file or directory")


class _ReapedMeter(UsageMeter):
    """The rusage of the spawned runtime, recorded when this process reaped it (a command's
    comes back in its :class:`ExecResult`)."""

    def __init__(self, measured_by: str, provider: DirectoryProvider) -> None:
        super().__init__(measured_by)
        self._provider: DirectoryProvider | None = provider
        provider.meters += 1

    def finish(self, handle: str | None) -> ProcessUsage:
        if self._provider is not None:
            self._provider.meters -= 1
            self._provider = None
        usage = take_reaped_usage(handle, timeout=5.0) if handle is not None else None
        if usage is None:
            return ProcessUsage(None, None, f"{self.measured_by}: not reaped by this process")
        return rusage_usage(usage, self.measured_by)


_SANDBOX_START_TIMEOUT = 60.0
"""Seconds bwrap may take to set a sandbox up."""


def _why_not_started(proc: subprocess.Popen[bytes]) -> str:
    """What bwrap said when it did not set the sandbox up (its standard error, when piped),
    once it is ended and reaped."""
    if proc.poll() is None:  # timed out setting up: end the whole attempt
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    _out, err = proc.communicate()
    said = (err or b"").decode(errors="replace").strip()
    return said or f"bwrap exited with {proc.returncode}"
