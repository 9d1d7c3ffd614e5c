"""``worktree``: an isolated checkout of a snapshot, managed by the store.

The equivalent of a ``git worktree`` of the shadow store without git's per-worktree index and
HEAD: the checkout is a plain directory (default ``<store>/narrative/worktrees/<env-id>``),
filled from a snapshot by ``restore`` and captured back by ``collect`` onto the run's thread with
the ordinary snapshot engine (stat cache included, so collecting an unchanged checkout is cheap).
Deleting the environment snapshots whatever it still holds onto the environment's thread before
the directory is removed, so no result is lost with it.
"""

from __future__ import annotations

import os
import shutil
from typing import Literal

from narrative.errors import InvalidInput

from .directory import DirectoryProvider
from .sandbox import SandboxConfig

__all__ = ["WorktreeConfig", "WorktreeProvider", "worktrees_dir"]


class WorktreeConfig(SandboxConfig):
    type: Literal["worktree"] = "worktree"
    path: str | None = None
    """Where the checkout lives (default: inside the store, which snapshots never walk)."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the environment
    (default: this interpreter in isolated mode, ``python -I``, running this installation)."""


def worktrees_dir(git_dir: str) -> str:
    return os.path.join(git_dir, "narrative", "worktrees")


class WorktreeProvider(DirectoryProvider):
    name = "worktree"
    config_model = WorktreeConfig
    preference = 10  # needs no configuration: the default pick

    def _target(self) -> str:
        assert isinstance(self.config, WorktreeConfig)
        if self.config.path:
            return os.path.realpath(os.path.expanduser(self.config.path))
        return os.path.join(worktrees_dir(self.context.store.git_dir), self.context.env_id)

    def create(self) -> str:
        self.check_sandbox()
        path = self._target()
        workspace = os.path.realpath(self.context.store.workspace)
        store = os.path.realpath(self.context.store.git_dir)
        if (path == workspace or path.startswith(workspace + os.sep)) and not path.startswith(
            store + os.sep
        ):
            raise InvalidInput(f"a worktree cannot live inside the workspace {workspace}")
        if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise InvalidInput(f"{path} exists and is not an empty directory")
        os.makedirs(path, exist_ok=True)
        return path

    def delete(self, resource_id: str) -> None:
        if not os.path.isdir(resource_id):
            return
        if os.listdir(resource_id):
            self.save_leftovers(resource_id, f"left in {self.context.env_name} when deleted")
        shutil.rmtree(resource_id)

    def list_resources(self) -> list[str]:
        root = worktrees_dir(self.context.store.git_dir)
        try:
            names = sorted(os.listdir(root))
        except FileNotFoundError:
            return []
        return [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
