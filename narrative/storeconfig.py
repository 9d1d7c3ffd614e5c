"""The files that make a directory a shadow store: its git skeleton and git config, and the
store's local settings in ``narrative/config.json`` (:class:`StoreConfig`).

The git config is written so that stock git run against the store runs no hooks and signs
nothing. A store is only recognised once its ``config.json`` exists, so it is written last.
"""

from __future__ import annotations

import json
import os

from .errors import StoreCorrupted
from .fsutil import write_atomic
from .ids import is_id
from .jsonio import load_json
from .plain import Record

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MANUAL_RUN_TIMEOUT",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_IMPORT_SIZE",
    "StoreConfig",
    "is_store",
    "load_config",
    "read_config",
    "write_config",
    "write_git_config",
    "write_skeleton",
]

DEFAULT_MAX_FILE_SIZE = 50 << 20
#: The most bytes one import may expand to (and so the largest single file it may carry):
#: a hostile bundle or archive must not fill the disk or memory. ``config max_import_size``.
DEFAULT_MAX_IMPORT_SIZE = 4 << 30
DEFAULT_MANUAL_RUN_TIMEOUT = 24 * 3600.0
#: Where a store directory keeps its :class:`StoreConfig`.
CONFIG_FILE = os.path.join("narrative", "config.json")

_GIT_CONFIG = """\
[core]
\trepositoryformatversion = 0
\tfilemode = true
\tbare = true
\tlogAllRefUpdates = false
\thooksPath = {hooks}
[gc]
\tauto = 0
[commit]
\tgpgSign = false
[tag]
\tgpgSign = false
[receive]
\tdenyNonFastForwards = false
"""


class StoreConfig(Record):
    """Local settings of one store (not part of the narrative; not shipped in bundles)."""

    FIELDS = (
        "workspace",
        "default_objective",
        "default_thread",
        "max_file_size",
        "max_import_size",
        "manual_run_timeout",
        "workspace_id",
    )

    def __init__(
        self,
        workspace: str,
        default_objective: str = "",
        default_thread: str = "",
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        max_import_size: int = DEFAULT_MAX_IMPORT_SIZE,
        manual_run_timeout: float = DEFAULT_MANUAL_RUN_TIMEOUT,
        workspace_id: str = "",
    ) -> None:
        self.workspace = workspace
        self.default_objective = default_objective
        self.default_thread = default_thread
        self.max_file_size = max_file_size
        self.max_import_size = max_import_size
        self.manual_run_timeout = manual_run_timeout
        """Seconds a ``run start --manual`` run may wait for ``run finish`` before it is swept."""
        self.workspace_id = workspace_id
        """The id the workspace's marker holds (empty in stores of the old layout)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "workspace": self.workspace,
            "workspace_id": self.workspace_id,
            "default_objective": self.default_objective,
            "default_thread": self.default_thread,
            "max_file_size": self.max_file_size,
            "max_import_size": self.max_import_size,
            "manual_run_timeout": self.manual_run_timeout,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str) -> StoreConfig:
        try:
            cfg = cls(
                workspace=str(data["workspace"]),
                default_objective=str(data.get("default_objective", "")),
                default_thread=str(data.get("default_thread", "")),
                max_file_size=int(data.get("max_file_size", DEFAULT_MAX_FILE_SIZE)),
                max_import_size=int(data.get("max_import_size", DEFAULT_MAX_IMPORT_SIZE)),
                manual_run_timeout=float(
                    data.get("manual_run_timeout", DEFAULT_MANUAL_RUN_TIMEOUT)
                ),
                workspace_id=str(data.get("workspace_id", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorrupted(f"invalid store config {path}: {exc}") from exc
        if not (is_id(cfg.default_thread, "thread") and is_id(cfg.default_objective, "objective")):
            raise StoreCorrupted(f"invalid store config {path}: no default objective/thread")
        if cfg.workspace_id and not is_id(cfg.workspace_id, "workspace"):
            raise StoreCorrupted(f"invalid store config {path}: bad workspace id")
        return cfg


def is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_config(git_dir: str) -> StoreConfig | None:
    """The config of the store at ``git_dir``; None when there is no readable one."""
    path = os.path.join(git_dir, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            return StoreConfig.from_dict(load_json(f), path)
    except (OSError, ValueError, StoreCorrupted):
        return None


def load_config(git_dir: str) -> StoreConfig:
    """The config of the store at ``git_dir``; raises :class:`StoreCorrupted` when it cannot
    be read or is invalid."""
    path = os.path.join(git_dir, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            data = load_json(f)
    except (OSError, ValueError) as exc:
        raise StoreCorrupted(f"unreadable store config {path}: {exc}") from exc
    return StoreConfig.from_dict(data, path)


def write_config(git_dir: str, config: StoreConfig) -> None:
    data = json.dumps(config.to_dict(), indent=2).encode() + b"\n"
    write_atomic(os.path.join(git_dir, CONFIG_FILE), data)


def write_skeleton(git_dir: str, final_dir: str) -> None:
    """The files of an empty store at ``git_dir`` that will live at ``final_dir`` (git's
    config names its hooks directory by absolute path)."""
    for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags", "refs/narrative"):
        os.makedirs(os.path.join(git_dir, sub), exist_ok=True)
    os.makedirs(os.path.join(git_dir, "narrative", "no-hooks"), exist_ok=True)
    os.makedirs(os.path.join(git_dir, "narrative", "tmp"), exist_ok=True)
    write_git_config(git_dir, final_dir)
    write_atomic(os.path.join(git_dir, "HEAD"), b"ref: refs/heads/main\n")
    write_atomic(os.path.join(git_dir, ".gitignore"), b"*\n")
    write_atomic(
        os.path.join(git_dir, "description"), b"narrative-engine shadow store (do not edit)\n"
    )


def write_git_config(git_dir: str, final_dir: str) -> None:
    hooks = os.path.join(final_dir, "narrative", "no-hooks")
    write_atomic(os.path.join(git_dir, "config"), _GIT_CONFIG.format(hooks=hooks).encode())
