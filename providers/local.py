"""``local``: a plain directory chosen by the user.

The directory is created by ``create`` (it must be missing or empty, so the environment owns
everything in it). Deleting the environment forgets it but never removes the directory: it is
the user's, and may hold results nobody collected.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from narrative.errors import InvalidInput

from .directory import DirectoryProvider
from .sandbox import SandboxConfig

__all__ = ["LocalConfig", "LocalProvider"]


class LocalConfig(SandboxConfig):
    type: Literal["local"] = "local"
    path: str = Field(min_length=1)
    """The directory of the environment (created if missing; must be empty if it exists)."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the environment
    (default: this interpreter in isolated mode, ``python -I``, running this installation)."""


class LocalProvider(DirectoryProvider):
    name = "local"
    config_model = LocalConfig
    preference = 20

    def create(self) -> str:
        self.check_sandbox()
        assert isinstance(self.config, LocalConfig)
        path = os.path.realpath(os.path.expanduser(self.config.path))
        store = os.path.realpath(self.context.store.git_dir)
        workspace = os.path.realpath(self.context.store.workspace)
        for inside in (store, workspace):
            if path == inside or path.startswith(inside + os.sep):
                raise InvalidInput(f"a local environment cannot live inside {inside}")
        if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise InvalidInput(f"{path} exists and is not an empty directory")
        os.makedirs(path, exist_ok=True)
        return path

    def delete(self, resource_id: str) -> None:
        """End the environment's processes and forget it; the directory and its files stay."""
        self.end_leftovers(resource_id)
