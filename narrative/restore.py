"""Materialising snapshots: into an empty directory, or back into the workspace without loss.

Restoring into the workspace first takes a safety snapshot (so the restore can be undone), then
changes only paths that snapshot holds: ignored files, skipped (too-large) files and anything
else the snapshot did not capture are never deleted or overwritten. Every file is re-checked
against the safety snapshot's stat key just before it is touched; a file edited in between stops
the restore with an error instead of being lost.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import progress
from .confined import ConfinedRoot
from .errors import RestoreError, StoreCorrupted
from .fsutil import WORKSPACE_TMP_PREFIX, mkstemp
from .models import Snapshot
from .objects import MODE_EXEC, MODE_LINK
from .odb import ObjectStore
from .paths import check_path
from .statcache import StatKey
from .store import Store
from .trees import FlatTree, flatten_tree

__all__ = [
    "WORKSPACE_LOCK",
    "RestoreResult",
    "apply_changes",
    "check_changes",
    "materialize",
    "materialize_confined",
    "restore_workspace",
    "sync_directory",
]

_PARALLEL_MIN = 64


@dataclass
class RestoreResult:
    """What a restore did."""

    snapshot: str
    target: str
    written: int = 0
    deleted: int = 0
    safety_snapshot: str | None = None
    kept: list[str] = field(default_factory=list)


def _create_new(path: str, mode: int, data: bytes, dir_fd: int | None = None) -> None:
    """Create the file or symlink ``path`` (relative to ``dir_fd`` when given) holding
    ``data``: never over anything already there, never through a symlink in its place."""
    if mode == MODE_LINK:
        os.symlink(os.fsdecode(data), path, dir_fd=dir_fd)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o755 if mode == MODE_EXEC else 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_file(
    odb: ObjectStore, root: str, path: str, mode: int, oid: bytes, fresh: bool = False
) -> None:
    """Write one blob. ``fresh``: the target directory started empty, so create directly;
    otherwise write a temp file and rename it over the old one (never a torn file)."""
    data = _blob(odb, path, oid)
    full = os.path.join(root, path)
    if fresh:
        _create_new(full, mode, data)
        return
    if mode == MODE_LINK:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)
        os.symlink(os.fsdecode(data), full)
        return
    directory = os.path.dirname(full)
    fd, tmp = mkstemp(WORKSPACE_TMP_PREFIX, directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755 if mode == MODE_EXEC else 0o644)
        os.replace(tmp, full)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_all(
    odb: ObjectStore, root: str, items: list[tuple[str, int, bytes]], fresh: bool = False
) -> None:
    if not fresh:  # every directory exists before a file of the workspace is replaced
        for directory in sorted({os.path.dirname(p) for p, _m, _o in items}):
            if directory:
                os.makedirs(os.path.join(root, directory), exist_ok=True)
        _each_in_parallel(items, lambda path, mode, oid: _write_file(odb, root, path, mode, oid))
        return
    # An empty target: each directory is made by the worker that first writes into it, so the
    # mkdirs run in parallel too (an inode cost 0.3-0.8 ms of kernel time on the development
    # VM: a quick-profile restore's 200 directories were 0.1 s on one thread before any file).
    made: set[str] = set()

    def write(path: str, mode: int, oid: bytes) -> None:
        directory = os.path.dirname(path)
        if directory and directory not in made:
            os.makedirs(os.path.join(root, directory), exist_ok=True)  # a racing twin is fine
            made.add(directory)
        _write_file(odb, root, path, mode, oid, fresh=True)

    _each_in_parallel(items, write)


def _each_in_parallel(
    items: list[tuple[str, int, bytes]], write: Callable[[str, int, bytes], None]
) -> None:
    """``write(path, mode, blob id)`` for every item, on several threads when there are many
    (inflating and writing release the GIL), with progress."""
    with progress.stage("restoring", len(items), "files") as advance:

        def write_batch(batch: list[tuple[str, int, bytes]]) -> None:
            for path, mode, oid in batch:
                write(path, mode, oid)
                advance(1)

        if len(items) < _PARALLEL_MIN:
            write_batch(items)
            return
        workers = max(2, min(4, os.cpu_count() or 2))
        batches = [items[i :: workers * 4] for i in range(workers * 4)]
        from concurrent.futures import ThreadPoolExecutor  # imported late: costly at start-up

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write_batch, batches))


def _blob(odb: ObjectStore, path: str, oid: bytes) -> bytes:
    kind, data = odb.read(oid)
    if kind != "blob":
        raise StoreCorrupted(f"{path}: {oid.hex()} is not a blob")
    return data


def materialize_confined(store: Store, snapshot: Snapshot, target: str) -> RestoreResult:
    """Write ``snapshot`` into the empty directory ``target`` through :class:`ConfinedRoot`:
    every component is opened relative to its parent with ``O_NOFOLLOW``, so a symlink that
    appears in ``target`` meanwhile (a process of the directory's previous user planted it)
    makes the restore fail with :class:`~narrative.errors.UnsafePath` instead of writing
    outside ``target``.
    """
    root = ConfinedRoot(target)
    if os.listdir(root.root):
        raise RestoreError(f"target {target} is not an empty directory")
    flat = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
    items = [(check_path(path), mode, oid) for path, (mode, oid) in flat.items()]
    # each directory is opened once, confined; each entry is created in its directory's
    # descriptor with O_EXCL | O_NOFOLLOW, so nothing planted in its place is followed
    with root.directories({path.rpartition("/")[0] for path, _m, _o in items}) as dirs:

        def write(path: str, mode: int, oid: bytes) -> None:
            parent, _, name = path.rpartition("/")
            _create_new(name, mode, _blob(store.odb, path, oid), dir_fd=dirs[parent])

        _each_in_parallel(items, write)
    return RestoreResult(snapshot.id, root.root, written=len(flat))


def materialize(store: Store, snapshot: Snapshot, target: str) -> RestoreResult:
    """Write ``snapshot`` into ``target``, which must be missing or empty."""
    target = os.path.abspath(target)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise RestoreError(f"target {target} exists and is not an empty directory")
    flat = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
    os.makedirs(target, exist_ok=True)
    _write_all(store.odb, target, [(p, m, o) for p, (m, o) in flat.items()], fresh=True)
    return RestoreResult(snapshot.id, target, written=len(flat))


def sync_directory(store: Store, root: str, current: FlatTree, target: FlatTree) -> RestoreResult:
    """Turn a directory known to hold ``current`` into ``target``, touching only what differs.

    For directories the store owns (environments): the caller has verified that ``root`` holds
    exactly ``current``, so there are no safety snapshot or stat re-checks here. Files that
    are not part of ``current`` (ignored ones) are left alone.
    """
    removed = [p for p in current if p not in target]
    for path in sorted(removed, reverse=True):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, path))
    _prune_empty_dirs(root, {os.path.dirname(p) for p in removed})
    writes = [(p, m, o) for p, (m, o) in target.items() if current.get(p) != (m, o)]
    for path, _m, _o in writes:
        st = _lstat(os.path.join(root, path))
        if st is not None and stat_mod.S_ISDIR(st.st_mode):
            raise RestoreError(f"directory {path} is in the way of a file and is not empty")
    _write_all(store.odb, root, writes)
    return RestoreResult("", root, written=len(writes), deleted=len(removed))


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


#: Held by every command that writes files into the workspace (restore, merge): its scan may
#: then sweep temporary files, which can only be leftovers of a killed writer.
WORKSPACE_LOCK = "workspace"

#: The thread that keeps what a restore replaced in the workspace (``narrative log --all``).
RESTORE_BACKUP_THREAD = "restore-backup"


def restore_backup_thread(store: Store) -> str:
    """The id of the store's ``restore-backup`` thread (created on first use)."""
    from .hierarchy import create_thread, list_threads

    objective = store.config.default_objective
    for thread in list_threads(store, objective):
        if thread.name == RESTORE_BACKUP_THREAD:
            return thread.id
    return create_thread(store, objective, RESTORE_BACKUP_THREAD).id


def restore_workspace(
    store: Store,
    snapshot: Snapshot,
    thread_id: str | None = None,
    continue_thread: str | None = None,
) -> RestoreResult:
    """Make the workspace equal ``snapshot`` for every path the safety snapshot holds.

    What the workspace held is kept first: unchanged since the workspace HEAD, it is that
    snapshot; otherwise a safety snapshot on ``thread_id`` (default: the ``restore-backup``
    thread, never the thread being restored from, whose head must not move). The workspace
    HEAD then names ``snapshot``; it continues ``snapshot``'s thread when it is that thread's
    head, and the next snapshot starts a new thread otherwise (:func:`take_snapshot`);
    ``continue_thread`` names the thread the workspace continues instead (a run's runtime: its
    thread, forked from the restored base).
    """
    from .head import read_head, set_head
    from .snapshot import take_snapshot

    ws = store.workspace
    backup = thread_id or restore_backup_thread(store)
    with store.lock(WORKSPACE_LOCK, timeout=60.0):
        safety = take_snapshot(
            store,
            thread_id=backup,
            message=f"workspace before restoring {snapshot.id}",
            unchanged_if=read_head(store),
            track_head=False,
            sweep_tmp=True,
        )
        current = flatten_tree(store.odb, bytes.fromhex(safety.snapshot.tree))
        target = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
        removed = [p for p in current if p not in target]
        writes = [(p, m, o) for p, (m, o) in target.items() if current.get(p) != (m, o)]
        apply_changes(store, current, safety.cache.file_keys(), writes, removed, target)
    commit = bytes.fromhex(snapshot.commit)
    at_head = store.refs.read(store.thread_ref(snapshot.thread)) == commit
    set_head(store, commit, continue_thread or (snapshot.thread if at_head else None))
    return RestoreResult(
        snapshot.id,
        ws,
        written=len(writes),
        deleted=len(removed),
        safety_snapshot=safety.snapshot.id,
    )


def check_changes(
    store: Store,
    current: FlatTree,
    writes: list[tuple[str, int, bytes]],
    targets: Iterable[str] | None = None,
) -> None:
    """Raise RestoreError if writing ``writes`` over the workspace snapshotted as ``current``
    would destroy data no snapshot holds; changes nothing. ``targets`` are the paths checked for
    unsnapshotted data in the way (default: the written paths)."""
    ws = store.workspace
    for path, _m, _o in writes:
        check_path(path)  # whatever tree they came from (a merge builds its own)
    _refuse_unsafe(ws, current, targets if targets is not None else [p for p, _m, _o in writes])
    for path, _m, _o in writes:
        st = _lstat(os.path.join(ws, path)) if path not in current else None
        if st is not None and not stat_mod.S_ISDIR(st.st_mode):
            # e.g. an ignored file: replacing it would lose data that no snapshot holds
            raise RestoreError(f"{path} exists but was never snapshotted; move it away first")


def apply_changes(
    store: Store,
    current: FlatTree,
    keys: Mapping[str, StatKey],
    writes: list[tuple[str, int, bytes]],
    removed: list[str],
    targets: Iterable[str] | None = None,
) -> None:
    """Turn the workspace from ``current`` into the target by deleting ``removed`` and writing
    ``writes`` (path, mode, oid), touching nothing else.

    ``current`` must be a snapshot just taken and ``keys`` its stat keys: every file is re-checked
    against them just before it is touched, so an edit made meanwhile stops the change instead
    of being lost. :func:`check_changes` runs first; nothing is written unless it passes.
    """
    ws = store.workspace
    check_changes(store, current, writes, targets)

    def check_unchanged(path: str) -> None:
        st = _lstat(os.path.join(ws, path))
        if st is None:
            return
        seen = keys.get(path)
        if not seen or tuple(seen[:4]) != (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino):
            raise RestoreError(f"{path} changed during the restore; it was left as it is")

    for path in sorted(removed, reverse=True):
        check_unchanged(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(ws, path))
    _prune_empty_dirs(ws, {os.path.dirname(p) for p in removed})
    for path, _m, _o in writes:
        if path in current:
            check_unchanged(path)
        st = _lstat(os.path.join(ws, path))
        if st is not None and stat_mod.S_ISDIR(st.st_mode):
            raise RestoreError(f"directory {path} is in the way of a file and is not empty")
    _write_all(store.odb, ws, writes)


def _refuse_unsafe(ws: str, current: FlatTree, target: Iterable[str]) -> None:
    """Fail before touching anything if the restore would have to remove unsnapshotted data."""
    checked: set[str] = set()
    for path in target:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in checked:
                continue
            checked.add(parent)
            st = _lstat(os.path.join(ws, parent))
            if st is not None and not stat_mod.S_ISDIR(st.st_mode) and parent not in current:
                raise RestoreError(f"{parent} is in the way of {path} and was never snapshotted")
        st = _lstat(os.path.join(ws, path))
        if st is not None and stat_mod.S_ISDIR(st.st_mode):
            untracked = _untracked_below(os.path.join(ws, path), path, current)
            if untracked:
                raise RestoreError(
                    f"directory {path} holds files that are not snapshotted ({untracked[0]}); "
                    "move them away or snapshot them first"
                )


def _untracked_below(directory: str, rel_dir: str, current: FlatTree) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        rel_root = os.path.relpath(root, directory)
        base = rel_dir if rel_root == "." else rel_dir + "/" + rel_root.replace(os.sep, "/")
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [f"{base}/{n}" for n in files + links if f"{base}/{n}" not in current]
        if ".git" in dirs:
            found.append(f"{base}/.git")
    return found


def _prune_empty_dirs(ws: str, dirs: set[str]) -> None:
    for start in sorted(dirs, key=len, reverse=True):
        rel = start
        while rel:
            try:
                os.rmdir(os.path.join(ws, rel))
            except OSError:
                break  # not empty: it holds ignored or other files, which stay
            rel = os.path.dirname(rel)
