"""The ``docker`` provider: one container per environment, through the Docker Engine API.

The container runs a keep-alive command (under the daemon's tiny init, so stop signals and
orphans are handled); every command is an ``exec`` in the workdir. Files move with the archive
endpoints (``put_archive``/``get_archive``), which are binary-safe, streamed and work on stopped
containers too; restore and collect use :mod:`providers.shipping`, which treats what comes back
from the container as hostile. Images are never pulled: a missing image is an
:class:`~providers.errors.ImageNotFound` naming it, and no container is created.

Background processes (:meth:`DockerProvider.spawn`) are detached execs; they and their
descendants carry a marker in their environment (:mod:`providers.proctree`), by which
:meth:`~DockerProvider.signal` finds and signals the whole tree, wherever it was re-parented.
The container has no network by default (``network_mode=none``): the runtime a hub spawns
there reaches the hub through a unix socket in a private host directory (mode 0700,
:func:`~providers.records.hub_socket_dir`) that is bind-mounted read-only at
:data:`HUB_SOCKET_MOUNT`; ``network="host"`` would let every process in the container reach
every service on the host's loopback, and no run needs it.

The image needs a POSIX ``sh`` with ``rm``, ``grep`` and ``sleep`` (restore empties the workdir,
``delete_file`` removes a file, and an exec that times out, or a spawned process, is killed by
its marker). Every error of the SDK, of requests and of urllib3 is translated into the
providers error tree in :func:`_translate`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import re
import secrets
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, ClassVar, cast

import docker
import docker.errors
import requests.exceptions

from narrative.errors import InvalidInput, NarrativeError

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
from .docker_config import DEFAULT_IMAGE, DockerConfig, DockerMount
from .docker_image import build_image, host_runtime
from .errors import (
    ExecFailed,
    ImageNotFound,
    ProviderError,
    ProviderUnavailable,
    ResourceGone,
)
from .proctree import MARKER_VAR, signal_argv, sweep_argv
from .records import HUB_SOCKET, hub_socket_dir
from .shipping import scratch_dir, snapshot_from_tar, write_snapshot_tar
from .usage import ProcessUsage, UsageMeter

if TYPE_CHECKING:
    from narrative.models import Snapshot

__all__ = [
    "EXEC_MARKER_VAR",
    "HUB_SOCKET_MOUNT",
    "LABEL_ENV",
    "LABEL_NAME",
    "LABEL_OWNER",
    "DockerProvider",
    "build_default_image",
    "connect",
]

log = logging.getLogger(__name__)

LABEL_OWNER = "narrative.owner"
LABEL_ENV = "narrative.env"
LABEL_NAME = "narrative.name"
EXEC_MARKER_VAR = MARKER_VAR
"""Set in every exec's environment so that a timed-out command and its children can be found."""
HUB_SOCKET_MOUNT = "/run/narrative-hub"
"""Where the environment's hub socket directory is mounted in the container."""
_HANDLE = re.compile(r"docker:([0-9a-f]{64}):([0-9a-f]{24})")
_SPAWN_LOG = "/tmp/narrative-spawn-{marker}.log"
"""Where a spawned process's output goes inside the container when a log is asked for."""

_CHUNK = 1 << 20
_GRACE = 5.0
"""Seconds to wait for an exec's output to end once its processes were killed."""
_DIR_BIT = 1 << 31
"""``os.ModeDir`` of Go, as found in the ``mode`` of the archive stat header."""

# Empties directories, dot files included, without removing the directories themselves (they
# may be mount points or carry the image's ownership). The first one must exist; later ones
# (temporary directories the image may lack) are skipped when missing.
_EMPTY_SCRIPT = r"""
[ -d "$1" ] || { echo "no directory $1" >&2; exit 1; }
for d in "$@"; do
    if [ -L "$d" ]; then echo "$d is a symbolic link" >&2; exit 1; fi
    [ -d "$d" ] || continue
    (cd -- "$d" && rm -rf -- ./* ./.[!.]* ./..?*) || exit 1
done
"""
_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
"""What a run may write besides the workdir, emptied before the next run starts."""
# Removes one file (or symlink); 2: absent, 3: a directory.
_DELETE_SCRIPT = r"""
if [ -d "$1" ] && [ ! -L "$1" ]; then exit 3; fi
if [ ! -e "$1" ] && [ ! -L "$1" ]; then exit 2; fi
rm -f -- "$1"
"""


def connect(base_url: str | None = None, timeout: float = 60.0) -> Any:
    """A low-level Engine API client for ``base_url`` (default: ``DOCKER_HOST`` and friends).

    Raises:
        ProviderUnavailable: no daemon answers there.
    """
    with _errors("connect"):
        if base_url is not None:
            kwargs: dict[str, Any] = {"base_url": base_url}
        else:
            kwargs = docker.utils.kwargs_from_env()
        url = str(kwargs.get("base_url") or "unix:///var/run/docker.sock")
        # Checked here because the SDK leaks a socket when a unix connect fails.
        if url.startswith("unix://") and not os.path.exists(url[len("unix://") :]):
            raise ProviderUnavailable(f"docker daemon unreachable: no socket at {url}")
        api = docker.APIClient(version="auto", timeout=timeout, **kwargs)
        api.hooks["response"].append(_remember_response)
        return api


def build_default_image(tag: str = DEFAULT_IMAGE, base_url: str | None = None) -> str:
    """Build (or rebuild) the default image offline under ``tag``; returns its id."""
    api = connect(base_url)
    try:
        with _errors("build", image=tag):
            return build_image(api, tag)
    finally:
        api.close()


def _check_workdir(workdir: str, mounts: Sequence[DockerMount]) -> None:
    """Refuse a workdir inside a mount or holding one: restore empties the workdir, and a run
    must neither write through a mount nor have a read-only one in its way."""
    for mount in mounts:
        inner, outer = sorted((workdir, mount.target), key=len, reverse=True)
        if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
            raise InvalidInput(
                f"workdir {workdir} overlaps the mount at {mount.target}: "
                f"choose another one (--config workdir=/somewhere)"
            )


def _translate(
    exc: BaseException,
    op: str,
    resource_id: str | None = None,
    image: str | None = None,
    path: str | None = None,
) -> Exception:
    """The error of the providers tree (or a built-in file error) standing for ``exc``."""
    if isinstance(exc, docker.errors.APIError):
        explanation = str(exc.explanation or exc)
        status = exc.response.status_code if exc.response is not None else None
        if isinstance(exc, docker.errors.NotFound):
            if image is not None:
                return ImageNotFound(image)
            if resource_id is not None and "no such container" in explanation.lower():
                return ResourceGone(resource_id)
            if path is not None:
                return FileNotFoundError(f"{path}: no such file in the environment")
            if resource_id is not None:
                return ResourceGone(resource_id)
        if status == 409 and ("not running" in explanation or "paused" in explanation):
            detail = f"container {resource_id} is not running: {explanation}"
            return ExecFailed(detail) if op in ("exec", "spawn") else ProviderUnavailable(detail)
        if op == "spawn" and "OCI runtime exec failed" in explanation:
            # a detached exec reports a program that cannot be started as the API call's error
            return ExecFailed(f"cannot start the command: {explanation}")
        return ProviderError(f"docker {op} failed: {explanation}")
    if isinstance(exc, requests.exceptions.Timeout):
        return ProviderUnavailable(f"docker daemon did not answer in time ({op}): {exc}")
    if isinstance(exc, requests.exceptions.RequestException):
        return ProviderUnavailable(f"docker daemon unreachable ({op}): {exc}")
    if isinstance(exc, OSError) or "fetching server API version" in str(exc):
        # A stream's socket failing mid-command, or the client's start-up version probe.
        return ProviderUnavailable(f"docker daemon unreachable ({op}): {exc}")
    return ProviderError(f"docker {op} failed: {exc}")


_SDK_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


@contextlib.contextmanager
def _errors(
    op: str, resource_id: str | None = None, image: str | None = None, path: str | None = None
) -> Iterator[None]:
    try:
        yield
    except _SDK_ERRORS as exc:
        raise _translate(exc, op, resource_id, image, path) from exc


class _ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (the SDK's archive stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


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


_responses = threading.local()
"""Per thread, while :func:`_capturing_responses` runs: the HTTP responses the client got."""


def _remember_response(response: Any, *args: Any, **kwargs: Any) -> Any:
    """A requests response hook (installed on every client :func:`connect` makes)."""
    held = getattr(_responses, "held", None)
    if held is not None:
        held.append(response)
    return response


@contextlib.contextmanager
def _capturing_responses() -> Iterator[list[Any]]:
    """The responses the client receives in this thread inside the block."""
    held: list[Any] = []
    _responses.held = held
    try:
        yield held
    finally:
        _responses.held = None


def _close_stream(stream: Any, responses: Iterable[Any]) -> None:
    """Close an exec's attached stream for good. ``CancellableStream.close`` shuts the socket
    down only while the response is open, and never closes the response (which owns the
    socket), so both are done here (the response, as the request hook saw it)."""
    with contextlib.suppress(OSError):
        stream.close()
    for response in responses:
        with contextlib.suppress(OSError):
            response.close()


def _archive_url(api: Any, resource_id: str) -> str:
    """The Engine API's archive endpoint of a container (what ``get_archive`` calls)."""
    container = urllib.parse.quote(resource_id, safe="")
    return f"{api.base_url}/v{api.api_version}/containers/{container}/archive"


def _raise_for_status(response: Any) -> None:
    """Raise the SDK's error for a failed response (as its own calls do)."""
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        raise docker.errors.create_api_error_from_http_exception(exc) from exc


def _parse_handle(handle: str) -> tuple[str, str]:
    """The exec id and the marker of a spawn handle."""
    match = _HANDLE.fullmatch(handle) if isinstance(handle, str) else None
    if match is None:
        raise InvalidInput(f"not a process handle of a docker environment: {handle!r}")
    return match[1], match[2]


def _container_name(env_id: str) -> str:
    return "narrative-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", env_id)


def _network_mode(network: bool | str) -> str | None:
    if network == "host":
        return "host"
    return None if network else "none"


def _bind(mount: DockerMount) -> str:
    return f"{mount.source}:{mount.target}:{'ro' if mount.read_only else 'rw'}"


class DockerProvider(BaseProvider):
    """One container per environment; the resource id is the full container id."""

    name: ClassVar[str] = "docker"
    category = "local"
    capabilities: ClassVar[frozenset[str]] = frozenset({"docker", "isolation", "exec", "files"})
    config_model: ClassVar[type[ProviderConfig]] = DockerConfig

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        if not isinstance(config, DockerConfig):
            raise InvalidInput(f"docker provider needs a DockerConfig, not {type(config).__name__}")
        super().__init__(context, config)
        self.cfg: DockerConfig = config
        self._api: Any = None

    @classmethod
    def resource_config(cls, resources: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """cpus → ``cpus`` (a CPU quota), memory → ``mem_limit``, disk → ``disk`` (the
        container's writable layer; the engine refuses it where its storage driver cannot)."""
        keys = {"cpus": "cpus", "memory": "mem_limit", "disk": "disk"}
        config = {keys[k]: v for k, v in resources.items() if k in keys}
        return config, sorted(k for k in resources if k not in keys)

    @classmethod
    def capabilities_for(cls, config: ProviderConfig) -> frozenset[str]:
        """The class's capabilities, the image's declared ones, and ``network`` if enabled."""
        extra: set[str] = set()
        if isinstance(config, DockerConfig):
            extra.update(config.capabilities)
            if config.network:
                extra.add("network")
        return cls.capabilities | extra

    # -- connection -----------------------------------------------------------------------------

    @property
    def api(self) -> Any:
        """The low-level Engine API client, connected on first use."""
        if self._api is None:
            self._api = connect(self.cfg.base_url, self.cfg.api_timeout)
        return self._api

    def close(self) -> None:
        """Release the client's connections (a provider is usable again afterwards)."""
        if self._api is not None:
            self._api.close()
            self._api = None

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        cfg = self.cfg
        self._ensure_image()
        host = host_runtime() if cfg.uses_host_runtime else None
        mounts = [*(host.mounts if host else []), *cfg.mounts]
        _check_workdir(cfg.workdir, mounts)
        labels = {
            LABEL_OWNER: self.context.owner,
            LABEL_ENV: self.context.env_id,
            LABEL_NAME: self.context.env_name,
        }
        hub_dir = DockerMount(
            source=hub_socket_dir(self.context.env_id),
            target=HUB_SOCKET_MOUNT,
        )
        with _errors("create", image=cfg.image):
            host_config = self.api.create_host_config(
                binds=[_bind(m) for m in [*mounts, hub_dir]],
                network_mode=_network_mode(cfg.network),
                mem_limit=cfg.mem_limit,
                nano_cpus=round(cfg.cpus * 1e9) if cfg.cpus is not None else None,
                pids_limit=cfg.pids_limit,
                storage_opt={"size": cfg.disk} if cfg.disk else None,
                init=cfg.init,
            )
        name = _container_name(self.context.env_id)
        for attempt in (1, 2):
            try:
                with _errors("create", image=cfg.image):
                    created = self.api.create_container(
                        cfg.image,
                        command=list(cfg.command),
                        working_dir=cfg.workdir,
                        environment={**(host.env if host else {}), **cfg.env},
                        labels=labels,
                        host_config=host_config,
                        network_disabled=not cfg.network,
                        stop_timeout=cfg.stop_timeout,
                        name=name,
                    )
                break
            except ProviderError as exc:
                cause = exc.__cause__
                conflict = (
                    isinstance(cause, docker.errors.APIError)
                    and cause.response is not None
                    and cause.response.status_code == 409
                )
                if not conflict or attempt == 2 or not self._remove_leftover(name):
                    raise
        container_id = str(created["Id"])
        log.debug("created container %s for %s", container_id, self.context.env_name)
        return container_id

    def _ensure_image(self) -> None:
        """Build the default image when it is missing (offline, from the host); any other
        image must be present. Checked before anything is created: create_container itself
        never pulls, but nothing must be created for an absent image, and the error names it."""
        image = self.cfg.image
        try:
            with _errors("create", image=image):
                self.api.inspect_image(image)
        except ImageNotFound:
            if image != DEFAULT_IMAGE:
                raise
            log.info("building the default image %s (offline, from this host)", image)
            with _errors("create", image=image):
                build_image(self.api, image)

    def _remove_leftover(self, name: str) -> bool:
        """Remove a container left under ``name`` by an earlier, interrupted create of this
        very environment; anything else holding the name is left alone."""
        with _errors("create", name):
            try:
                labels = self.api.inspect_container(name)["Config"].get("Labels") or {}
            except docker.errors.NotFound:
                return True
            mine = (
                labels.get(LABEL_ENV) == self.context.env_id
                and labels.get(LABEL_OWNER) == self.context.owner
            )
            if mine:
                self.api.remove_container(name, force=True, v=True)
        return bool(mine)

    def start(self, resource_id: str) -> None:
        with _errors("start", resource_id):
            self.api.start(resource_id)
        self._check_running(resource_id)

    def _check_running(self, resource_id: str) -> None:
        """Raise if the container has already exited, with its exit code and last output: an
        image whose keep-alive command cannot run (no ``sleep``, no ``/usr``) stops at once.

        Raises:
            ProviderError: the container is not running.
        """
        with _errors("start", resource_id):
            state = self.api.inspect_container(resource_id)["State"]
            if state.get("Running"):
                return
            output = self.api.logs(resource_id, tail=3).decode(errors="replace").strip()
        raise ProviderError(
            f"container {resource_id[:12]} stopped at once (exit {state.get('ExitCode')}"
            f"{': ' + output if output else ''}); the image needs a POSIX sh, rm, grep and "
            f"{self.cfg.command[0]} (the keep-alive command), or leave out --config image to "
            f"use the default image"
        )

    def stop(self, resource_id: str) -> None:
        with _errors("stop", resource_id):
            self.api.stop(resource_id, timeout=self.cfg.stop_timeout)

    def delete(self, resource_id: str) -> None:
        try:
            with _errors("delete", resource_id):
                self.api.remove_container(resource_id, force=True, v=True)
        except ResourceGone:
            return
        except ProviderError as exc:
            # Two deletes racing: the daemon is removing it already.
            if "already in progress" not in str(exc):
                raise

    def reconnect(self, resource_id: str) -> None:
        with _errors("reconnect", resource_id):
            labels = self.api.inspect_container(resource_id)["Config"].get("Labels") or {}
        if labels.get(LABEL_ENV) != self.context.env_id:
            # The id names some other container: for this environment, its resource is gone.
            raise ResourceGone(resource_id)

    def health(self, resource_id: str) -> Health:
        """GONE without the container, UNREACHABLE when it does not run; with a ``runtime``
        configured, the runtime's import check too
        (:meth:`~providers.base.BaseProvider.check_runtime`).

        Raises:
            RuntimeBroken: the runtime does not start, or workspace files shadow its modules.
        """
        try:
            with _errors("health", resource_id):
                state = self.api.inspect_container(resource_id)["State"]
        except ResourceGone:
            return Health.GONE
        except NarrativeError:
            return Health.UNREACHABLE
        if not state.get("Running") or state.get("Paused"):
            return Health.UNREACHABLE
        # the image's own `narrative` may be absent: nothing runs it yet
        if self.cfg.runtime or self.cfg.uses_host_runtime:
            self.check_runtime(resource_id)
        return Health.OK

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        """The socket in the environment's hub directory, mounted at :data:`HUB_SOCKET_MOUNT`
        (None for a container created before that mount existed: it dials TCP)."""
        with _errors("inspect", resource_id):
            mounts = self.api.inspect_container(resource_id).get("Mounts") or []
        for mount in mounts:
            if mount.get("Destination") == HUB_SOCKET_MOUNT and mount.get("Source"):
                host = posixpath.join(str(mount["Source"]), HUB_SOCKET)
                return HubSocket(host, posixpath.join(HUB_SOCKET_MOUNT, HUB_SOCKET))
        return None

    def list_resources(self) -> list[str]:
        with _errors("list"):
            found = self.api.containers(
                all=True, filters={"label": f"{LABEL_OWNER}={self.context.owner}"}
            )
        return sorted(str(c["Id"]) for c in found)

    # -- exec -----------------------------------------------------------------------------------

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
        marker = secrets.token_hex(12)
        environment = {**(env or {}), EXEC_MARKER_VAR: marker}
        with _errors("exec", resource_id):
            exec_id = self.api.exec_create(
                resource_id,
                list(argv),
                stdout=True,
                stderr=True,
                workdir=self.cfg.workdir,
                environment=environment,
            )["Id"]
            with _capturing_responses() as responses:
                stream = self.api.exec_start(exec_id, stream=True, demux=True)
        pump = _OutputPump(stream, on_output)
        pump.start()
        try:
            pump.join(timeout)
            timed_out = pump.is_alive()
            if timed_out or pump.error is not None:
                # Timed out, or the caller's callback failed: the command must not run on.
                self._kill_marked(resource_id, marker)
                pump.join(_GRACE)
        finally:
            _close_stream(stream, responses)  # also unblocks a pump still waiting for output
            pump.join(_GRACE)
        if pump.error is not None and not timed_out:
            if isinstance(pump.error, (*_SDK_ERRORS, OSError)):
                raise _translate(pump.error, "exec", resource_id) from pump.error
            raise pump.error
        exit_code = self._exit_code(resource_id, exec_id)
        stdout, stderr = bytes(pump.stdout), bytes(pump.stderr)
        if exit_code in (126, 127) and stdout.startswith(b"OCI runtime exec failed"):
            raise ExecFailed(f"cannot run {argv[0]!r}: {stdout.decode(errors='replace').strip()}")
        return ExecResult(exit_code, stdout, stderr, timed_out)

    def _exit_code(self, resource_id: str, exec_id: str) -> int:
        # The stream can end a moment before the daemon records the exit code.
        deadline = time.monotonic() + _GRACE
        with _errors("exec", resource_id):
            while True:
                info = self.api.exec_inspect(exec_id)
                if not info.get("Running") and info.get("ExitCode") is not None:
                    return int(info["ExitCode"])
                if time.monotonic() > deadline:
                    return -1
                time.sleep(0.02)

    def _kill_marked(self, resource_id: str, marker: str) -> None:
        try:
            self._run_quiet(resource_id, signal_argv(marker, "kill"))
        except NarrativeError as exc:
            log.warning("could not kill a timed-out command in %s: %s", resource_id, exc)

    def _run_quiet(self, resource_id: str, argv: list[str]) -> tuple[int, bytes]:
        """Run a helper command to completion; its exit code and combined output."""
        with _errors("exec", resource_id):
            exec_id = self.api.exec_create(resource_id, argv, workdir=self.cfg.workdir)["Id"]
            output = self.api.exec_start(exec_id)
        return self._exit_code(resource_id, exec_id), bytes(output or b"")

    def usage_meter(self, resource_id: str) -> UsageMeter:
        return _CgroupMeter(
            self.api,
            resource_id,
            "docker: the container's cgroup counters (Engine API stats: CPU as a delta over "
            "the run, peak memory as the largest sample)",
        )

    # -- background processes -------------------------------------------------------------------

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` as a detached exec in the workdir (the container must be running).

        The process is a child of the container's runtime, not of the caller, so it outlives
        the caller; it and its descendants carry a marker in their environment, which is how
        :meth:`signal` finds the whole tree. The handle is ``docker:<exec-id>:<marker>``.
        ``log_path`` cannot be written from inside the container: with it, the output is
        appended to ``/tmp/narrative-spawn-<marker>.log`` *in the container* (needs ``sh``);
        without it, the output is discarded.
        """
        if not argv:
            raise InvalidInput("empty command")
        marker = secrets.token_hex(12)
        command = list(argv)
        if log_path is not None:
            # exec: the spawned process is argv itself, not a shell waiting for it
            command = ["sh", "-c", 'exec "$@" >>"$0" 2>&1', _SPAWN_LOG.format(marker=marker)]
            command += argv
        with _errors("spawn", resource_id):
            exec_id = str(
                self.api.exec_create(
                    resource_id,
                    command,
                    stdout=False,
                    stderr=False,
                    workdir=self.cfg.workdir,
                    environment={**(env or {}), EXEC_MARKER_VAR: marker},
                )["Id"]
            )
            self.api.exec_start(exec_id, detach=True)
        log.debug("spawned %s in %s as exec %s", argv[0], resource_id, exec_id)
        return f"docker:{exec_id}:{marker}"

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process in the container but its init and keep-alive command: what any
        exec or spawned process of an earlier run left behind, also one that dropped its
        environment (and so the exec marker) or left its session."""
        code, output = self._run_quiet(resource_id, sweep_argv(self.cfg.init))
        if code != 0:
            raise ProviderError(
                f"could not kill what earlier runs left in {resource_id}: "
                f"{output.decode(errors='replace').strip() or f'exit {code}'}"
            )

    def _spawned(self, resource_id: str, handle: str) -> tuple[dict[str, Any] | None, str]:
        """The daemon's record of a spawned exec (None once it forgot it) and its marker."""
        exec_id, marker = _parse_handle(handle)
        try:
            with _errors("spawn", resource_id):
                info: dict[str, Any] = self.api.exec_inspect(exec_id)
        except ResourceGone:  # the daemon forgets an exec some time after it exited
            return None, marker
        if not str(info.get("ContainerID", "")).startswith(resource_id):
            raise InvalidInput(f"process handle {handle!r} belongs to another container")
        return info, marker

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        """Send ``sig`` to every process in the container that carries the handle's marker
        (the spawned process and all its descendants); nothing when none is left or the
        container is not running (its processes died with it)."""
        _info, marker = self._spawned(resource_id, handle)
        with _errors("spawn", resource_id):
            state = self.api.inspect_container(resource_id)["State"]
        if not state.get("Running") or state.get("Paused"):
            return
        code, output = self._run_quiet(resource_id, signal_argv(marker, sig))
        if code != 0:
            raise ProviderError(
                f"could not signal {handle} in {resource_id}: "
                f"{output.decode(errors='replace').strip() or f'exit {code}'}"
            )

    def alive(self, resource_id: str, handle: str) -> bool:
        info, _marker = self._spawned(resource_id, handle)
        return info is not None and bool(info.get("Running"))

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The end of ``/tmp/narrative-spawn-<marker>.log`` in the container, through the
        archive endpoint, which (unlike an exec) also reads a stopped container. No such file,
        no such container or no daemon: an empty log."""
        _exec_id, marker = _parse_handle(handle)
        path = _SPAWN_LOG.format(marker=marker)
        try:
            with (
                _errors("read_spawn_log", resource_id, path=path),
                self._archive(resource_id, path) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                member = tar.next()
                content = tar.extractfile(member) if member is not None else None
                if member is None or content is None:  # nothing, or not a regular file
                    return SpawnLog(0, b"")
                start = tail_start(member.size, since, limit)
                skipped = 0
                while skipped < start:  # a tar stream cannot seek: read past, keep nothing
                    chunk = content.read(min(start - skipped, _CHUNK))
                    if not chunk:
                        return SpawnLog(0, b"")  # cut short
                    skipped += len(chunk)
                return SpawnLog(member.size, content.read(member.size - start))
        except (NarrativeError, OSError, tarfile.TarError) as exc:
            log.debug("no spawn log %s in %s: %s", path, resource_id, exc)
            return SpawnLog(0, b"")

    runtime_hint: ClassVar[str] = (
        "the image needs Python 3.11+ with narrative-engine installed: leave out "
        "--config image to use the default image (built offline from this host, "
        "see 'narrative env image build'), build one from docker/Dockerfile, "
        "or name the CLI in the image with --config runtime=..."
    )

    def runtime_command(self) -> list[str]:
        """The configured ``runtime``, else ``narrative`` from the container's ``PATH``."""
        if self.cfg.runtime:
            return list(self.cfg.runtime)
        return host_runtime().runtime if self.cfg.uses_host_runtime else ["narrative"]

    # -- files ----------------------------------------------------------------------------------

    def _container_path(self, rel: str) -> str:
        return posixpath.join(self.cfg.workdir, rel)

    def _path_stat(self, resource_id: str, rel: str) -> dict[str, Any] | None:
        """The daemon's stat of a workspace path (HEAD of the archive endpoint); None if absent.

        docker-py exposes no HEAD helper, so the request is made on the client session itself.
        """
        url = _archive_url(self.api, resource_id)
        with _errors("stat", resource_id, path=rel):
            response = self.api.head(url, params={"path": self._container_path(rel)})
            if response.status_code == 404:
                self.api.inspect_container(resource_id)  # ResourceGone if the container is
                return None
            _raise_for_status(response)
            header = response.headers.get("X-Docker-Container-Path-Stat")
        return cast(dict[str, Any], docker.utils.decode_json_header(header)) if header else {}

    @contextlib.contextmanager
    def _archive(self, resource_id: str, path: str) -> Iterator[IO[bytes]]:
        """The tar stream of a container path, read as it arrives; the response is closed on
        exit even when the stream was not read to its end (``get_archive`` leaves it open)."""
        url = _archive_url(self.api, resource_id)
        response = self.api.get(
            url,
            params={"path": path},
            headers={"Accept-Encoding": "identity"},
            stream=True,
            timeout=self.cfg.api_timeout,
        )
        try:
            _raise_for_status(response)
            yield io.BufferedReader(_ChunkReader(response.iter_content(_CHUNK)), _CHUNK)
        finally:
            response.close()

    def read_file(self, resource_id: str, path: str) -> bytes:
        rel = check_relative_path(path)
        with (
            _errors("read_file", resource_id, path=rel),
            self._archive(resource_id, self._container_path(rel)) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            member = tar.next()
            if member is None:
                raise FileNotFoundError(f"{path}: no such file in the environment")
            if member.isdir():
                raise IsADirectoryError(f"{path} is a directory")
            if not member.isreg():
                raise InvalidInput(f"{path} is not a regular file")
            handle = tar.extractfile(member)
            assert handle is not None
            return handle.read()

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        rel = check_relative_path(path)
        stat = self._path_stat(resource_id, rel)
        # Extracting a file over a directory would replace the whole directory.
        if stat is not None and int(stat.get("mode", 0)) & _DIR_BIT:
            raise IsADirectoryError(f"{path} is a directory")
        with tempfile.SpooledTemporaryFile(max_size=8 * _CHUNK) as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
            spool.seek(0)
            self._put_archive(resource_id, spool, "write_file")

    def _put_archive(self, resource_id: str, tar: IO[bytes], op: str) -> None:
        with _errors(op, resource_id):
            if not self.api.put_archive(resource_id, self.cfg.workdir, tar):
                raise ProviderError(f"docker {op} failed: the daemon refused the archive")

    def delete_file(self, resource_id: str, path: str) -> None:
        rel = check_relative_path(path)
        code, output = self._run_quiet(resource_id, ["sh", "-c", _DELETE_SCRIPT, "sh", rel])
        if code == 2:
            raise FileNotFoundError(f"{path}: no such file in the environment")
        if code == 3:
            raise IsADirectoryError(f"{path} is a directory")
        if code != 0:
            raise ProviderError(f"cannot delete {path}: {output.decode(errors='replace').strip()}")

    # -- snapshots ------------------------------------------------------------------------------

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        self._empty(resource_id, [self.cfg.workdir])
        self._put_snapshot(resource_id, snapshot)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the workdir and the temporary directories, then restore ``snapshot``."""
        self._empty(resource_id, [self.cfg.workdir, *_TEMP_DIRS])
        if snapshot is not None:
            self._put_snapshot(resource_id, snapshot)

    def _empty(self, resource_id: str, directories: list[str]) -> None:
        code, output = self._run_quiet(resource_id, ["sh", "-c", _EMPTY_SCRIPT, "sh", *directories])
        if code != 0:
            raise ProviderError(
                f"cannot empty {' '.join(directories)} in {resource_id}: "
                f"{output.decode(errors='replace').strip()}"
            )

    def _put_snapshot(self, resource_id: str, snapshot: Snapshot) -> None:
        store = self.context.store
        # Spooled to disk in the store's tmp dir: the snapshot may be far larger than memory.
        tmp = posixpath.join(store.git_dir, "narrative", "tmp")
        with tempfile.TemporaryFile(dir=tmp) as spool:
            write_snapshot_tar(store, snapshot, spool)
            spool.seek(0)
            self._put_archive(resource_id, spool, "restore")

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        store = self.context.store
        # Streamed straight into the hostile-tar extractor: the size limit applies while
        # reading, so a huge file in the container never lands on disk in full.
        with (
            _errors("collect", resource_id),
            self._archive(resource_id, self.cfg.workdir) as stream,
        ):
            return snapshot_from_tar(
                store,
                stream,
                scratch_dir(store, self.context.env_id),
                thread_id,
                run_id,
                message,
                strip=posixpath.basename(self.cfg.workdir) + "/",
                max_bytes=min(self.cfg.max_collect_bytes, self.cfg.max_result_bytes),
            )


class _CgroupMeter(UsageMeter):
    """The container's cgroup counters, read through the Engine API from outside it: CPU
    time as the difference from the meter's start, peak memory as the largest of the samples
    (the kernel's own peak covers the container's whole life, not one run); memory excludes
    the inactive page cache, as ``docker stats`` does."""

    samples: ClassVar[bool] = True

    def __init__(self, api: Any, container: str, measured_by: str) -> None:
        super().__init__(measured_by)
        self._api, self._container = api, container
        self._peak: int | None = None
        self._cpu_start = self._read()

    def _read(self) -> int | None:
        """One sample: the memory in use now (kept if the largest), and the CPU nanoseconds
        used so far."""
        try:
            stats = self._api.stats(self._container, stream=False, one_shot=True)
        except _SDK_ERRORS as exc:
            log.info("cannot read the stats of %s: %s", self._container, exc)
            return None
        memory = stats.get("memory_stats") or {}
        usage = memory.get("usage")
        if isinstance(usage, int):
            inner = memory.get("stats") or {}
            cache = inner.get("total_inactive_file", inner.get("inactive_file", 0))
            used = usage - cache if isinstance(cache, int) and cache <= usage else usage
            self._peak = max(self._peak or 0, used)
        total = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        return total if isinstance(total, int) else None

    def sample(self) -> None:
        self._read()

    def finish(self, handle: str | None) -> ProcessUsage:
        end = self._read()
        start = self._cpu_start
        cpu = (end - start) / 1e9 if end is not None and start is not None else None
        return ProcessUsage(cpu, self._peak, self.measured_by)
