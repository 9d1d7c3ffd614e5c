"""The ``daytona`` provider: one Daytona sandbox per environment, through the official SDK.

The sandbox id is the resource id (``Daytona.get`` reconnects). Snapshots travel as tar files,
as with e2b (:mod:`providers.shipping`; what comes back is treated as hostile). Each command is
a command of its own session in the sandbox's daemon, which keeps stdout and stderr apart: with
output to stream or a timeout it runs asynchronously and is polled, a timeout killing its
processes by their marker (:mod:`providers.proctree`); spawned processes are such commands left
running (handle ``daytona:<command id>:<marker>``, output in the session's log). Auto-stop is
honoured (docs/decisions.md): a stopped sandbox is ``unreachable`` and started again on use
(never by asking whether a process lives), and activity is recorded while a runtime works;
429s are retried after ``Retry-After`` (:mod:`providers.daytona_calls`). The API key is read
from the variable the config names into the SDK's client only.
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
import shlex
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from daytona import (
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    Daytona,
    FileUpload,
    ListSandboxesQuery,
    Resources,
    Sandbox,
    SandboxState,
    SessionExecuteRequest,
    SessionExecuteResponse,
)

from narrative.errors import InvalidInput, NarrativeError
from narrative.trees import flatten_tree

from .base import (
    SPAWN_LOG_LIMIT,
    BaseProvider,
    ExecResult,
    Health,
    OutputFn,
    ProviderConfig,
    ProviderContext,
    Signal,
    SpawnLog,
    check_relative_path,
    tail_start,
)
from .daytona_calls import (
    HANDLE_PREFIX,
    MARKER_LENGTH,
    SESSION_PREFIX,
    TOO_LARGE,
    call_daytona,
    exports_file,
    extract_script,
    keep_awake,
    make_client,
    pack_script,
    parse_handle,
    record_session,
    session_line,
    session_recorded,
)
from .daytona_config import DaytonaConfig
from .e2b_config import read_uploads
from .emptying import TEMP_DIRS, empty_argv
from .errors import ProviderError, ProviderUnavailable, ResourceGone, ResultTooLarge
from .proctree import MARKER_VAR, environment_marker, signal_argv
from .shipping import scratch_dir, snapshot_from_tar, write_snapshot_tar

if TYPE_CHECKING:
    from narrative.models import Snapshot

__all__ = ["DaytonaConfig", "DaytonaProvider"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_STAGING = ".narrative-staging"
"""Directory beside the workdir for tars in transit (never inside the collected tree)."""
_ASLEEP = {SandboxState.STOPPED, SandboxState.ARCHIVED, SandboxState.STOPPING}
_DEAD = {SandboxState.DESTROYED, SandboxState.DESTROYING}


class DaytonaProvider(BaseProvider):
    """Environments in Daytona sandboxes (cloud, isolated, with network)."""

    name = "daytona"
    category = "cloud"
    resets_without_store = True  # its workspace lives elsewhere
    capabilities = frozenset({"python", "exec", "files", "network", "isolation"})
    config_model = DaytonaConfig

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        if not isinstance(config, DaytonaConfig):
            raise InvalidInput(
                f"daytona provider needs a DaytonaConfig, not {type(config).__name__}"
            )
        super().__init__(context, config)
        self.cfg = config
        self._client: Daytona | None = None
        self._client_lock = threading.Lock()
        self._handles: dict[str, Sandbox] = {}
        self.sleep: Callable[[float], None] = time.sleep
        """How the provider waits out a 429 (tests replace it to record the waits)."""

    @classmethod
    def capabilities_for(cls, config: ProviderConfig) -> frozenset[str]:
        extra = config.extra_capabilities if isinstance(config, DaytonaConfig) else []
        return cls.capabilities | frozenset(extra)

    # -- the SDK --------------------------------------------------------------------------------

    def _daytona(self) -> Daytona:
        """The SDK client, made once (the hub's threads and the keep-alive share it)."""
        with self._client_lock:
            if self._client is None:
                self._client = make_client(self.cfg.api_key_env, self.cfg.api_url, self.cfg.target)
            return self._client

    def _call(self, fn: Callable[[], T], resource_id: str | None, path: str | None = None) -> T:
        """``fn()``, retried while Daytona answers 429, with every error translated."""
        return call_daytona(fn, resource_id, path, self.cfg.rate_limit_wait, self.sleep)

    def _sandbox(self, resource_id: str) -> Sandbox:
        """A handle on the sandbox, started again when Daytona stopped it for idleness."""
        handle = self._handles.get(resource_id) or self._sandbox_as_is(resource_id)
        if handle.state in _ASLEEP:
            self._wake(resource_id, handle)
        return handle

    def _wake(self, resource_id: str, sandbox: Sandbox) -> None:
        log.info("starting daytona sandbox %s (it was %s)", resource_id, sandbox.state)
        if sandbox.state == SandboxState.STOPPING:
            self._call(lambda: sandbox.wait_for_sandbox_stop(self.cfg.create_timeout), resource_id)
        self._call(lambda: sandbox.start(self.cfg.create_timeout), resource_id)

    def _toolbox(
        self, rid: str, fn: Callable[[Sandbox], T], path: str | None = None, wake: bool = True
    ) -> T:
        """``fn(sandbox)`` on the toolbox; once more after a start when the sandbox turns out
        to have been stopped meanwhile (auto-stop). ``wake=False``: a stopped sandbox stays
        stopped, and the call fails."""
        sandbox = self._sandbox(rid) if wake else self._sandbox_as_is(rid)
        try:
            return self._call(lambda: fn(sandbox), rid, path)
        except (ProviderError, InvalidInput):
            # a stopped sandbox's toolbox answers 400 "... Is the Sandbox started?"
            self._call(sandbox.refresh_data, rid)
            if sandbox.state not in _ASLEEP or not wake:
                raise
        self._wake(rid, sandbox)
        return self._call(lambda: fn(sandbox), rid, path)

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        cfg, ctx = self.cfg, self.context
        labels = {**cfg.labels, "narrative.owner": ctx.owner, "narrative.env": ctx.env_id}
        common: dict[str, Any] = {
            "env_vars": dict(cfg.env),
            "labels": labels,
            "auto_stop_interval": cfg.auto_stop_interval,
            "auto_delete_interval": cfg.auto_delete_interval,
            "network_allow_list": cfg.network_allow_list,
            "target": cfg.target,
        }
        params: CreateSandboxFromImageParams | CreateSandboxFromSnapshotParams
        if cfg.image:
            resources = Resources(cpu=cfg.cpu, memory=cfg.memory, disk=cfg.disk)
            params = CreateSandboxFromImageParams(image=cfg.image, resources=resources, **common)
        else:
            params = CreateSandboxFromSnapshotParams(snapshot=cfg.snapshot, **common)
        read_uploads(self.context.store.workspace, cfg.upload)  # refused before anything is made
        client = self._daytona()
        sandbox = self._call(lambda: client.create(params, timeout=cfg.create_timeout), None)
        self._handles[rid := str(sandbox.id)] = sandbox
        log.info("created daytona sandbox %s for environment %s", rid, self.context.env_name)
        self._prepare(rid)
        return rid

    def _prepare(self, resource_id: str, skip: set[str] | None = None) -> None:
        """The workdir exists and holds the configured uploads (all checked before any is
        sent)."""
        files = read_uploads(self.context.store.workspace, self.cfg.upload, skip)
        self._script(resource_id, f"mkdir -p {shlex.quote(self.cfg.workdir)}", "preparing")
        if files:
            uploads = [FileUpload(data, posixpath.join(self.cfg.workdir, n)) for n, data in files]
            self._toolbox(resource_id, lambda s: s.fs.upload_files(uploads))
            log.debug("uploaded %s to daytona sandbox %s", [n for n, _ in files], resource_id)

    def start(self, resource_id: str) -> None:
        self.reconnect(resource_id)  # afresh: Daytona may have stopped it
        self._prepare(resource_id)

    def stop(self, resource_id: str) -> None:
        sandbox = self._sandbox_as_is(resource_id)
        if sandbox.state not in _ASLEEP:
            self._call(lambda: sandbox.stop(self.cfg.create_timeout), resource_id)

    def _sandbox_as_is(self, resource_id: str) -> Sandbox:
        """A fresh handle on the sandbox in whatever state it is (not started)."""
        self._handles.pop(resource_id, None)
        client = self._daytona()
        sandbox = self._call(lambda: client.get(resource_id), resource_id)
        if sandbox.state in _DEAD:
            raise ResourceGone(resource_id)
        self._handles[resource_id] = sandbox
        return sandbox

    def delete(self, resource_id: str) -> None:
        try:
            sandbox = self._sandbox_as_is(resource_id)
            self._call(lambda: sandbox.delete(self.cfg.create_timeout), resource_id)
        except ResourceGone:
            pass
        finally:
            self._handles.pop(resource_id, None)

    def reconnect(self, resource_id: str) -> None:
        self._handles.pop(resource_id, None)
        self._sandbox(resource_id)

    def health(self, resource_id: str) -> Health:
        """GONE without the sandbox, UNREACHABLE when it is stopped (auto-stop included) or
        does not answer; with a ``runtime`` configured, the runtime's import check too."""
        try:
            sandbox = self._sandbox_as_is(resource_id)
            if sandbox.state != SandboxState.STARTED:
                return Health.UNREACHABLE
            self._script(resource_id, "true", "probe")
        except ResourceGone:
            return Health.GONE
        except (ProviderUnavailable, ProviderError):
            return Health.UNREACHABLE
        if self.cfg.runtime:
            self.check_runtime(resource_id)
        return Health.OK

    def list_resources(self) -> list[str]:
        client = self._daytona()
        query = ListSandboxesQuery(labels={"narrative.owner": self.context.owner})
        found = self._call(lambda: [s for s in client.list(query) if s.state not in _DEAD], None)
        return self.listed({str(s.id): s.labels for s in found}, "narrative.env")

    # -- commands -------------------------------------------------------------------------------

    def _command(
        self,
        resource_id: str,
        argv_or_script: str,
        marker: str,
        private_env: Mapping[str, str] | None,
        *,
        marked: bool = True,
        quiet: bool = False,
        cwd: str | None = None,
    ) -> str:
        """The shell line a session runs: the working directory (default: the workdir), the
        variables, the command. The caller's variables (a run token, say) are not put on the
        line, which the daemon keeps and lists: they go in a file the line reads and removes."""
        variables = dict(self.cfg.env) if marked else {}
        variables[MARKER_VAR] = marker
        if marked:
            var, value = environment_marker(self.context.env_id)
            variables[var] = value
        line = session_line(cwd or self.cfg.workdir, variables, argv_or_script, quiet)
        if not private_env:
            return line
        path = posixpath.join(posixpath.dirname(self.cfg.workdir), _STAGING, f"env-{marker}")
        upload = [FileUpload(exports_file(private_env), path)]
        self._toolbox(resource_id, lambda s: s.fs.upload_files(upload))
        return f". {shlex.quote(path)} && rm -f {shlex.quote(path)} && {line}"

    def _start(
        self, resource_id: str, session: str, line: str, wait: bool = False
    ) -> SessionExecuteResponse:
        """Run ``line`` in a new session; with ``wait``, until it ends (one request, which
        answers the exit code and both outputs)."""

        def run(sandbox: Sandbox) -> SessionExecuteResponse:
            sandbox.process.create_session(session)
            request = SessionExecuteRequest(command=line, run_async=not wait)
            return sandbox.process.execute_session_command(session, request)

        return self._toolbox(resource_id, run)

    def _end_session(self, resource_id: str, session: str) -> None:
        try:
            self._toolbox(resource_id, lambda s: s.process.delete_session(session))
        except (NarrativeError, OSError) as exc:
            log.debug("daytona session %s of %s not deleted: %s", session, resource_id, exc)

    def _logs(self, resource_id: str, session: str, command_id: str) -> tuple[str, str, str]:
        logs = self._toolbox(
            resource_id, lambda s: s.process.get_session_command_logs(session, command_id)
        )
        return logs.stdout or "", logs.stderr or "", logs.output or ""

    def _exit_code(self, rid: str, session: str, cmd: str, wake: bool = True) -> int | None:
        get = self._toolbox(rid, lambda s: s.process.get_session_command(session, cmd), None, wake)
        return None if get.exit_code is None else int(get.exit_code)

    def _kill_marked(self, resource_id: str, marker: str, sig: Signal = "kill") -> ExecResult:
        return self._script(resource_id, shlex.join(signal_argv(marker, sig)), "signal")

    def _run(
        self,
        resource_id: str,
        line: str,
        marker: str,
        timeout: float | None,
        on_output: OutputFn | None,
    ) -> ExecResult:
        """Run ``line`` as a session command; output is polled and streamed, a non-zero exit is
        a result. The daemon's logs are text: bytes are that text re-encoded."""
        session = f"{SESSION_PREFIX}{marker}"
        wait = not timeout and on_output is None  # nothing to stream or watch: one request
        started = self._start(resource_id, session, line, wait)
        command_id = str(started.cmd_id)
        sent = {"stdout": 0, "stderr": 0}
        deadline = None if not timeout else time.monotonic() + timeout
        code: int | None = None
        timed_out = False
        try:
            if wait and started.exit_code is not None:
                out, err = started.stdout or "", started.stderr or ""
                return ExecResult(int(started.exit_code), out.encode(), err.encode())
            while True:
                code = self._exit_code(resource_id, session, command_id)
                stdout, stderr, _ = self._logs(resource_id, session, command_id)
                for kind, text in (("stdout", stdout), ("stderr", stderr)):
                    if on_output is not None and len(text) > sent[kind]:
                        on_output(kind, text[sent[kind] :].encode())
                    sent[kind] = len(text)
                if code is not None:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    self._kill_marked(resource_id, marker)
                    stdout, stderr, _ = self._logs(resource_id, session, command_id)
                    break
                time.sleep(self.cfg.poll_interval)
        finally:
            self._end_session(resource_id, session)
        if timed_out:
            return ExecResult(-1, stdout.encode(), stderr.encode(), timed_out=True)
        return ExecResult(int(code or 0), stdout.encode(), stderr.encode())

    def _shell(self, resource_id: str, script: str) -> ExecResult:
        """Run a shell script of the provider's own in ``/`` (unmarked, so the environment's
        sweep spares it)."""
        marker = secrets.token_hex(MARKER_LENGTH // 2)
        script_line = f"sh -c {shlex.quote(script)}"
        line = self._command(resource_id, script_line, marker, None, marked=False, cwd="/")
        return self._run(resource_id, line, marker, None, None)

    def _script(self, resource_id: str, script: str, what: str) -> ExecResult:
        """:meth:`_shell`; a non-zero exit is a :class:`ProviderError`."""
        result = self._shell(resource_id, script)
        if result.exit_code != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise ProviderError(f"{what} in daytona sandbox {resource_id} failed: {detail}")
        return result

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        if not argv:
            raise InvalidInput("empty command")
        marker = secrets.token_hex(MARKER_LENGTH // 2)
        line = self._command(resource_id, shlex.join(argv), marker, env)
        return self._run(resource_id, line, marker, timeout, on_output)

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process a command of this environment left running, and end the
        sessions the provider opened."""
        var, value = environment_marker(self.context.env_id)
        self._script(resource_id, shlex.join(signal_argv(value, "kill", var)), "ending leftovers")
        for session in self._toolbox(resource_id, lambda s: s.process.list_sessions()):
            if (name := str(session.session_id)).startswith(SESSION_PREFIX):
                self._end_session(resource_id, name)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the workdir and the temporary directories, then restore ``snapshot`` (None:
        put back only the configured uploads)."""
        self._script(resource_id, shlex.join(empty_argv([self.cfg.workdir, *TEMP_DIRS])), "reset")
        if snapshot is not None:
            self.restore(resource_id, snapshot)
        else:
            self._prepare(resource_id)

    # -- background processes -------------------------------------------------------------------

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` in the workdir as a session command left running.

        The handle is ``daytona:<command id>:<marker>``. ``log_path`` cannot be written from
        the sandbox: with it, the output is kept in the session's log, which
        :meth:`read_spawn_log` reads; without it, the output is discarded.
        """
        if not argv:
            raise InvalidInput("empty command")
        marker = secrets.token_hex(MARKER_LENGTH // 2)
        line = self._command(resource_id, shlex.join(argv), marker, env, quiet=log_path is None)
        record_session(self.context, f"{SESSION_PREFIX}{marker}")
        started = self._start(resource_id, f"{SESSION_PREFIX}{marker}", line)
        return f"{HANDLE_PREFIX}{started.cmd_id}:{marker}"

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """:meth:`spawn`, and while the runtime runs, activity recorded every
        ``keepalive_interval`` seconds: its traffic with the hub is no activity to Daytona, so
        a run longer than ``auto_stop_interval`` would be stopped under it otherwise."""
        handle = self.spawn(resource_id, argv, env=env, log_path=log_path)
        if self.cfg.auto_stop_interval:
            period = self.cfg.keepalive_interval or self.cfg.auto_stop_interval * 20.0

            def still_running() -> bool:
                return self.alive(resource_id, handle)

            keep_awake(still_running, period, f"daytona-keepalive-{resource_id}")
        return handle

    def _spawned_code(self, resource_id: str, handle: str, wake: bool = True) -> int | None:
        """The exit code of a spawned process (None while it runs)."""
        session, command_id = parse_handle(handle)
        try:
            return self._exit_code(resource_id, session, command_id, wake)
        except ResourceGone:
            self._sandbox_as_is(resource_id)  # the sandbox is there: the session is not
            if session_recorded(self.context, session):
                return -9  # killed with its session (by end_leftovers, or a stop)
            raise InvalidInput(f"no process {handle} in daytona sandbox {resource_id}") from None

    def _awake(self, resource_id: str, handle: str) -> bool:
        """Whether the sandbox runs (a stopped one's processes are gone: nothing wakes it to
        ask about them); ``handle`` is refused unless it has the provider's shape."""
        parse_handle(handle)
        return self._sandbox_as_is(resource_id).state == SandboxState.STARTED

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        """Send ``sig`` to every process carrying the handle's marker (the spawned process and
        its descendants); nothing when none is left."""
        if not self._awake(resource_id, handle):
            return
        self._spawned_code(resource_id, handle)  # refuses a handle this sandbox never issued
        self._kill_marked(resource_id, handle.rsplit(":", 1)[1], sig)

    def alive(self, resource_id: str, handle: str) -> bool:
        """Whether the spawned command has no exit code yet (never, in a stopped sandbox: its
        processes are gone, and asking never starts it again). Asking counts as activity: the
        keep-alive of :meth:`spawn_runtime` asks, and must not undo a stop."""
        try:
            running = self._awake(resource_id, handle) and (
                self._spawned_code(resource_id, handle, wake=False) is None
            )
        except (ProviderError, InvalidInput):  # a stopped toolbox answers 400
            if self._awake(resource_id, handle):
                raise
            return False  # stopped while asked
        if running and self.cfg.auto_stop_interval:
            self._call(self._sandbox_as_is(resource_id).refresh_activity, resource_id)
        return running

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The end of the spawned command's session log (stdout and stderr as the daemon
        interleaved them); a session that is gone, or a sandbox that is: an empty log."""
        session, command_id = parse_handle(handle)
        try:
            if not self._awake(resource_id, handle):
                return SpawnLog(0, b"")
            _, _, output = self._logs(resource_id, session, command_id)
        except (NarrativeError, OSError) as exc:
            log.debug("no log of %s in daytona sandbox %s: %s", handle, resource_id, exc)
            return SpawnLog(0, b"")
        data = output.encode()
        size = len(data)
        return SpawnLog(size, data[tail_start(size, since, limit) :][-limit:])

    def runtime_command(self) -> list[str]:
        """The configured ``runtime``, else ``narrative`` from the sandbox's ``PATH``."""
        return list(self.cfg.runtime) if self.cfg.runtime else ["narrative"]

    # -- files ----------------------------------------------------------------------------------

    def _abs(self, path: str) -> str:
        return posixpath.join(self.cfg.workdir, check_relative_path(path))

    def read_file(self, resource_id: str, path: str) -> bytes:
        target = self._abs(path)
        data = self._toolbox(resource_id, lambda s: s.fs.download_file(target), path)
        return bytes(data)

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        target = self._abs(path)
        upload = [FileUpload(bytes(data), target)]
        self._toolbox(resource_id, lambda s: s.fs.upload_files(upload), path)

    def delete_file(self, resource_id: str, path: str) -> None:
        target = shlex.quote(self._abs(path))
        script = (
            f"if [ -d {target} ] && [ ! -L {target} ]; then exit 3; fi; "
            f"if [ -e {target} ] || [ -L {target} ]; then rm -f {target}; else exit 4; fi"
        )
        result = self._shell(resource_id, script)
        if result.exit_code == 3:
            raise IsADirectoryError(f"{path} is a directory")
        if result.exit_code == 4:
            raise FileNotFoundError(f"{path}: no such file in the environment")
        if result.exit_code != 0:
            raise ProviderError(f"deleting {path} in daytona sandbox {resource_id} failed")

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        staging = posixpath.join(posixpath.dirname(self.cfg.workdir), _STAGING)
        name = f"restore-{uuid.uuid4().hex}.tar"
        with tempfile.NamedTemporaryFile(suffix=".tar") as tar:
            write_snapshot_tar(self.context.store, snapshot, tar)
            tar.flush()
            upload = [FileUpload(tar.name, posixpath.join(staging, name))]
            self._toolbox(resource_id, lambda s: s.fs.upload_files(upload))
        staged = posixpath.join(staging, name)
        self._script(resource_id, extract_script(self.cfg.workdir, staged), "restore")
        present = set(flatten_tree(self.context.store.odb, bytes.fromhex(snapshot.tree)))
        self._prepare(resource_id, skip=present)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        parent, limit = posixpath.dirname(self.cfg.workdir), self.config.max_result_bytes
        staged = posixpath.join(parent, _STAGING, f"collect-{uuid.uuid4().hex}.tar")
        # the size is checked in the sandbox, so an oversized tar is never downloaded
        packed = self._shell(resource_id, pack_script(self.cfg.workdir, staged, limit))
        if packed.exit_code == TOO_LARGE:
            raise ResultTooLarge(
                f"the workspace in daytona sandbox {resource_id} exceeds {limit} bytes"
            )
        if packed.exit_code != 0:
            detail = packed.stderr.decode(errors="replace").strip()
            raise ProviderError(f"collecting from daytona sandbox {resource_id} failed: {detail}")
        try:
            with tempfile.TemporaryDirectory() as scratch:
                local = os.path.join(scratch, "collect.tar")
                self._toolbox(resource_id, lambda s: s.fs.download_file(staged, local))
                with open(local, "rb") as stream:
                    return snapshot_from_tar(
                        self.context.store,
                        stream,
                        scratch_dir(self.context.store, self.context.env_id),
                        thread_id,
                        run_id,
                        message,
                        strip="./",
                        max_bytes=limit,
                    )
        finally:
            try:
                self._script(resource_id, f"rm -f {shlex.quote(staged)}", "cleaning up")
            except (NarrativeError, OSError) as exc:
                log.warning(
                    "could not remove %s from daytona sandbox %s: %s", staged, resource_id, exc
                )
