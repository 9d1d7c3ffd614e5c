"""The shadow store: a bare git repository away from the user's workspace.

By default a store lives in the per-user data directory, keyed by a workspace id that a small
marker in the workspace names (see :mod:`narrative.location`); ``init --store DIR`` or
``$NARRATIVE_STORE`` put it anywhere else. Layout of a store directory::

    HEAD config objects/ refs/      a real bare git repo (``git --git-dir`` reads it)
    .gitignore                      "*": a store inside a work tree is never seen by its git
    narrative/config.json           workspace path and id, default objective/thread, size cap
    narrative/cache/                stat caches (optimisation only)
    narrative/tmp/                  temp files of in-flight writes (same file system)
    narrative/no-hooks/             empty; ``core.hooksPath`` points here

A store of the old layout (a whole store in ``<workspace>/.narrative``) is migrated to the data
directory the first time it is found: copied, verified by opening the copy, and only then is
the old directory turned into a marker.

Isolation: the store never uses the user's repository, config, hooks or index; git config is
written so that stock git run against the store runs no hooks and signs nothing (the files that
make a store, and its config, are :mod:`narrative.storeconfig`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator

from . import location
from .errors import (
    InvalidInput,
    LockTimeout,
    StoreCorrupted,
    StoreError,
    StoreExists,
    StoreNotFound,
    WorkspaceCopied,
)
from .fsutil import fsync_dir, write_atomic
from .ids import is_id, new_id
from .meta import MetaStore
from .odb import ObjectStore
from .refs import THREAD_REF_PREFIX, RefStore
from .storeconfig import (
    StoreConfig,
    is_store,
    load_config,
    read_config,
    write_config,
    write_git_config,
    write_skeleton,
)

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)

if TYPE_CHECKING:
    import logging

__all__ = [
    "DEFAULT_STORE_NAME",
    "THREAD_REF_PREFIX",
    "Store",
    "discover_store",
    "orphaned_checkouts",
]


def _log() -> logging.Logger:
    """This module's logger; logging is imported on first use only (it costs every command's
    start-up ~3 ms, and a store logs only on rare repairs and migrations)."""
    import logging

    return logging.getLogger(__name__)


DEFAULT_STORE_NAME = location.MARKER_NAME
_MIGRATING_TO = os.path.join("narrative", "migrating-to")
# Local files a fork takes along besides objects and refs: its remotes and the event logs of
# the runs its history names. Environments, hubs, caches and keys stay with the original.
_FORK_SHARED = (os.path.join("narrative", "remotes.json"), os.path.join("narrative", "runs"))


def orphaned_checkouts() -> list[str]:
    """Worktree checkouts in the data directory whose store no longer exists."""
    return location.orphaned_checkouts(is_store)


def _indexed_store_matches(workspace: str, workspace_id: str) -> bool:
    """An index entry counts only while its store still records that workspace."""
    config = read_config(location.default_store_dir(workspace_id))
    return config is not None and config.workspace == workspace


def discover_store(start: str) -> str | None:
    """The store directory of the workspace containing ``start`` (no side effects: an
    old-layout store is returned where it is, not migrated)."""
    found = location.find_workspace(start, _indexed_store_matches)
    if found is None:
        return None
    if found.workspace_id is None:
        return location.marker_dir(found.workspace)
    git_dir = location.default_store_dir(found.workspace_id)
    return git_dir if is_store(git_dir) else None


class Store:
    """An opened shadow store. Use :meth:`init` or :meth:`open`."""

    def __init__(self, git_dir: str, config: StoreConfig, opened_in: str | None = None) -> None:
        self.git_dir = git_dir
        self.config = config
        self.opened_in = opened_in
        """The workspace directory the store was found from (None: the store was named)."""
        self.migrated_from: str | None = None
        """The old-layout store directory this store was migrated from while opening it."""
        self.odb = ObjectStore(git_dir)
        # thread heads only move forward, whoever moves them (see narrative.refs)
        self.refs = RefStore(git_dir, odb=self.odb)
        self.meta = MetaStore(self.odb, self.refs, lambda: self.lock("gc", shared=True))

    @property
    def workspace(self) -> str:
        """The workspace whose files this store snapshots and restores.

        Raises :class:`~narrative.errors.WorkspaceCopied` when the store was found from a
        directory that is not its recorded workspace (a copy or a move): every command that
        reads or writes workspace files asks for ``init --adopt`` or ``--fork`` then, instead of
        scanning a directory the user is not in.
        """
        if self.copy_of is not None:
            assert self.opened_in is not None
            raise WorkspaceCopied(self.opened_in, self.config.workspace, self.config.workspace_id)
        return self.config.workspace

    @property
    def copy_of(self) -> str | None:
        """The recorded workspace when the store was found from another directory."""
        if self.opened_in is not None and self.opened_in != self.config.workspace:
            return self.config.workspace
        return None

    @property
    def key(self) -> str:
        """A name for this store that is stable while it exists: its workspace id, or for an
        old-layout store a digest of its directory."""
        if self.config.workspace_id:
            return self.config.workspace_id
        import hashlib  # (only here: it loads OpenSSL, which most commands do without)

        return "store-" + hashlib.sha256(self.git_dir.encode()).hexdigest()[:20]

    # -- creation and discovery -------------------------------------------------------------

    @classmethod
    def init(cls, workspace: str, store_dir: str | None = None) -> Store:
        """Create a store for ``workspace`` with a default objective and thread: in the data
        directory with a marker in the workspace, or at ``store_dir`` when given."""
        workspace = os.path.realpath(workspace)
        if not os.path.isdir(workspace):
            raise InvalidInput(f"workspace is not a directory: {workspace}")
        if store_dir is not None:
            return cls._create(os.path.realpath(store_dir), workspace, new_id("workspace"))
        with location.workspace_lock(workspace):
            legacy = location.legacy_store_dir(workspace)
            if legacy is not None:
                raise StoreExists(legacy)
            existing = location.read_marker(workspace)
            if existing is None:
                existing = location.index_lookup(workspace)
            config = read_config(location.default_store_dir(existing)) if existing else None
            if existing is not None and config is not None:
                if config.workspace == workspace:
                    raise StoreExists(location.default_store_dir(existing))
                if location.read_marker(workspace) == existing:
                    raise WorkspaceCopied(workspace, config.workspace, existing)
            marker = location.marker_dir(workspace)
            if os.path.lexists(marker) and not os.path.isdir(marker):
                raise InvalidInput(f"{marker} exists and is not a directory")
            workspace_id = new_id("workspace")
            git_dir = location.default_store_dir(workspace_id)
            try:
                store = cls._create(git_dir, workspace, workspace_id)
                # The store is complete before anything points at it: index, then marker.
                location.index_record(workspace, workspace_id)
                location.write_marker(workspace, workspace_id)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the store of {workspace} at {git_dir}: {exc}"
                ) from exc
            store.opened_in = workspace
            return store

    @classmethod
    def _create(cls, git_dir: str, workspace: str, workspace_id: str) -> Store:
        if is_store(git_dir):
            raise StoreExists(git_dir)
        if os.path.isdir(git_dir) and os.listdir(git_dir):
            raise InvalidInput(f"refusing to create a store in a non-empty directory: {git_dir}")
        write_skeleton(git_dir, git_dir)
        config = StoreConfig(workspace=workspace, workspace_id=workspace_id)
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
        """Open an existing store: ``store_dir`` (or ``$NARRATIVE_STORE``), else the store of
        the nearest workspace at or above ``workspace`` (default: the current directory).

        A found workspace whose marker is gone gets it back; a store of the old layout is
        migrated to the data directory first (see :attr:`migrated_from`).
        """
        git_dir = store_dir or os.environ.get("NARRATIVE_STORE") or None
        if git_dir is not None:
            return cls._load(os.path.realpath(git_dir))
        start = os.path.abspath(workspace or os.getcwd())
        found = location.find_workspace(start, _indexed_store_matches)
        if found is None:
            raise StoreNotFound(start)
        migrated_from = None
        if found.workspace_id is None:
            in_place = location.marker_dir(found.workspace)
            placed = read_config(in_place)
            if placed is not None and placed.workspace_id:
                # Put in the workspace on purpose (``init --store <ws>/.narrative``, the store of
                # an environment's runtime): used where it is, never moved.
                store = cls._load(in_place)
                store.opened_in = found.workspace
                return store
            migrated_from = in_place
            workspace_id = _migrate_legacy(found.workspace)
        else:
            workspace_id = found.workspace_id
        git_dir = location.default_store_dir(workspace_id)
        if not is_store(git_dir):
            raise StoreNotFound(
                found.workspace,
                f"the marker of {found.workspace} names workspace {workspace_id}, but its store "
                f"{git_dir} is gone (run 'narrative init' to start a new one)",
            )
        store = cls._load(git_dir)
        store.opened_in = found.workspace
        store.migrated_from = migrated_from
        if store.copy_of is None and not (
            location.read_marker(found.workspace) == workspace_id
            and location.marker_is_clean(found.workspace)
        ):
            _repair_marker(found.workspace, workspace_id)
        return store

    @classmethod
    def _load(cls, git_dir: str) -> Store:
        if not is_store(git_dir):
            raise StoreNotFound(git_dir)
        for required in ("HEAD", "objects", "refs"):
            if not os.path.exists(os.path.join(git_dir, required)):
                raise StoreCorrupted(f"store {git_dir} is missing {required}")
        return cls(git_dir, load_config(git_dir))

    @classmethod
    def adopt(cls, start: str) -> Store:
        """Make the workspace at or above ``start`` the workspace of the store its marker
        names (the original was moved, or the copy is to carry on in its place)."""
        found, git_dir = _copied_workspace(start)
        with location.workspace_lock(found.workspace):
            store = cls._load(git_dir)
            previous = store.config.workspace
            store.config.workspace = found.workspace
            store.save_config()
            if found.workspace_id is not None:
                location.index_record(found.workspace, found.workspace_id)
                location.index_forget(previous, found.workspace_id)
        store.opened_in = found.workspace
        return store

    @classmethod
    def fork(cls, start: str) -> Store:
        """Give the copied workspace at or above ``start`` a store of its own, seeded with the
        history of the store its marker names (so snapshot ids stay shared); that store is
        left exactly as it was."""
        found, git_dir = _copied_workspace(start)
        if found.workspace_id is None:
            raise InvalidInput(
                f"the store of {found.workspace} lives inside it ({git_dir}): a copy of the "
                "workspace holds a copy of the store, so adopt it with 'narrative init --adopt'"
            )
        with location.workspace_lock(found.workspace):
            source = cls._load(git_dir)
            workspace_id = new_id("workspace")
            config = source.config.replace(workspace=found.workspace, workspace_id=workspace_id)
            with source.lock("gc", shared=True):  # gc must not prune what is being copied
                store = _replicate(
                    source, location.default_store_dir(workspace_id), config, whole=False
                )
            location.index_record(found.workspace, workspace_id)
            location.write_marker(found.workspace, workspace_id)
        store.opened_in = found.workspace
        return store

    def save_config(self) -> None:
        write_config(self.git_dir, self.config)

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


def _copied_workspace(start: str) -> tuple[location.Found, str]:
    """The workspace at or above ``start`` and its store directory; the workspace must be a
    copy (or a move) of the one its store records."""
    found = location.find_workspace(os.path.abspath(start))
    if found is None or not found.by_marker:
        raise InvalidInput(f"no workspace marker at or above {os.path.abspath(start)}")
    if found.workspace_id is None:
        git_dir = location.marker_dir(found.workspace)  # a store kept in the workspace
    else:
        git_dir = location.default_store_dir(found.workspace_id)
    config = read_config(git_dir)
    if config is None:
        raise StoreNotFound(
            found.workspace,
            f"the store of {found.workspace} ({git_dir}) is gone or unreadable: nothing to "
            "adopt or fork (run 'narrative init' to start a new one)",
        )
    if config.workspace == found.workspace:
        raise InvalidInput(f"{found.workspace} already is the workspace of its store")
    return found, git_dir


def _repair_marker(workspace: str, workspace_id: str) -> None:
    """Write the marker again (``git clean -fdx`` removed it). Best effort: a workspace that
    cannot be written is still found by its path."""
    try:
        with location.workspace_lock(workspace):
            location.write_marker(workspace, workspace_id)
    except (OSError, StoreError) as exc:
        _log().warning("cannot write the marker of %s: %s", workspace, exc)


def _replicate(source: Store, final: str, config: StoreConfig, whole: bool) -> Store:
    """A copy of ``source`` at ``final``, built beside it, verified and renamed into place.

    ``whole`` copies every file (a migration: environments, caches and keys move with the
    store, and absolute paths into the old directory in its JSON state are rewritten); else
    only the history — objects, refs, remotes and run event logs — goes into a fresh store (a
    fork). The copy is opened
    and its refs checked against the source's before it gets its final name, so a crash
    leaves at worst an unreferenced temporary directory.
    """
    import shutil

    parent = os.path.dirname(final)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    stale = f".tmp-{os.path.basename(final)}-"
    for name in os.listdir(parent):  # an earlier attempt killed mid-copy (same id: same lock)
        if name.startswith(stale):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, stale + os.urandom(6).hex())
    try:
        expected = source.refs.list("refs/")
        if whole:
            shutil.copytree(
                source.git_dir,
                tmp,
                symlinks=True,
                ignore=shutil.ignore_patterns("*.lock", ".tmp-*", "migrating-to"),
            )
            write_git_config(tmp, final)
            _relocate_paths(os.path.join(tmp, "narrative"), source.git_dir, final)
        else:
            write_skeleton(tmp, final)
            # refs first: every object they name was written before them, so it is copied too
            shutil.copytree(
                os.path.join(source.git_dir, "refs"),
                os.path.join(tmp, "refs"),
                symlinks=True,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("*.lock"),
            )
            packed = os.path.join(source.git_dir, "packed-refs")
            if os.path.isfile(packed):
                shutil.copy2(packed, os.path.join(tmp, "packed-refs"))
            shutil.copytree(
                os.path.join(source.git_dir, "objects"),
                os.path.join(tmp, "objects"),
                symlinks=True,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("*.lock", ".tmp-*", "tmp_*"),
            )
            for shared in _FORK_SHARED:  # not history, but what the copy needs to go on
                src = os.path.join(source.git_dir, shared)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, shared), symlinks=True)
                elif os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, shared))
        write_config(tmp, config)
        copy = Store._load(tmp)
        refs = copy.refs.list("refs/")
        missing = [name for name, oid in refs.items() if not copy.odb.exists(oid)]
        if missing or (whole and refs != expected) or not set(expected) <= set(refs):
            raise StoreCorrupted(
                f"the copy of {source.git_dir} at {tmp} does not match it "
                f"({', '.join(missing[:3]) or 'refs differ'}); nothing was changed"
            )
        os.rename(tmp, final)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Store._load(final)


def _relocate_paths(directory: str, old: str, new: str) -> None:
    """Rewrite absolute paths below ``old`` in the JSON state files under ``directory``
    (environment records name checkouts that lived inside the store)."""
    escaped_old = json.dumps(old)[1:-1]
    escaped_new = json.dumps(new)[1:-1]
    pattern = re.compile(re.escape(escaped_old) + r'(?=["/\\])')
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if not name.endswith((".json", ".jsonl")):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
            updated = pattern.sub(lambda _m: escaped_new, text)
            if updated != text:
                write_atomic(path, updated.encode("utf-8", "surrogateescape"))


def _migrate_legacy(workspace: str) -> str:
    """Move the old-layout store in ``<workspace>/.narrative`` to the data directory and turn
    that directory into a marker; returns the workspace id.

    Crash-safe at every step: the chosen id is written into the old store first (so a rerun
    reuses it), the copy is verified by opening it before it gets its final name, and the old
    store stops being one only when the marker's id is written — after which the rest of the
    old directory is removed.
    """
    try:
        return _migrate_legacy_locked(workspace)
    except OSError as exc:
        raise StoreError(
            f"cannot move the store of {workspace} out of the workspace: {exc} (the store in "
            f"{location.marker_dir(workspace)} is still the one in use)"
        ) from exc


def _migrate_legacy_locked(workspace: str) -> str:
    with location.workspace_lock(workspace):
        legacy = location.legacy_store_dir(workspace)
        if legacy is None:  # another process migrated it meanwhile
            found = location.inspect_directory(workspace)
            if found is None or found.workspace_id is None:
                raise StoreNotFound(workspace)
            return found.workspace_id
        source = Store._load(legacy)
        with source.lock("gc"):  # no writer of the old store runs during the switch
            workspace_id = _read_id(os.path.join(legacy, _MIGRATING_TO)) or new_id("workspace")
            write_atomic(os.path.join(legacy, _MIGRATING_TO), workspace_id.encode() + b"\n")
            final = location.default_store_dir(workspace_id)
            config = source.config.replace(workspace_id=workspace_id)
            existing = read_config(final)
            if existing is not None and Store._load(final).refs.list("refs/") != (
                source.refs.list("refs/")
            ):
                # A copy from an interrupted run that the old store has outgrown since.
                import shutil

                shutil.rmtree(final)
                existing = None
            if existing is None:
                _replicate(source, final, config, whole=True)
            if source.config.workspace == workspace:
                location.index_record(workspace, workspace_id)
            location.write_marker(workspace, workspace_id)
        _log().info("migrated the store of %s from %s to %s", workspace, legacy, final)
        return workspace_id


def _read_id(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            value = f.read(100).decode("ascii", "replace").strip()
    except OSError:
        return None
    return value if is_id(value, "workspace") else None
