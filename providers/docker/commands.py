"""Commands in a container of the ``docker`` provider: execs whose output streams back as it
arrives, helper commands run to completion, and detached (spawned) processes.

Every exec and spawned process carries a marker in its environment (:data:`EXEC_MARKER_VAR`,
:mod:`providers.proctree`), inherited by its descendants, by which a timed-out command, a
spawned tree or whatever earlier runs left is found and signalled wherever it was re-parented.
A spawned process's handle is ``docker:<exec-id>:<marker>``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from narrative.errors import InvalidInput, NarrativeError

from ..base import ExecResult, OutputFn, Signal
from ..errors import ExecFailed, ProviderError, ResourceGone
from ..proctree import MARKER_VAR, signal_argv, spawn_log_in_environment, sweep_argv
from .client import SDK_ERRORS, capturing_responses, sdk_errors, translate_error

__all__ = [
    "EXEC_MARKER_VAR",
    "end_leftovers",
    "exit_code",
    "parse_handle",
    "run_checked",
    "run_quiet",
    "run_streamed",
    "signal_spawned",
    "spawn_detached",
    "spawn_log_path",
    "spawned",
]

log = logging.getLogger(__name__)

EXEC_MARKER_VAR = MARKER_VAR
"""Set in every exec's environment so that a timed-out command and its children can be found."""
_HANDLE = re.compile(r"docker:([0-9a-f]{64}):([0-9a-f]{24})")
"""Where a spawned process's output goes inside the container when a log is asked for."""
_GRACE = 5.0
"""Seconds to wait for an exec's output to end once its processes were killed."""


class _OutputPump(threading.Thread):
    """Reads an exec's demultiplexed stream, forwarding chunks as they arrive."""

    def __init__(self, stream: Any, on_output: OutputFn | None) -> None:
        super().__init__(name="docker-exec-output", daemon=True)
        self.stream = stream
        self.on_output = on_output
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for out, err in self.stream:
                if out:
                    self._deliver("stdout", out, self.stdout)
                if err:
                    self._deliver("stderr", err, self.stderr)
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc

    def _deliver(self, name: str, chunk: bytes, sink: bytearray) -> None:
        sink += chunk
        if self.on_output is not None:
            self.on_output(name, chunk)


def _close_stream(stream: Any, responses: Iterable[Any]) -> None:
    """Close an exec's attached stream for good. ``CancellableStream.close`` shuts the socket
    down only while the response is open, and never closes the response (which owns the
    socket), so both are done here (the response, as the request hook saw it)."""
    with contextlib.suppress(OSError):
        stream.close()
    for response in responses:
        with contextlib.suppress(OSError):
            response.close()


def parse_handle(handle: str) -> tuple[str, str]:
    """The exec id and the marker of a spawn handle."""
    match = _HANDLE.fullmatch(handle) if isinstance(handle, str) else None
    if match is None:
        raise InvalidInput(f"not a process handle of a docker environment: {handle!r}")
    return match[1], match[2]


def spawn_log_path(handle: str) -> str:
    """The file in the container that a spawned process's output was appended to."""
    _exec_id, marker = parse_handle(handle)
    return spawn_log_in_environment(marker)


def run_streamed(
    api: Any,
    resource_id: str,
    argv: Sequence[str],
    *,
    workdir: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_output: OutputFn | None = None,
) -> ExecResult:
    """Run ``argv`` as an exec in ``workdir``, forwarding its output as it arrives; on timeout,
    or when ``on_output`` fails, every process carrying the exec's marker is killed."""
    if not argv:
        raise InvalidInput("empty command")
    marker = secrets.token_hex(12)
    environment = {**(env or {}), EXEC_MARKER_VAR: marker}
    with sdk_errors("exec", resource_id):
        exec_id = api.exec_create(
            resource_id,
            list(argv),
            stdout=True,
            stderr=True,
            workdir=workdir,
            environment=environment,
        )["Id"]
        with capturing_responses() as responses:
            stream = api.exec_start(exec_id, stream=True, demux=True)
    pump = _OutputPump(stream, on_output)
    pump.start()
    try:
        pump.join(timeout)
        timed_out = pump.is_alive()
        if timed_out or pump.error is not None:
            # Timed out, or the caller's callback failed: the command must not run on.
            _kill_marked(api, resource_id, workdir, marker)
            pump.join(_GRACE)
    finally:
        _close_stream(stream, responses)  # also unblocks a pump still waiting for output
        pump.join(_GRACE)
    if pump.error is not None and not timed_out:
        if isinstance(pump.error, (*SDK_ERRORS, OSError)):
            raise translate_error(pump.error, "exec", resource_id) from pump.error
        raise pump.error
    code = exit_code(api, resource_id, exec_id)
    stdout, stderr = bytes(pump.stdout), bytes(pump.stderr)
    if code in (126, 127) and stdout.startswith(b"OCI runtime exec failed"):
        raise ExecFailed(f"cannot run {argv[0]!r}: {stdout.decode(errors='replace').strip()}")
    return ExecResult(code, stdout, stderr, timed_out)


def exit_code(api: Any, resource_id: str, exec_id: str) -> int:
    """The exit code of an exec (-1 if the daemon has none a moment after its output ended)."""
    # The stream can end a moment before the daemon records the exit code.
    deadline = time.monotonic() + _GRACE
    with sdk_errors("exec", resource_id):
        while True:
            info = api.exec_inspect(exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() > deadline:
                return -1
            time.sleep(0.02)


def _kill_marked(api: Any, resource_id: str, workdir: str, marker: str) -> None:
    try:
        run_quiet(api, resource_id, workdir, signal_argv(marker, "kill"))
    except NarrativeError as exc:
        log.warning("could not kill a timed-out command in %s: %s", resource_id, exc)


def run_quiet(api: Any, resource_id: str, workdir: str, argv: list[str]) -> tuple[int, bytes]:
    """Run a helper command to completion; its exit code and combined output."""
    with sdk_errors("exec", resource_id):
        exec_id = api.exec_create(resource_id, argv, workdir=workdir)["Id"]
        output = api.exec_start(exec_id)
    return exit_code(api, resource_id, exec_id), bytes(output or b"")


def spawn_detached(
    api: Any,
    resource_id: str,
    argv: Sequence[str],
    *,
    workdir: str,
    env: Mapping[str, str] | None = None,
    log_path: str | None = None,
) -> str:
    """Start ``argv`` as a detached exec in ``workdir``; its handle (see
    :meth:`providers.docker.provider.DockerProvider.spawn`)."""
    if not argv:
        raise InvalidInput("empty command")
    marker = secrets.token_hex(12)
    command = list(argv)
    if log_path is not None:
        # exec: the spawned process is argv itself, not a shell waiting for it
        command = ["sh", "-c", 'exec "$@" >>"$0" 2>&1', spawn_log_in_environment(marker)]
        command += argv
    with sdk_errors("spawn", resource_id):
        exec_id = str(
            api.exec_create(
                resource_id,
                command,
                stdout=False,
                stderr=False,
                workdir=workdir,
                environment={**(env or {}), EXEC_MARKER_VAR: marker},
            )["Id"]
        )
        api.exec_start(exec_id, detach=True)
    log.debug("spawned %s in %s as exec %s", argv[0], resource_id, exec_id)
    return f"docker:{exec_id}:{marker}"


def run_checked(api: Any, resource_id: str, workdir: str, argv: list[str], what: str) -> None:
    """Run a helper command that must succeed (:class:`ProviderError` saying ``what`` could
    not be done, with its output, when it fails)."""
    code, output = run_quiet(api, resource_id, workdir, argv)
    if code != 0:
        said = output.decode(errors="replace").strip() or f"exit {code}"
        raise ProviderError(f"could not {what} in {resource_id}: {said}")


def end_leftovers(api: Any, resource_id: str, workdir: str, init: bool) -> None:
    """Kill every process in the container but its init and keep-alive command."""
    run_checked(api, resource_id, workdir, sweep_argv(init), "kill what earlier runs left")


def spawned(api: Any, resource_id: str, handle: str) -> tuple[dict[str, Any] | None, str]:
    """The daemon's record of a spawned exec (None once it forgot it) and its marker."""
    exec_id, marker = parse_handle(handle)
    try:
        with sdk_errors("spawn", resource_id):
            info: dict[str, Any] = api.exec_inspect(exec_id)
    except ResourceGone:  # the daemon forgets an exec some time after it exited
        return None, marker
    if not str(info.get("ContainerID", "")).startswith(resource_id):
        raise InvalidInput(f"process handle {handle!r} belongs to another container")
    return info, marker


def signal_spawned(api: Any, resource_id: str, workdir: str, handle: str, sig: Signal) -> None:
    """Send ``sig`` to every process carrying the handle's marker, if the container runs."""
    _info, marker = spawned(api, resource_id, handle)
    with sdk_errors("spawn", resource_id):
        state = api.inspect_container(resource_id)["State"]
    if not state.get("Running") or state.get("Paused"):
        return
    code, output = run_quiet(api, resource_id, workdir, signal_argv(marker, sig))
    if code != 0:
        raise ProviderError(
            f"could not signal {handle} in {resource_id}: "
            f"{output.decode(errors='replace').strip() or f'exit {code}'}"
        )
