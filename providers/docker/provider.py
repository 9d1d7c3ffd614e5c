"""The ``docker`` provider: one container per environment, through the Docker Engine API.

This module holds the container's lifecycle; the provider's other jobs live beside it:
commands (:mod:`.commands`), files through the archive endpoints (:mod:`.files`), the usage
meter (:mod:`.meter`), the client and its errors (:mod:`.client`).

The container runs a keep-alive command (under the daemon's tiny init, so stop signals and
orphans are handled); every command is an ``exec`` in the workdir. Images are never pulled: a
missing image is an :class:`~providers.errors.ImageNotFound` naming it, and no container is
created.

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
providers error tree in :func:`providers.docker.client.translate_error`.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import docker.errors

from narrative.errors import InvalidInput, NarrativeError

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
)
from ..emptying import sweep_and_empty_argv
from ..errors import ImageNotFound, ProviderError, ResourceGone
from ..records import HUB_SOCKET, hub_socket_dir
from ..usage import UsageMeter
from . import commands, files
from .client import connect, sdk_errors
from .config import DEFAULT_IMAGE, DockerConfig, DockerMount
from .image import build_image, host_runtime
from .meter import CgroupMeter

if TYPE_CHECKING:
    from narrative.models import Snapshot

__all__ = [
    "HUB_SOCKET_MOUNT",
    "LABEL_ENV",
    "LABEL_NAME",
    "LABEL_OWNER",
    "DockerProvider",
]

log = logging.getLogger(__name__)

LABEL_OWNER = "narrative.owner"
LABEL_ENV = "narrative.env"
LABEL_NAME = "narrative.name"
HUB_SOCKET_MOUNT = "/run/narrative-hub"
"""Where the environment's hub socket directory is mounted in the container."""


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
    resets_without_store: ClassVar[bool] = True  # its workspace lives elsewhere
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
        with sdk_errors("create", image=cfg.image):
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
                with sdk_errors("create", image=cfg.image):
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
            with sdk_errors("create", image=image):
                self.api.inspect_image(image)
        except ImageNotFound:
            if image != DEFAULT_IMAGE:
                raise
            log.info("building the default image %s (offline, from this host)", image)
            with sdk_errors("create", image=image):
                build_image(self.api, image)

    def _remove_leftover(self, name: str) -> bool:
        """Remove a container left under ``name`` by an earlier, interrupted create of this
        very environment; anything else holding the name is left alone."""
        with sdk_errors("create", name):
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
        with sdk_errors("start", resource_id):
            self.api.start(resource_id)
        self._check_running(resource_id)

    def _check_running(self, resource_id: str) -> None:
        """Raise if the container has already exited, with its exit code and last output: an
        image whose keep-alive command cannot run (no ``sleep``, no ``/usr``) stops at once.

        Raises:
            ProviderError: the container is not running.
        """
        with sdk_errors("start", resource_id):
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
        with sdk_errors("stop", resource_id):
            self.api.stop(resource_id, timeout=self.cfg.stop_timeout)

    def delete(self, resource_id: str) -> None:
        try:
            with sdk_errors("delete", resource_id):
                self.api.remove_container(resource_id, force=True, v=True)
        except ResourceGone:
            return
        except ProviderError as exc:
            # Two deletes racing: the daemon is removing it already.
            if "already in progress" not in str(exc):
                raise

    def reconnect(self, resource_id: str) -> None:
        with sdk_errors("reconnect", resource_id):
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
            with sdk_errors("health", resource_id):
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
        with sdk_errors("inspect", resource_id):
            mounts = self.api.inspect_container(resource_id).get("Mounts") or []
        for mount in mounts:
            if mount.get("Destination") == HUB_SOCKET_MOUNT and mount.get("Source"):
                host = posixpath.join(str(mount["Source"]), HUB_SOCKET)
                return HubSocket(host, posixpath.join(HUB_SOCKET_MOUNT, HUB_SOCKET))
        return None

    def list_resources(self) -> list[str]:
        with sdk_errors("list"):
            found = self.api.containers(
                all=True, filters={"label": f"{LABEL_OWNER}={self.context.owner}"}
            )
        return self.listed({str(c["Id"]): c.get("Labels") for c in found}, LABEL_ENV)

    # -- exec -----------------------------------------------------------------------------------
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
        return commands.run_streamed(
            self.api,
            resource_id,
            argv,
            workdir=self.cfg.workdir,
            env=env,
            timeout=timeout,
            on_output=on_output,
        )

    def usage_meter(self, resource_id: str) -> UsageMeter:
        return CgroupMeter(
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
        return commands.spawn_detached(
            self.api, resource_id, argv, workdir=self.cfg.workdir, env=env, log_path=log_path
        )

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process in the container but its init and keep-alive command: what any
        exec or spawned process of an earlier run left behind, also one that dropped its
        environment (and so the exec marker) or left its session."""
        commands.end_leftovers(self.api, resource_id, self.cfg.workdir, self.cfg.init)

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        """Send ``sig`` to every process in the container that carries the handle's marker
        (the spawned process and all its descendants); nothing when none is left or the
        container is not running (its processes died with it)."""
        commands.signal_spawned(self.api, resource_id, self.cfg.workdir, handle, sig)

    def alive(self, resource_id: str, handle: str) -> bool:
        info, _marker = commands.spawned(self.api, resource_id, handle)
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
        path = commands.spawn_log_path(handle)
        try:
            return files.read_tail(
                self.api, resource_id, path, since=since, limit=limit, timeout=self.cfg.api_timeout
            )
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
    # -- files ----------------------------------------------------------------------------------

    def read_file(self, resource_id: str, path: str) -> bytes:
        return files.read_file(self.api, resource_id, self.cfg.workdir, path, self.cfg.api_timeout)

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        files.write_file(self.api, resource_id, self.cfg.workdir, path, data)

    def delete_file(self, resource_id: str, path: str) -> None:
        files.delete_file(self.api, resource_id, self.cfg.workdir, path)

    # -- snapshots ------------------------------------------------------------------------------

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        files.empty_directories(self.api, resource_id, self.cfg.workdir, [self.cfg.workdir])
        self._put_snapshot(resource_id, snapshot)

    def prepare_for_run(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """:meth:`end_leftovers` and :meth:`reset` in one exec."""
        workdir = self.cfg.workdir
        argv = sweep_and_empty_argv(self.cfg.init, [workdir, *files.TEMP_DIRS])
        commands.run_checked(self.api, resource_id, workdir, argv, "reset for a run")
        if snapshot is not None:
            self._put_snapshot(resource_id, snapshot)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the workdir and the temporary directories, then restore ``snapshot``."""
        workdir = self.cfg.workdir
        files.empty_directories(self.api, resource_id, workdir, [workdir, *files.TEMP_DIRS])
        if snapshot is not None:
            self._put_snapshot(resource_id, snapshot)

    def _put_snapshot(self, resource_id: str, snapshot: Snapshot) -> None:
        files.put_snapshot(self.api, resource_id, self.cfg.workdir, self.context.store, snapshot)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        return files.collect_snapshot(
            self.api,
            resource_id,
            self.cfg.workdir,
            self.context.store,
            self.context.env_id,
            thread_id=thread_id,
            run_id=run_id,
            message=message,
            max_bytes=min(self.cfg.max_collect_bytes, self.cfg.max_result_bytes),
            timeout=self.cfg.api_timeout,
        )
