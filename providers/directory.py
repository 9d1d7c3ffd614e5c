"""Environments that are a directory on this machine: the shared base of ``local`` and
``worktree``.

Commands run as child processes of the caller in the directory (a new session, so a timeout
kills the whole process group), inside a bubblewrap sandbox unless the environment says
``sandbox=none`` (:mod:`providers.sandbox`: the file system read-only but for the directory,
the user's workspace, the store, the keys and the home directory's secrets hidden).

Commands see the caller's environment without the variables that point git at a repository
(``GIT_DIR``, ``GIT_WORK_TREE``, ``GIT_INDEX_FILE``, ...: the list of
``git rev-parse --local-env-vars``), so a ``git`` run in the directory never writes the
caller's repository; the variables a call passes are added on top.

Every command, spawned process and sandbox (``bwrap`` itself) carries the environment's marker
(:func:`providers.proctree.environment_marker`), by which
:meth:`~DirectoryProvider.end_leftovers` kills what earlier runs left before the next starts.

Background processes (:meth:`DirectoryProvider.spawn`) run in a session of their own, with
``NARRATIVE_SPAWN_ID`` in their environment. Their handle is ``proc:<pid>:<start>:<token>``
(``start``: the start time from ``/proc/<pid>/stat``, which guards against a reused pid);
:meth:`~DirectoryProvider.signal` signals the process group and every process still carrying
the token (descendants that left the group), so it needs Linux's ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, ClassVar

from narrative.errors import InvalidInput, RestoreError
from narrative.fsutil import write_atomic
from narrative.models import Snapshot
from narrative.objects import hash_object
from narrative.restore import materialize, materialize_confined, sync_directory
from narrative.runs import incoming_ref
from narrative.snapshot import scan_tree, take_snapshot
from narrative.trees import FlatTree, flatten_tree

from .base import (
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
from .errors import ExecFailed, ResourceGone
from .keys import key_path
from .proctree import environment_marker
from .records import HUB_SOCKET, env_state_dir, hub_socket_dir
from .sandbox import (
    SandboxPlan,
    inside_sandbox,
    installation_root,
    interpreter_paths,
    require_bwrap,
    sandboxed,
    secret_paths,
)
from .usage import ProcessUsage, ReapedProcesses, UsageMeter, rusage_usage

__all__ = ["RUNTIME_BOOTSTRAP", "SPAWN_MARKER_VAR", "DirectoryProvider", "command_env"]

_CHUNK = 64 * 1024

RUNTIME_BOOTSTRAP = (
    "import runpy, sys; root = sys.argv.pop(1); "
    "root in sys.path or sys.path.insert(0, root); "
    "runpy.run_module('cli', run_name='__main__', alter_sys=True)"
)
"""What ``python -I -c`` runs to start the runtime. Isolated mode (``-I``) keeps the working
directory (the environment's workspace, which the agent controls) off ``sys.path`` and ignores
``PYTHON*`` variables, so no workspace file (``cli/``, ``json.py``...) replaces a module of the
runtime; the installation's own directory (the first argument) is put back explicitly, which
also serves a checkout run through ``PYTHONPATH`` or an editable install."""

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
_EMPTY_TREE = hash_object("tree", b"")


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


class DirectoryProvider(BaseProvider):
    """A provider whose resource id is an absolute directory path."""

    category = "local"
    capabilities: ClassVar[frozenset[str]] = frozenset({"exec", "files", "git", "python"})
    spawn_log_on_host: ClassVar[bool] = True

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        super().__init__(context, config)
        self.meters = 0
        """Meters open on the environment: while one is, sandboxed commands run under the
        subreaper (:data:`_SUBREAPER`), as spawned ones always do; otherwise a command does
        not pay for its start."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, resource_id: str) -> None:
        self.reconnect(resource_id)

    def stop(self, resource_id: str) -> None:
        """A directory has nothing to stop; its files stay as they are."""

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
            if known is not None and self._captured(resource_id, known):
                if self._sync(resource_id, known, snapshot):
                    self._remember(snapshot.tree)
                    return
            elif os.listdir(resource_id):
                self._save_to_env_thread(resource_id, f"left in {self.context.env_name}")
            _empty(resource_id)
            materialize(self.context.store, snapshot, resource_id)
        except OSError as exc:
            raise RestoreError(f"cannot restore into {resource_id}: {exc}") from exc
        self._remember(snapshot.tree)

    def _sync(self, resource_id: str, known: bytes, snapshot: Snapshot) -> bool:
        """Write only what differs between ``known`` and ``snapshot``; False when an ignored
        file blocks a path (the caller then rewrites everything)."""
        store = self.context.store
        target = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
        try:
            sync_directory(store, resource_id, flatten_tree(store.odb, known), target)
        except RestoreError:
            return False
        _remove_strays(resource_id, target)
        return True

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the directory (what it holds that was never captured is first snapshotted
        onto the environment's thread) and restore ``snapshot`` into it through confined
        opens. A sandboxed command's private ``/tmp`` is a tmpfs of its own sandbox: fresh for
        every command and every run already."""
        self.reconnect(resource_id)
        try:
            if os.listdir(resource_id):
                self.save_leftovers(resource_id, f"left in {self.context.env_name}")
            _empty(resource_id)
            if snapshot is not None:
                materialize_confined(self.context.store, snapshot, resource_id)
        except OSError as exc:
            raise RestoreError(f"cannot reset {resource_id}: {exc}") from exc
        self._remember(snapshot.tree if snapshot is not None else _EMPTY_TREE.hex())

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process carrying this environment's marker (a sandboxed command's
        processes die with its sandbox's PID namespace already; this catches those of
        ``sandbox=none`` and of a runtime whose hub went away). Never this process or its
        ancestors, which carry it when a run in this environment drives the environment."""
        var, value = environment_marker(self.context.env_id)
        spared = _ancestors(os.getpid())
        _kill_all(lambda: set(_marked(value, var)) - spared, "kill")

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

    def _marker(self) -> str:
        return os.path.join(env_state_dir(self.context.store, self.context.env_id), "tree")

    def _remember(self, tree: str) -> None:
        """Record the tree the directory is known to hold (restored or collected)."""
        write_atomic(self._marker(), tree.encode(), durable=False)

    def _known_tree(self) -> bytes | None:
        """The tree last restored or collected, if recorded."""
        try:
            with open(self._marker(), "rb") as f:
                return bytes.fromhex(f.read().decode())
        except (FileNotFoundError, ValueError):
            return None

    def _captured(self, resource_id: str, known: bytes | None) -> bool:
        """Whether the directory still holds ``known`` (the tree last restored or collected)."""
        if known is None:
            return False
        _scan, root, _cache = scan_tree(self.context.store, resource_id)
        return (root or _EMPTY_TREE) == known

    def save_leftovers(self, resource_id: str, message: str) -> Snapshot | None:
        """Snapshot the directory onto the environment's thread (created on first use), unless
        it holds exactly what was last restored or collected (then it is saved already)."""
        if self._captured(resource_id, self._known_tree()):
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
        try:
            environment = command_env({**(env or {}), **self._marker_env()})
            with self._command(resource_id, argv, environment, False) as (cmd, cmd_env, fds):
                proc = subprocess.Popen(
                    cmd,
                    cwd=resource_id,
                    env=cmd_env,
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
        except OSError as exc:
            raise ExecFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        return _wait_streaming(proc, timeout, on_output, measured_by)

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
            with self._command(resource_id, argv, environment, True) as (cmd, cmd_env, fds):
                proc = subprocess.Popen(
                    cmd,
                    cwd=resource_id,
                    env=cmd_env,
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=output if output is not None else subprocess.DEVNULL,
                    stderr=subprocess.STDOUT if output is not None else subprocess.DEVNULL,
                    start_new_session=True,
                )
        except OSError as exc:
            raise ExecFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            if output is not None:
                output.close()
        # Read before the reaper starts: even a process that exited at once is still a zombie.
        stat = _proc_stat(proc.pid)
        start = stat[19] if stat is not None else "0"
        handle = f"proc:{proc.pid}:{start}:{token}"

        def reap() -> None:
            usage = _wait_rusage(proc)
            if usage is not None:
                _REAPED.record(handle, usage)

        threading.Thread(target=reap, name=f"reap-{proc.pid}", daemon=True).start()
        return handle

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
        pid, start, token = _parse_handle(handle)
        _kill_all(lambda: _tree(pid, start, token), sig)

    def alive(self, resource_id: str, handle: str) -> bool:
        pid, start, _token = _parse_handle(handle)
        stat = _proc_stat(pid)
        return stat is not None and stat[19] == start and stat[0] not in ("Z", "X")

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
        _parse_handle(handle)
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
    ) -> Iterator[tuple[list[str], dict[str, str], tuple[int, ...]]]:
        """``(command, environment, pass_fds)`` running ``argv`` in the environment's sandbox
        (as it is with ``sandbox=none``); Popen is called inside the block.

        ``background`` is a spawned process (the runtime): it outlives its caller, since a hub
        that restarts adopts it, so it is not tied to the caller's life.
        """
        if not self.sandbox_enabled or inside_sandbox():
            yield list(argv), environment, ()
            return
        bwrap = require_bwrap()
        _check_program(resource_id, argv[0], environment)
        # the runtime (a background process) reaches the hub through the socket directory
        shared = (os.path.dirname(self.hub_socket(resource_id).host_path),) if background else ()
        plan = SandboxPlan(
            writable=resource_id,
            hidden=tuple(self.hidden_paths()),
            exposed=tuple(interpreter_paths()),
            shared=shared,
            network=getattr(self.config, "network", "host") != "none",
            die_with_parent=not background,
        )
        with sandboxed(bwrap, plan, argv, environment) as (sandbox, bwrap_env, fds):
            # bwrap itself carries the marker too: killing its init (PID 1 of the sandbox's
            # namespace) ends every process in there, also one that dropped its environment
            measured = background or self.meters > 0
            command = [sys.executable, "-I", "-S", "-c", _SUBREAPER] if measured else []
            yield [*command, *sandbox], {**bwrap_env, **self._marker_env()}, fds

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

    def hub_socket(self, resource_id: str) -> HubSocket:
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


def _parse_handle(handle: str) -> tuple[int, str, str]:
    match = _HANDLE.fullmatch(handle) if isinstance(handle, str) else None
    if match is None:
        raise InvalidInput(f"not a process handle of a directory environment: {handle!r}")
    return int(match[1]), match[2], match[3]


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (``[0]`` is the state,
    ``[2]`` the process group, ``[19]`` the start time); None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _tree(pid: int, start: str, token: str) -> set[int]:
    """The live processes of a spawned tree: its process group and whoever carries its token."""
    targets = set(_marked(token))
    stat = _proc_stat(pid)
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
        stat = _proc_stat(pid)
        pid = int(stat[1]) if stat is not None else 0
    return found


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == str(pgid) and stat[0] not in ("Z", "X"):
            members.append(pid)
    return members


def _marked(token: str, var: str = SPAWN_MARKER_VAR) -> list[int]:
    """Processes whose (initial) environment carries ``var=token`` (the spawn token)."""
    needle = f"{var}={token}".encode()
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _send(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, number)


def _remove_strays(root: str, target: FlatTree) -> None:
    """Remove what ``target`` does not hold (ignored files left by an earlier run)."""
    dirs = {""}
    for path in target:
        parent = os.path.dirname(path)
        while parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for current, subdirs, files in os.walk(root):
        rel = os.path.relpath(current, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        prefix = rel + "/" if rel else ""
        for name in list(subdirs):
            full = os.path.join(current, name)
            if os.path.islink(full):
                files.append(name)
            elif prefix + name not in dirs:
                shutil.rmtree(full)
            else:
                continue
            subdirs.remove(name)
        for name in files:
            if prefix + name not in target:
                os.unlink(os.path.join(current, name))


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def _pump(stream: IO[bytes], name: str, sink: list[bytes], on_output: OutputFn | None) -> None:
    while chunk := stream.read1(_CHUNK):  # type: ignore[attr-defined]
        sink.append(chunk)
        if on_output is not None:
            on_output(name, chunk)


def _wait_streaming(
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


_SUBREAPER = """
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
"""The rusage of the processes this process spawned (:meth:`DirectoryProvider.spawn`), by
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
        usage = _REAPED.take(handle, timeout=5.0) if handle is not None else None
        if usage is None:
            return ProcessUsage(None, None, f"{self.measured_by}: not reaped by this process")
        return rusage_usage(usage, self.measured_by)
