"""The shadow store: a bare git repository beside (or away from) the user's workspace.

Layout of a store directory (default ``<workspace>/.narrative``)::

    HEAD config objects/ refs/      a real bare git repo (``git --git-dir`` reads it)
    .gitignore                      "*": the user's own git never sees the store
    narrative/config.json           workspace path, default objective/thread, size cap
    narrative/cache/                stat caches (optimisation only)
    narrative/tmp/                  temp files of in-flight writes (same file system)
    narrative/no-hooks/             empty; ``core.hooksPath`` points here

Isolation: the store never uses the user's repository, config, hooks or index; git config is
written so that stock git run against the store runs no hooks and signs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput, LockTimeout, StoreCorrupted, StoreExists, StoreNotFound
from .fsutil import write_atomic
from .ids import is_id
from .meta import MetaStore
from .odb import ObjectStore
from .refs import RefStore

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_STORE_NAME",
    "THREAD_REF_PREFIX",
    "Store",
    "StoreConfig",
    "discover_store",
]

DEFAULT_STORE_NAME = ".narrative"
DEFAULT_MAX_FILE_SIZE = 50 << 20
THREAD_REF_PREFIX = "refs/narrative/threads/"
_CONFIG = os.path.join("narrative", "config.json")

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


@dataclass
class StoreConfig:
    """Local settings of one store (not part of the narrative; not shipped in bundles)."""

    workspace: str
    default_objective: str = ""
    default_thread: str = ""
    max_file_size: int = DEFAULT_MAX_FILE_SIZE

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "workspace": self.workspace,
            "default_objective": self.default_objective,
            "default_thread": self.default_thread,
            "max_file_size": self.max_file_size,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str) -> StoreConfig:
        try:
            cfg = cls(
                workspace=str(data["workspace"]),
                default_objective=str(data.get("default_objective", "")),
                default_thread=str(data.get("default_thread", "")),
                max_file_size=int(data.get("max_file_size", DEFAULT_MAX_FILE_SIZE)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorrupted(f"invalid store config {path}: {exc}") from exc
        if not (is_id(cfg.default_thread, "thread") and is_id(cfg.default_objective, "objective")):
            raise StoreCorrupted(f"invalid store config {path}: no default objective/thread")
        return cfg


def _is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _CONFIG))


def discover_store(start: str) -> str | None:
    """The store of the workspace containing ``start``: the nearest ``.narrative`` upwards."""
    path = os.path.abspath(start)
    while True:
        candidate = os.path.join(path, DEFAULT_STORE_NAME)
        if _is_store(candidate):
            return candidate
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


class Store:
    """An opened shadow store. Use :meth:`init` or :meth:`open`."""

    def __init__(self, git_dir: str, config: StoreConfig) -> None:
        self.git_dir = git_dir
        self.config = config
        self.odb = ObjectStore(git_dir)
        self.refs = RefStore(git_dir)
        self.meta = MetaStore(self.odb, self.refs, lambda: self.lock("gc", shared=True))

    @property
    def workspace(self) -> str:
        return self.config.workspace

    # -- creation and discovery -------------------------------------------------------------

    @classmethod
    def init(cls, workspace: str, store_dir: str | None = None) -> Store:
        """Create a store for ``workspace`` with a default objective and thread."""
        workspace = os.path.realpath(workspace)
        if not os.path.isdir(workspace):
            raise InvalidInput(f"workspace is not a directory: {workspace}")
        git_dir = os.path.realpath(store_dir or os.path.join(workspace, DEFAULT_STORE_NAME))
        if _is_store(git_dir):
            raise StoreExists(git_dir)
        if os.path.isdir(git_dir) and os.listdir(git_dir):
            raise InvalidInput(f"refusing to create a store in a non-empty directory: {git_dir}")
        hooks = os.path.join(git_dir, "narrative", "no-hooks")
        for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags", "refs/narrative"):
            os.makedirs(os.path.join(git_dir, sub), exist_ok=True)
        os.makedirs(hooks, exist_ok=True)
        os.makedirs(os.path.join(git_dir, "narrative", "tmp"), exist_ok=True)
        write_atomic(os.path.join(git_dir, "HEAD"), b"ref: refs/heads/main\n")
        write_atomic(os.path.join(git_dir, "config"), _GIT_CONFIG.format(hooks=hooks).encode())
        write_atomic(os.path.join(git_dir, ".gitignore"), b"*\n")
        write_atomic(
            os.path.join(git_dir, "description"), b"narrative-engine shadow store (do not edit)\n"
        )
        config = StoreConfig(workspace=workspace)
        store = cls(git_dir, config)
        # Written last: a store is only recognised once its config exists.
        from .hierarchy import create_defaults

        objective, thread = create_defaults(store)
        config.default_objective = objective
        config.default_thread = thread
        store.save_config()
        return store

    @classmethod
    def open(cls, store_dir: str | None = None, workspace: str | None = None) -> Store:
        """Open an existing store: ``store_dir`` (or ``$NARRATIVE_STORE``), else the nearest
        ``.narrative`` above ``workspace`` (default: the current directory)."""
        git_dir = store_dir or os.environ.get("NARRATIVE_STORE") or None
        if git_dir is None:
            start = workspace or os.getcwd()
            git_dir = discover_store(start)
            if git_dir is None:
                raise StoreNotFound(os.path.abspath(start))
        git_dir = os.path.realpath(git_dir)
        config_path = os.path.join(git_dir, _CONFIG)
        if not os.path.isfile(config_path):
            raise StoreNotFound(git_dir)
        for required in ("HEAD", "objects", "refs"):
            if not os.path.exists(os.path.join(git_dir, required)):
                raise StoreCorrupted(f"store {git_dir} is missing {required}")
        try:
            with open(config_path, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreCorrupted(f"unreadable store config {config_path}: {exc}") from exc
        return cls(git_dir, StoreConfig.from_dict(data, config_path))

    def save_config(self) -> None:
        data = json.dumps(self.config.to_dict(), indent=2).encode() + b"\n"
        write_atomic(os.path.join(self.git_dir, _CONFIG), data)

    # -- locking --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False, timeout: float = 600.0) -> Iterator[None]:
        """A store-wide advisory lock. Snapshots hold ``gc`` shared; gc holds it exclusively,
        so objects are never pruned while a writer may be reusing them."""
        path = os.path.join(self.git_dir, "narrative", f"{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(path, timeout) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- refs -----------------------------------------------------------------------------------

    @staticmethod
    def thread_ref(thread_id: str) -> str:
        return THREAD_REF_PREFIX + thread_id

    def thread_heads(self) -> dict[str, bytes]:
        """thread id → head commit, for every thread that has snapshots."""
        return {
            name[len(THREAD_REF_PREFIX) :]: oid
            for name, oid in self.refs.list(THREAD_REF_PREFIX).items()
        }
