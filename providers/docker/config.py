"""Configuration of the ``docker`` provider, kept apart from the provider so that it can be
validated (CLI, environment records) without the optional ``docker`` SDK installed.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..base import ProviderConfig
from ..shipping import DEFAULT_MAX_COLLECT_BYTES

__all__ = ["DEFAULT_IMAGE", "DockerConfig", "DockerMount"]

DEFAULT_IMAGE = "narrative-host:1"
"""The image used without ``--config image``: a skeleton that runs the host's Python and
narrative (:mod:`providers.docker.image`), built offline on first use."""


class DockerMount(BaseModel):
    """A host directory or file bind-mounted into the container."""

    model_config = ConfigDict(extra="forbid")

    source: str
    """Absolute path on the Docker host."""
    target: str
    """Absolute path inside the container."""
    read_only: bool = True
    """Mounts are read-only unless asked otherwise: the container is a sandbox."""

    @field_validator("source", "target")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\x00" in value or ":" in value:
            raise ValueError(f"mount paths must be absolute and free of ':' ({value!r})")
        return posixpath.normpath(value)


class DockerConfig(ProviderConfig):
    """One container per environment, reached through the Docker Engine API."""

    type: Literal["docker"] = "docker"
    """Discriminator of the provider configs."""
    image: str = DEFAULT_IMAGE
    """Image to run; it must already be present on the daemon (it is never pulled), except
    the default, which is built offline when missing (``narrative env image build``)."""
    host_runtime: bool | None = None
    """Run the runtime with the host's ``/usr``, Python and narrative, mounted read-only
    (what the default image is made for). Default: on for the default image, off for
    others, which need Python 3.11+ with narrative-engine installed (``docker/Dockerfile``)."""
    workdir: str = "/work"
    """Absolute directory in the container holding the workspace; commands run there."""
    network: bool | Literal["host"] = False
    """``False`` (default): no network at all (``network_mode=none``, only loopback inside);
    runs through the hub work so, their runtime reaches the hub through a unix socket mounted
    into the container. ``True``: the daemon's default network. ``"host"``: the host's
    network namespace, so every process in the container (the agent too) reaches every
    server listening on the host's ``127.0.0.1``: avoid it."""
    mem_limit: int | str | None = None
    """Memory limit in bytes or with a unit (``"512m"``); none by default."""
    cpus: float | None = Field(default=None, gt=0)
    """CPU quota in cores (``1.5``); none by default."""
    disk: str | None = None
    """Size of the container's writable layer (``"10g"``); needs a storage driver that
    supports it (overlay2 on xfs with pquota): elsewhere the engine refuses to create."""
    pids_limit: int | None = Field(default=None, gt=0)
    """Maximum number of processes in the container (fork-bomb guard)."""
    mounts: list[DockerMount] = Field(default_factory=list)
    """Bind mounts, e.g. the host's ``/usr`` for an image built as a bare skeleton."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment of the container (and so of every command run in it)."""
    base_url: str | None = None
    """Daemon address (``unix:///…/docker.sock``); default: ``DOCKER_HOST`` and friends."""
    api_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for one Engine API call (not for a command; see ``exec``'s timeout)."""
    stop_timeout: int = Field(default=10, ge=0)
    """Seconds between SIGTERM and SIGKILL when stopping the container."""
    command: list[str] = Field(default_factory=lambda: ["sleep", "infinity"], min_length=1)
    """Keeps the container alive between commands (the work itself runs through exec)."""
    init: bool = True
    """Run the daemon's tiny init as PID 1: it forwards stop signals and reaps orphans."""
    capabilities: list[str] = Field(default_factory=list)
    """Extra capabilities the image provides (``python``, ``git``, ...)."""
    max_collect_bytes: int = Field(default=DEFAULT_MAX_COLLECT_BYTES, gt=0)
    """Upper bound on the file bytes a collect accepts from the container."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the environment (default: the host's, with
    ``host_runtime``; else ``narrative`` on the container's PATH)."""

    @property
    def uses_host_runtime(self) -> bool:
        """Whether the container runs the host's Python and narrative (see ``host_runtime``)."""
        return self.host_runtime if self.host_runtime is not None else self.image == DEFAULT_IMAGE

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        norm = posixpath.normpath(value) if value.startswith("/") else ""
        if norm in ("", "/") or "\x00" in value:
            raise ValueError(f"workdir must be an absolute directory other than / ({value!r})")
        return norm

    @field_validator("mem_limit")
    @classmethod
    def _mem_limit(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str) and not re.fullmatch(r"[0-9]+[bkmgBKMG]?", value):
            raise ValueError(f"mem_limit must be bytes or a number with b/k/m/g ({value!r})")
        if isinstance(value, int) and value <= 0:
            raise ValueError("mem_limit must be positive")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("image must not be empty")
        return value
