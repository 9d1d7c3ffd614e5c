"""The project file, ``narrative.toml`` at the top of the workspace: what a team writes down
once about its runs. Validated by pydantic; every error names the file and the key.

.. code-block:: toml

    [defaults]
    provider = "docker"          # env create without --provider
    environment = "box"          # run start --agent without --env
    agent = "claude"             # run start without --agent

    [providers.docker]           # the base --config of every docker environment
    image = "narrative-agent:latest"

    [resources]                  # limits of every environment (a profile may override)
    cpus = 2
    memory = "4g"

    [environments.box]           # narrative env create box
    provider = "docker"
    config = { pids_limit = 256 }
    resources = { memory = "2g" }

    [agents.claude]              # narrative run start --agent claude
    command = ["python", "agent.py"]
    require = ["python"]
    timeout = 600
    environment = "box"

Precedence, lowest first: ``[providers.<p>]``, ``[resources]``, the profile's ``config`` and
``resources``, then ``--config`` on the command line. Resource limits become provider config
where the provider enforces them (:meth:`~providers.base.BaseProvider.resource_config`); where
it does not, ``env create`` and ``env show`` say so.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from narrative.errors import InvalidInput, validation_problem

__all__ = [
    "PROJECT_FILE",
    "AgentManifest",
    "EnvironmentProfile",
    "Project",
    "Resources",
    "RunSettings",
    "load_project",
]

PROJECT_FILE = "narrative.toml"
_SIZE = re.compile(r"[0-9]+(\.[0-9]+)?[kmgt]?b?", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    """Limits of one environment."""

    cpus: float | None = Field(default=None, gt=0)
    """CPU cores (``1.5``)."""
    memory: str | None = None
    """Memory, bytes with an optional unit (``"512m"``, ``"4g"``)."""
    disk: str | None = None
    """Writable disk of the environment (Docker: only where the storage driver supports a
    size, e.g. overlay2 on xfs with pquota; elsewhere the engine refuses and says so)."""

    @field_validator("memory", "disk")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not _SIZE.fullmatch(value.strip()):
            raise ValueError(f"a size like 512m or 4g, not {value!r}")
        return value.strip().lower() if value is not None else None

    def merged(self, override: Resources | None) -> Resources:
        """These limits with ``override``'s set fields on top."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class EnvironmentProfile(_Strict):
    """``[environments.<name>]``: how ``narrative env create <name>`` makes it."""

    provider: str | None = None
    require: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    resources: Resources | None = None


class AgentManifest(_Strict):
    """``[agents.<name>]``: what ``narrative run start --agent <name>`` runs."""

    command: list[str] = Field(min_length=1)
    require: list[str] = Field(default_factory=list)
    timeout: float | None = Field(default=None, gt=0)
    environment: str | None = None
    description: str = ""


class Defaults(_Strict):
    provider: str | None = None
    environment: str | None = None
    agent: str | None = None


class Project(_Strict):
    """The whole file (an absent file is an empty project)."""

    defaults: Defaults = Field(default_factory=Defaults)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    environments: dict[str, EnvironmentProfile] = Field(default_factory=dict)
    agents: dict[str, AgentManifest] = Field(default_factory=dict)
    path: str | None = Field(default=None, exclude=True)
    """Where it was read from (None: no project file)."""

    def environment(
        self,
        name: str,
        provider: str | None,
        config: Mapping[str, Any],
        require: Iterable[str],
    ) -> tuple[str | None, dict[str, Any], list[str], Resources]:
        """The provider, config, requirements and limits of environment ``name`` created with
        the command line's ``provider``, ``config`` and ``require`` (which win)."""
        profile = self.environments.get(name, EnvironmentProfile())
        chosen = provider or profile.provider or self.defaults.provider
        merged: dict[str, Any] = dict(self.providers.get(chosen, {})) if chosen else {}
        merged.update(profile.config)
        merged.update(config)
        wanted = sorted({*profile.require, *(r.strip() for r in require if r.strip())})
        return chosen, merged, wanted, self.resources.merged(profile.resources)

    def run(
        self,
        agent: str | None,
        command: list[str],
        environments: list[str],
        require: list[str],
        timeout: float | None,
    ) -> RunSettings:
        """What ``run start`` runs: the command line's values, else agent ``agent``'s manifest
        (``agent`` defaulting to ``[defaults] agent``), else the project's defaults."""
        name = agent or self.defaults.agent or "agent"
        manifest = self.agents.get(name)
        if manifest is None or command:
            environment = [] if environments or require else self._default_environment()
            return RunSettings(name, command, environments or environment, require, timeout)
        chosen = environments or (
            [manifest.environment] if manifest.environment else self._default_environment()
        )
        return RunSettings(
            name,
            list(manifest.command),
            chosen,
            require or ([] if chosen else list(manifest.require)),
            timeout if timeout is not None else manifest.timeout,
        )

    def _default_environment(self) -> list[str]:
        return [self.defaults.environment] if self.defaults.environment else []


@dataclass(frozen=True)
class RunSettings:
    """A run's agent name, command, environments, required capabilities and timeout."""

    agent: str
    command: list[str]
    environments: list[str]
    require: list[str]
    timeout: float | None


def load_project(workspace: str) -> Project:
    """The project file of ``workspace`` (an empty :class:`Project` when there is none)."""
    path = os.path.join(workspace, PROJECT_FILE)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Project()
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    try:
        project = Project.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"{path}: {validation_problem(exc, '(top)')}") from None
    project.path = path
    return project
