"""Configuration of the Daytona provider (every field is shown by
``narrative env create --provider daytona --help``).

Credentials follow the e2b rules (:mod:`providers.e2b_config`, docs/security.md): the API key is
read from the variable ``api_key_env`` names, never written to a record or a sandbox; files
listed in ``upload`` pass the same name and content checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import ProviderConfig
from .e2b_config import absolute_workdir, check_upload_name, env_var_name

__all__ = ["DEFAULT_WORKDIR", "DaytonaConfig"]

DEFAULT_WORKDIR = "/home/daytona/workspace"


class DaytonaConfig(ProviderConfig):
    """A Daytona sandbox per environment."""

    type: Literal["daytona"] = "daytona"
    api_url: str | None = None
    """Daytona API URL (``None``: ``DAYTONA_API_URL``, else Daytona's cloud)."""
    api_key_env: str = "DAYTONA_API_KEY"
    """Name of the environment variable holding the API key; the key itself is never stored."""
    target: str | None = None
    """Region the sandboxes run in (``None``: the organisation's default)."""
    snapshot: str | None = None
    """Daytona snapshot the sandbox starts from (``None`` and no ``image``: Daytona's default)."""
    image: str | None = None
    """Container image the sandbox is built from instead of a snapshot (``cpu``/``memory``/
    ``disk`` apply to it)."""
    cpu: int | None = Field(default=None, ge=1)
    """CPU cores of a sandbox built from ``image``."""
    memory: int | None = Field(default=None, ge=1)
    """Memory in GiB of a sandbox built from ``image``."""
    disk: int | None = Field(default=None, ge=1)
    """Disk in GiB of a sandbox built from ``image``."""
    auto_stop_interval: int = Field(default=15, ge=0)
    """Minutes without activity after which Daytona stops the sandbox (0: never). A stopped
    sandbox keeps its files; the next start, reconnect or command starts it again, and a run
    keeps it awake (``keepalive_interval``)."""
    keepalive_interval: float | None = Field(default=None, gt=0)
    """Seconds between the activity records that keep a sandbox awake while a run's runtime
    works in it (``None``: a third of ``auto_stop_interval``)."""
    auto_delete_interval: int | None = Field(default=None, ge=-1)
    """Minutes after it stopped that Daytona deletes the sandbox (``None``: Daytona's default,
    never; -1 disables it explicitly; 0 deletes it as soon as it stops)."""
    network_allow_list: str | None = None
    """Comma-separated CIDRs the sandbox may reach (``None``: Daytona's default). The runtime
    must reach the hub's advertised address."""
    workdir: str = DEFAULT_WORKDIR
    """Absolute path of the workspace inside the sandbox."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for every command (not secrets: records persist them)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra sandbox labels; ``narrative.owner``/``narrative.env`` are always added."""
    upload: list[str] = Field(default_factory=list)
    """Project config files (relative to the workspace) uploaded on create and start, e.g.
    ``proxyExecution.json``. Credentials are refused (as for ``e2b``)."""
    extra_capabilities: list[str] = Field(default_factory=list)
    """Capabilities the snapshot or image adds (``gpu``, ``browser``, ...)."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the environment
    (default: ``narrative`` on the sandbox's PATH)."""
    create_timeout: float = Field(default=120.0, gt=0)
    """Seconds to wait for a sandbox to be created, or started again."""
    rate_limit_wait: float = Field(default=120.0, ge=0)
    """Most seconds one operation waits in all on Daytona's HTTP 429 answers (each wait is the
    server's ``Retry-After``, else a doubling backoff) before it fails as unavailable."""
    poll_interval: float = Field(default=0.1, gt=0, le=5)
    """Seconds between polls of a running command's output and exit code."""

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, value: str) -> str:
        return absolute_workdir(value)

    @field_validator("upload")
    @classmethod
    def _safe_uploads(cls, value: list[str]) -> list[str]:
        return [check_upload_name(path) for path in value]

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        return env_var_name(value)

    @model_validator(mode="after")
    def _one_source(self) -> DaytonaConfig:
        if self.snapshot and self.image:
            raise ValueError("give a snapshot or an image, not both")
        if not self.image and (self.cpu or self.memory or self.disk):
            raise ValueError("cpu, memory and disk apply to a sandbox built from an image")
        return self
