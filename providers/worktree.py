"""``worktree``: an isolated checkout of a snapshot, managed by the store.

The equivalent of a ``git worktree`` of the shadow store without git's per-worktree index and
HEAD: the checkout is a plain directory (default ``<data dir>/checkouts/<store-key>/<env-id>``,
outside both the store and the workspace, so that ``rm -rf`` of a checkout never touches the
store and removing a store never removes a checkout that still holds uncollected work),
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
from narrative.ids import is_id
from narrative.location import checkouts_root, claim_checkouts
from narrative.store import Store

from .directory import DirectoryProvider
from .sandbox import SandboxConfig

__all__ = ["WorktreeConfig", "WorktreeProvider", "worktrees_dir"]


class WorktreeConfig(SandboxConfig):
    type: Literal["worktree"] = "worktree"
    path: str | None = None
    """Where the checkout lives (default: in the per-user data directory, beside the stores)."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the environment
    (default: this interpreter in isolated mode, ``python -I``, running this installation)."""


def worktrees_dir(store: Store) -> str:
    """Where the checkouts of ``store``'s worktree environments go by default."""
    return checkouts_root(store.key)


def _legacy_worktrees_dir(store: Store) -> str:
    """Where checkouts went before they moved out of the store (a migrated store keeps them)."""
    return os.path.join(store.git_dir, "narrative", "worktrees")


class WorktreeProvider(DirectoryProvider):
    name = "worktree"
    config_model = WorktreeConfig
    preference = 10  # needs no configuration: the default pick

    def checkout_dir(self) -> str:
        """Where this environment's checkout lives."""
        assert isinstance(self.config, WorktreeConfig)
        if self.config.path:
            return os.path.realpath(os.path.expanduser(self.config.path))
        return os.path.join(worktrees_dir(self.context.store), self.context.env_id)

    def create(self) -> str:
        self.check_sandbox()
        path = self.checkout_dir()
        workspace = os.path.realpath(self.context.store.workspace)
        store = os.path.realpath(self.context.store.git_dir)
        for inside, what in ((workspace, "the workspace"), (store, "the store")):
            if path == inside or path.startswith(inside + os.sep):
                raise InvalidInput(f"a worktree cannot live inside {what} {inside}")
        if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise InvalidInput(f"{path} exists and is not an empty directory")
        claim_checkouts(self.context.store.key, self.context.store.git_dir)
        os.makedirs(path, exist_ok=True)
        return path

    def delete(self, resource_id: str) -> None:
        """End the environment's processes (first: nothing writes while its leftovers are
        saved), save what it holds that was never captured, remove the checkout."""
        self.end_leftovers(resource_id)
        if not os.path.isdir(resource_id):
            return
        if os.listdir(resource_id):
            self.save_leftovers(resource_id, f"left in {self.context.env_name} when deleted")
        shutil.rmtree(resource_id)

    def environment_of(self, resource_id: str) -> str | None:
        """A checkout in the default place is named by its environment's id."""
        owner = os.path.basename(resource_id)
        in_place = os.path.dirname(resource_id) in self._checkout_roots()
        return owner if in_place and is_id(owner, "environment") else None

    def _checkout_roots(self) -> tuple[str, str]:
        store = self.context.store
        return worktrees_dir(store), _legacy_worktrees_dir(store)

    def list_resources(self) -> list[str]:
        found = []
        for root in self._checkout_roots():
            try:
                names = sorted(os.listdir(root))
            except FileNotFoundError:
                continue
            found += [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
        return found
