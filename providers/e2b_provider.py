"""The ``e2b`` provider: one E2B cloud sandbox per environment, through the real ``e2b`` SDK.

The sandbox id is the resource id, so any later process reconnects with ``Sandbox.connect``.
Snapshots travel as tar streams: restore uploads a tar written by
:func:`~providers.shipping.write_snapshot_tar` and extracts it with ``tar`` in the sandbox;
collect runs ``tar -c`` there, downloads the stream and hands it to
:func:`~providers.shipping.snapshot_from_tar`, which treats it as hostile. Commands run with
relative paths and ``cwd`` so they do not depend on where the sandbox keeps its files.

With ``E2B_DEBUG=true`` the SDK talks to a local envd and has no control plane: create always
yields the sandbox ``debug_sandbox_id``, connect and kill are no-ops, and sandbox metadata and
env vars are dropped. The provider then skips the control-plane calls the SDK would still make
(pause, info, list): ``stop`` leaves the sandbox running, ``health`` probes envd only, and
``list_resources`` returns nothing. Every e2b error is translated in one place
(:func:`providers.e2b_calls.translate_error`).
API keys are read from the environment variable the config names and never logged or stored.

Background processes (:meth:`E2BProvider.spawn`) are envd processes started without a time
limit and left running when the SDK disconnects from them. They carry a marker in their
environment (:mod:`providers.proctree`): :meth:`~E2BProvider.signal` runs a small ``sh``
script in the sandbox that signals every process carrying it (envd's own ``SendSignal``
reaches only the process itself, not its descendants), and :meth:`~E2BProvider.alive` asks
envd's process list for the pid with that marker.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import posixpath
import re
import secrets
import shlex
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from e2b import (
    CommandExitException,
    ConnectionConfig,
    FileType,
    Sandbox,
    SandboxException,
    SandboxQuery,
    TimeoutException,
)
from e2b.exceptions import SandboxNotRunningException, SandboxUnreachableException

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
from .e2b_calls import StreamReader, tar_failed, translating
from .e2b_config import E2BConfig, read_uploads
from .errors import ExecFailed, ProviderError, ProviderUnavailable, ResourceGone
from .proctree import MARKER_VAR, environment_marker, signal_argv
from .shipping import scratch_dir, snapshot_from_tar, write_snapshot_tar
from .usage import UsageMeter

if TYPE_CHECKING:
    from narrative.models import Snapshot

__all__ = ["E2BConfig", "E2BProvider"]

log = logging.getLogger(__name__)

_STAGING = ".narrative-staging"
"""Directory beside the workdir for tars in transit (never inside the collected tree)."""
_SKEW = 5
"""Seconds our clock may be behind the control plane's (see :func:`_time_left`)."""
_HANDLE = re.compile(r"e2b:([1-9][0-9]{0,9}):([0-9a-f]{24})")


class E2BProvider(BaseProvider):
    """Environments in E2B sandboxes (cloud, isolated, with network)."""

    name = "e2b"
    category = "cloud"
    resets_without_store = True  # its workspace lives elsewhere
    capabilities = frozenset({"python", "exec", "files", "network", "isolation"})
    config_model = E2BConfig

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        if not isinstance(config, E2BConfig):
            raise InvalidInput(f"e2b provider needs an E2BConfig, not {type(config).__name__}")
        super().__init__(context, config)
        self.cfg = config
        self._handles: dict[str, Sandbox] = {}

    @classmethod
    def capabilities_for(cls, config: ProviderConfig) -> frozenset[str]:
        extra = config.extra_capabilities if isinstance(config, E2BConfig) else []
        return cls.capabilities | frozenset(extra)

    # -- connection -----------------------------------------------------------------------------

    def _opts(self) -> dict[str, Any]:
        """SDK options; the API key comes from the configured variable, never from records."""
        key = os.environ.get(self.cfg.api_key_env)
        return {"api_key": key} if key else {}

    @property
    def _debug(self) -> bool:
        return bool(ConnectionConfig(**self._opts()).debug)

    def _sandbox(self, resource_id: str, timeout: int | None = None) -> Sandbox:
        """A handle on the sandbox (connecting resumes a paused one, as E2B defines it, and
        makes a running one live at least ``timeout`` seconds more: default, the configured
        timeout)."""
        handle = self._handles.get(resource_id)
        if handle is None:
            lives = self.cfg.timeout if timeout is None else timeout
            with translating(resource_id):
                handle = Sandbox.connect(resource_id, timeout=lives, **self._opts())
            self._handles[resource_id] = handle
        return handle

    def _probe(self, sandbox: Sandbox, resource_id: str) -> bool:
        with translating(resource_id):
            return bool(sandbox.is_running())

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        # the configured uploads are read and checked before anything is made: a refused one
        # must not leave a sandbox behind
        uploads = read_uploads(self.context.store.workspace, self.cfg.upload)
        metadata = {
            **self.cfg.metadata,
            "narrative.owner": self.context.owner,
            "narrative.env": self.context.env_id,
        }
        with translating(None):
            sandbox = Sandbox.create(
                template=self.cfg.template,
                timeout=self.cfg.timeout,
                metadata=metadata,
                envs=dict(self.cfg.env) or None,
                **self._opts(),
            )
        resource_id = str(sandbox.sandbox_id)
        self._handles[resource_id] = sandbox
        log.info("created e2b sandbox %s for environment %s", resource_id, self.context.env_name)
        with translating(resource_id):
            sandbox.files.make_dir(self.cfg.workdir)
        self._send_uploads(resource_id, sandbox, uploads)
        return resource_id

    def start(self, resource_id: str) -> None:
        self._handles.pop(resource_id, None)  # connect afresh: that is what resumes
        sandbox = self._sandbox(resource_id)
        if not self._probe(sandbox, resource_id):
            raise ResourceGone(resource_id)
        with translating(resource_id):
            sandbox.files.make_dir(self.cfg.workdir)
        self._upload_config(resource_id, sandbox)

    def stop(self, resource_id: str) -> None:
        if self._debug:
            # No control plane in debug mode: nothing can pause the sandbox; it keeps running.
            log.debug("e2b debug mode: sandbox %s left running on stop", resource_id)
            return
        with translating(resource_id):
            Sandbox.pause(resource_id, **self._opts())
        self._handles.pop(resource_id, None)

    def delete(self, resource_id: str) -> None:
        self._handles.pop(resource_id, None)
        try:
            with translating(resource_id):
                Sandbox.kill(resource_id, **self._opts())  # False when it is gone already
        except ResourceGone:
            pass

    def reconnect(self, resource_id: str) -> None:
        self._handles.pop(resource_id, None)
        sandbox = self._sandbox(resource_id)
        if not self._probe(sandbox, resource_id):
            self._handles.pop(resource_id, None)
            raise ResourceGone(resource_id)

    def health(self, resource_id: str) -> Health:
        """GONE without the sandbox, UNREACHABLE when it is paused or envd does not answer;
        with a ``runtime`` configured, the runtime's import check too
        (:meth:`~providers.base.BaseProvider.check_runtime`).

        Raises:
            RuntimeBroken: the runtime does not start, or workspace files shadow its modules.
        """
        try:
            left = None
            if not self._debug:
                with translating(resource_id):
                    info = Sandbox.get_info(resource_id, **self._opts())
                if str(info.state) != "running":
                    return Health.UNREACHABLE  # paused: exists, does not answer until resumed
                # a probe from a fresh process must not keep the sandbox alive
                left = _time_left(info.end_at)
            handle = self._sandbox(resource_id, left)
            if not self._probe(handle, resource_id):
                return Health.GONE
        except ResourceGone:
            return Health.GONE
        except ProviderUnavailable:
            return Health.UNREACHABLE
        if self.cfg.runtime:  # the default runtime may be absent: nothing runs it yet
            self.check_runtime(resource_id)
        return Health.OK

    def list_resources(self) -> list[str]:
        if self._debug:
            return []  # debug mode has no control plane to list from
        query = SandboxQuery(metadata={"narrative.owner": self.context.owner})
        found: dict[str, dict[str, str] | None] = {}
        with translating(None):
            paginator = Sandbox.list(query=query, **self._opts())
            while paginator.has_next:
                found.update((str(i.sandbox_id), i.metadata) for i in paginator.next_items())
        return self.listed(found, "narrative.env")

    # -- operations -----------------------------------------------------------------------------

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
        return self._run(
            resource_id,
            shlex.join(argv),
            cwd=self.cfg.workdir,
            env={**self.cfg.env, **(env or {}), **self._marker},
            timeout=timeout,
            on_output=on_output,
        )

    @property
    def _marker(self) -> dict[str, str]:
        """The variable every command and process of this environment carries (never the
        provider's own scripts), so that :meth:`end_leftovers` finds what a run left behind
        (a daemon that left its process group and session included)."""
        var, value = environment_marker(self.context.env_id)
        return {var: value}

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process a command of this environment left running."""
        var, value = environment_marker(self.context.env_id)
        result = self._run(
            resource_id, shlex.join(signal_argv(value, "kill", var)), cwd=self.cfg.workdir
        )
        if result.exit_code != 0:
            detail = result.stderr.decode(errors="replace").strip() or f"exit {result.exit_code}"
            raise ProviderError(f"could not end leftovers in e2b sandbox {resource_id}: {detail}")

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the workdir, then restore ``snapshot`` (None: put back only the configured
        uploads). The sandbox's temporary directories are not emptied (docs/security.md)."""
        if snapshot is not None:
            self.restore(resource_id, snapshot)
            return
        sandbox = self._sandbox(resource_id)
        with translating(resource_id):
            if sandbox.files.exists(self.cfg.workdir):
                sandbox.files.remove(self.cfg.workdir)
            sandbox.files.make_dir(self.cfg.workdir)
        self._upload_config(resource_id, sandbox)

    def _run(
        self,
        resource_id: str,
        command: str,
        *,
        cwd: str,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        """Run a shell command; output is streamed, a non-zero exit is a result, not an error.

        The SDK decodes output as UTF-8 (invalid bytes replaced), so the bytes in the result
        are that text re-encoded; move binary data through files instead.
        """
        sandbox = self._sandbox(resource_id)
        stdout: list[str] = []
        stderr: list[str] = []

        def sink(kind: str, chunks: list[str]) -> Any:
            def receive(text: str) -> None:
                chunks.append(text)
                if on_output is not None:
                    on_output(kind, text.encode())

            return receive

        with translating(resource_id):
            handle = sandbox.commands.run(
                command,
                background=True,
                envs=dict(env or {}),
                cwd=cwd,
                timeout=timeout or 0,
                retain_output=False,
            )
            try:
                result = handle.wait(
                    on_stdout=sink("stdout", stdout), on_stderr=sink("stderr", stderr)
                )
                code = int(result.exit_code)
            except CommandExitException as exc:
                code = int(exc.exit_code)
            except TimeoutException as exc:
                if isinstance(exc, SandboxNotRunningException | SandboxUnreachableException):
                    raise
                try:
                    handle.kill()
                except SandboxException:
                    log.debug("e2b: process %s was gone before the kill", handle.pid)
                return ExecResult(
                    -1, "".join(stdout).encode(), "".join(stderr).encode(), timed_out=True
                )
        return ExecResult(code, "".join(stdout).encode(), "".join(stderr).encode())

    # -- background processes -------------------------------------------------------------------

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` in the workdir as an envd process with no time limit, and
        disconnect from it (envd keeps it running).

        The handle is ``e2b:<pid>:<marker>``. ``log_path`` cannot be written from the
        sandbox: with it, the output is appended to ``.narrative-staging/spawn-<marker>.log``
        beside the workdir *in the sandbox*; without it, the output is discarded.
        """
        if not argv:
            raise InvalidInput("empty command")
        sandbox = self._sandbox(resource_id)
        marker = secrets.token_hex(12)
        # exec: the process envd reports is argv itself, not a shell waiting for it
        command = f"exec {shlex.join(argv)}"
        if log_path is not None:
            parent = posixpath.dirname(self.cfg.workdir)
            with translating(resource_id):
                sandbox.files.make_dir(posixpath.join(parent, _STAGING))
            log_file = shlex.quote(f"../{_STAGING}/spawn-{marker}.log")
            command += f" >>{log_file} 2>&1"
        else:
            command += " >/dev/null 2>&1"
        with translating(resource_id):
            handle = sandbox.commands.run(
                command,
                background=True,
                envs={**self.cfg.env, **(env or {}), **self._marker, MARKER_VAR: marker},
                cwd=self.cfg.workdir,
                timeout=0,  # envd ends a process whose stream's deadline passes
                retain_output=False,
            )
            pid = int(handle.pid)
            handle.disconnect()
        if not pid:
            raise ExecFailed(f"e2b did not start {argv[0]!r}")
        return f"e2b:{pid}:{marker}"

    def _spawned(self, handle: str) -> tuple[int, str]:
        match = _HANDLE.fullmatch(handle) if isinstance(handle, str) else None
        if match is None:
            raise InvalidInput(f"not a process handle of an e2b environment: {handle!r}")
        return int(match[1]), match[2]

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        """Send ``sig`` to every process in the sandbox that carries the handle's marker (the
        spawned process and all its descendants); nothing when none is left."""
        _pid, marker = self._spawned(handle)
        result = self._run(resource_id, shlex.join(signal_argv(marker, sig)), cwd=self.cfg.workdir)
        if result.exit_code != 0:
            detail = result.stderr.decode(errors="replace").strip() or f"exit {result.exit_code}"
            raise ProviderError(f"could not signal {handle} in e2b sandbox {resource_id}: {detail}")

    def alive(self, resource_id: str, handle: str) -> bool:
        """Whether envd still lists the spawned pid with the handle's marker (envd waits for
        its processes, so an exited one is no longer listed)."""
        pid, marker = self._spawned(handle)
        sandbox = self._sandbox(resource_id)
        with translating(resource_id):
            processes = sandbox.commands.list()
        return any(p.pid == pid and p.envs.get(MARKER_VAR) == marker for p in processes)

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The end of ``.narrative-staging/spawn-<marker>.log`` beside the workdir in the
        sandbox, downloaded through the files API as a stream of which only the last ``limit``
        bytes are kept. No such file, or a sandbox that is gone or unreachable: an empty log."""
        _pid, marker = self._spawned(handle)
        path = posixpath.join(posixpath.dirname(self.cfg.workdir), _STAGING, f"spawn-{marker}.log")
        tail = bytearray()
        size = 0
        try:
            sandbox = self._sandbox(resource_id)
            with translating(resource_id, path):
                reader = sandbox.files.read(path, format="stream")
                with reader:
                    for chunk in reader:
                        size += len(chunk)
                        tail += chunk
                        del tail[: max(len(tail) - limit, 0)]
        except (NarrativeError, OSError) as exc:
            log.debug("no spawn log %s in e2b sandbox %s: %s", path, resource_id, exc)
            return SpawnLog(0, b"")
        wanted = size - tail_start(size, since, limit)
        return SpawnLog(size, bytes(tail[len(tail) - wanted :]))

    def usage_meter(self, resource_id: str) -> UsageMeter:
        # The SDK's sandbox metrics (a CPU percentage and memory in use, sampled by E2B) come
        # from E2B's control plane, which a sandbox reached directly (E2B_DEBUG, the local
        # envd stand-in) does not have: nothing is measured rather than something guessed.
        return UsageMeter("e2b: CPU and memory not measured (the SDK's metrics are not used)")

    def runtime_command(self) -> list[str]:
        """The configured ``runtime``, else ``narrative`` from the sandbox's ``PATH``."""
        return list(self.cfg.runtime) if self.cfg.runtime else ["narrative"]

    def _abs(self, path: str) -> str:
        return posixpath.join(self.cfg.workdir, check_relative_path(path))

    def read_file(self, resource_id: str, path: str) -> bytes:
        target = self._abs(path)
        sandbox = self._sandbox(resource_id)
        with translating(resource_id, path):
            return bytes(sandbox.files.read(target, format="bytes"))

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        target = self._abs(path)
        sandbox = self._sandbox(resource_id)
        with translating(resource_id, path):
            sandbox.files.write(target, data)

    def delete_file(self, resource_id: str, path: str) -> None:
        target = self._abs(path)
        sandbox = self._sandbox(resource_id)
        with translating(resource_id, path):
            info = sandbox.files.get_info(target)
            if info.type == FileType.DIR:
                raise IsADirectoryError(f"{path} is a directory")
            sandbox.files.remove(target)

    def _upload_config(
        self, resource_id: str, sandbox: Sandbox, skip: set[str] | None = None
    ) -> None:
        """Upload the configured project files; all are checked before any is sent."""
        self._send_uploads(
            resource_id, sandbox, read_uploads(self.context.store.workspace, self.cfg.upload, skip)
        )

    def _send_uploads(
        self, resource_id: str, sandbox: Sandbox, files: list[tuple[str, bytes]]
    ) -> None:
        for norm, data in files:
            with translating(resource_id, norm):
                sandbox.files.write(posixpath.join(self.cfg.workdir, norm), data)
            log.debug("uploaded %s to e2b sandbox %s", norm, resource_id)

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        sandbox = self._sandbox(resource_id)
        staging = posixpath.join(posixpath.dirname(self.cfg.workdir), _STAGING)
        name = f"restore-{uuid.uuid4().hex}.tar"
        staged = shlex.quote(f"../{_STAGING}/{name}")
        with tempfile.TemporaryFile() as tar:
            write_snapshot_tar(self.context.store, snapshot, tar)
            tar.seek(0)
            with translating(resource_id):
                sandbox.files.write(posixpath.join(staging, name), tar)
                if sandbox.files.exists(self.cfg.workdir):
                    sandbox.files.remove(self.cfg.workdir)
                sandbox.files.make_dir(self.cfg.workdir)
        result = self._run(
            resource_id,
            f"tar -x -f {staged} && rm -f {staged}",
            cwd=self.cfg.workdir,
        )
        if result.exit_code != 0:
            raise tar_failed("restore into", resource_id, result)
        present = set(flatten_tree(self.context.store.odb, bytes.fromhex(snapshot.tree)))
        self._upload_config(resource_id, sandbox, skip=present)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        sandbox = self._sandbox(resource_id)
        parent = posixpath.dirname(self.cfg.workdir)
        name = f"collect-{uuid.uuid4().hex}.tar"
        staged = posixpath.join(parent, _STAGING, name)
        with translating(resource_id):
            sandbox.files.make_dir(posixpath.join(parent, _STAGING))
        result = self._run(
            resource_id,
            f"tar -c -f {shlex.quote(f'../{_STAGING}/{name}')} .",
            cwd=self.cfg.workdir,
        )
        if result.exit_code != 0:
            raise tar_failed("collect from", resource_id, result)
        try:
            with translating(resource_id):
                reader = sandbox.files.read(staged, format="stream")
                with reader, io.BufferedReader(StreamReader(iter(reader))) as stream:
                    return snapshot_from_tar(
                        self.context.store,
                        stream,
                        scratch_dir(self.context.store, self.context.env_id),
                        thread_id,
                        run_id,
                        message,
                        strip="./",
                        max_bytes=self.config.max_result_bytes,
                    )
        finally:
            try:
                with translating(resource_id):
                    sandbox.files.remove(staged)
            except ProviderError as exc:
                log.warning("could not remove %s from e2b sandbox %s: %s", staged, resource_id, exc)


def _time_left(end: datetime.datetime) -> int:
    """Seconds a sandbox ending at ``end`` has left, less :data:`_SKEW`, at least 1: attaching
    for that long leaves its end where it is (E2B only ever moves it later)."""
    if end.tzinfo is None:  # the API's times are UTC
        end = end.replace(tzinfo=datetime.UTC)
    return max(1, int((end - datetime.datetime.now(datetime.UTC)).total_seconds()) - _SKEW)
