"""Where a workspace's store lives: the per-user data directory, the marker in the workspace
and the index of workspace paths.

A store lives outside its workspace, so that ``git clean -fdx``, ``rm -rf`` of a checkout or a
copy of the workspace can neither destroy nor alias it::

    $XDG_DATA_HOME/narrative/          (platformdirs' user data directory)
        stores/<workspace-id>/         the store (a bare git repository, see narrative.store)
        index/<digest>                 canonical workspace path → workspace id, one file each
        checkouts/<store-key>/<env>    checkouts of worktree environments (providers.worktree);
                                       ``.owner`` names the store, to report orphans
        locks/<digest>.lock            serialises init, migration, adopt and fork per workspace
    <workspace>/.narrative/            the marker: ignores itself and holds only the id
        .gitignore                     "*"
        id                             the workspace id (``ws-…``)

The marker is found first; when it is gone (``git clean -fdx``) the index finds the store by the
workspace's canonical path, and the marker is written again. A marker whose store records
another path is a copy (or a move) of that workspace: the store refuses to touch files until
the user adopts the store or forks a new one. The old layout — a whole store in
``<workspace>/.narrative`` — is recognised here and migrated by :mod:`narrative.store`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterator

from .errors import StoreError
from .fsutil import unlink_quiet, write_atomic
from .ids import is_id
from .jsonio import parse_json
from .plain import Frozen

__all__ = [
    "MARKER_NAME",
    "Found",
    "checkouts_root",
    "claim_checkouts",
    "data_dir",
    "default_store_dir",
    "find_workspace",
    "index_forget",
    "index_lookup",
    "index_record",
    "inspect_directory",
    "legacy_store_dir",
    "marker_dir",
    "marker_is_clean",
    "orphaned_checkouts",
    "read_marker",
    "workspace_lock",
    "write_marker",
]

MARKER_NAME = ".narrative"
_MARKER_ID = "id"
_MARKER_KEEP = frozenset({".gitignore", _MARKER_ID})
_LEGACY_CONFIG = os.path.join("narrative", "config.json")


def data_dir() -> str:
    """The per-user data directory of narrative (``$XDG_DATA_HOME/narrative`` on Linux)."""
    if (common := _linux_data_dir()) is not None:
        return common
    import platformdirs  # imported on demand: most commands never need it twice

    return str(platformdirs.user_data_dir("narrative", appauthor=False))


def _linux_data_dir() -> str | None:
    """What ``platformdirs.user_data_dir`` answers in the common Linux cases (``$XDG_DATA_HOME``
    absolute, or unset with an absolute ``$HOME``), None for any other case. Importing
    platformdirs (pathlib, tempfile, shutil...) cost every command's start-up ~8 ms."""
    env = os.environ
    if sys.platform != "linux" or "ANDROID_DATA" in env or "ANDROID_ROOT" in env:
        return None
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg:
        return os.path.join(xdg, "narrative") if os.path.isabs(xdg) else None
    if not os.path.isabs(env.get("HOME", "")):
        return None  # platformdirs asks the password database
    return os.path.join(os.path.expanduser("~/.local/share"), "narrative")


def _private_dir(*parts: str) -> str:
    """A directory below the data directory, created owner-only (stores hold keys)."""
    path = os.path.join(data_dir(), *parts)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def default_store_dir(workspace_id: str) -> str:
    """Where the store of ``workspace_id`` lives by default (not created)."""
    return os.path.join(data_dir(), "stores", workspace_id)


def checkouts_root(store_key: str) -> str:
    """The directory holding the worktree checkouts of one store (not created)."""
    return os.path.join(data_dir(), "checkouts", store_key)


_OWNER = ".owner"


def claim_checkouts(store_key: str, git_dir: str) -> str:
    """Create the checkouts directory of a store, recording which store owns it (so that
    checkouts outliving their store are found by :func:`orphaned_checkouts`)."""
    root = checkouts_root(store_key)
    os.makedirs(root, mode=0o700, exist_ok=True)
    owner = os.path.join(root, _OWNER)
    if not os.path.isfile(owner):
        write_atomic(owner, git_dir.encode("utf-8", "surrogateescape") + b"\n")
    return root


def orphaned_checkouts(is_store: Callable[[str], bool]) -> list[str]:
    """Checkouts whose store is gone: the work they may hold is nobody's to collect now, so
    they are reported (never removed silently)."""
    base = os.path.join(data_dir(), "checkouts")
    try:
        roots = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    found = []
    for name in roots:
        root = os.path.join(base, name)
        try:
            with open(os.path.join(root, _OWNER), "rb") as f:
                owner = f.read(4096).decode("utf-8", "surrogateescape").strip()
        except OSError:
            continue
        if not is_store(owner):
            found += [os.path.join(root, n) for n in sorted(os.listdir(root)) if n != _OWNER]
    return found


def marker_dir(workspace: str) -> str:
    return os.path.join(workspace, MARKER_NAME)


def legacy_store_dir(workspace: str) -> str | None:
    """``<workspace>/.narrative`` when it is a whole store, not a marker: one of the old
    layout, or one put there on purpose with ``--store``."""
    path = marker_dir(workspace)
    if read_marker(workspace) is None and os.path.isfile(os.path.join(path, _LEGACY_CONFIG)):
        return path
    return None


def read_marker(workspace: str) -> str | None:
    """The workspace id in ``<workspace>/.narrative/id``, if there is a well-formed one."""
    try:
        with open(os.path.join(marker_dir(workspace), _MARKER_ID), "rb") as f:
            value = f.read(200).decode("ascii", "replace").strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return None
    return value if is_id(value, "workspace") else None


def write_marker(workspace: str, workspace_id: str) -> None:
    """Write (or repair) the marker of ``workspace``.

    ``.gitignore`` goes first, so the directory is never visible to git or to a snapshot; the id
    file is replaced atomically. Whatever else the directory holds is what remains of an
    old-layout store that was migrated (the id is written only after the new store was
    verified), and is removed.
    """
    path = marker_dir(workspace)
    os.makedirs(path, exist_ok=True)
    write_atomic(os.path.join(path, ".gitignore"), b"*\n")
    write_atomic(os.path.join(path, _MARKER_ID), workspace_id.encode() + b"\n")
    _remove_leftovers(path)


def _remove_leftovers(path: str) -> None:
    import shutil  # only needed right after a migration

    for name in os.listdir(path):
        if name in _MARKER_KEEP or name.startswith(".tmp-"):  # another writer's temp file
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            unlink_quiet(full)


def marker_is_clean(workspace: str) -> bool:
    """Whether the marker holds nothing but its ``.gitignore`` and id."""
    try:
        return set(os.listdir(marker_dir(workspace))) <= _MARKER_KEEP
    except OSError:
        return True


# -- the index: canonical workspace path → workspace id ---------------------------------------


def _digest(path: str) -> str:
    import hashlib  # (only here: it loads OpenSSL, which most commands do without)

    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _index_file(workspace: str) -> str:
    return os.path.join(data_dir(), "index", _digest(workspace))


def index_lookup(workspace: str) -> str | None:
    """The workspace id recorded for the canonical path ``workspace``, if any.

    Each entry is one small file replaced atomically, so a crash leaves the old entry or the new
    one; an entry that cannot be read is treated as absent (the marker is the primary record).
    """
    try:
        with open(_index_file(workspace), "rb") as f:
            entry = parse_json(f.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("path") != workspace:
        return None
    value = entry.get("id")
    return value if isinstance(value, str) and is_id(value, "workspace") else None


def index_record(workspace: str, workspace_id: str) -> None:
    """Record that the canonical path ``workspace`` has the id ``workspace_id``."""
    _private_dir("index")
    data = json.dumps({"path": workspace, "id": workspace_id}).encode() + b"\n"
    write_atomic(_index_file(workspace), data)


def index_forget(workspace: str, workspace_id: str) -> None:
    """Drop the entry of ``workspace`` if it still names ``workspace_id``."""
    if index_lookup(workspace) == workspace_id:
        unlink_quiet(_index_file(workspace))


@contextlib.contextmanager
def workspace_lock(workspace: str) -> Iterator[None]:
    """Serialise the commands that create, migrate, adopt or fork the store of ``workspace``
    (an flock: released by the kernel when its holder dies)."""
    try:
        path = os.path.join(_private_dir("locks"), _digest(workspace) + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot use the narrative data directory {data_dir()}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- discovery --------------------------------------------------------------------------------


class Found(Frozen):
    """A workspace directory and how it was recognised."""

    __slots__ = ("by_marker", "workspace", "workspace_id")
    FIELDS = ("workspace", "workspace_id", "by_marker")
    workspace: str
    """Its canonical path."""
    workspace_id: str | None
    """The id from its marker or the index; None for an old-layout store."""
    by_marker: bool
    """Whether ``.narrative`` is there (a marker, or a whole store); else the index knew it."""

    def __init__(self, workspace: str, workspace_id: str | None, by_marker: bool) -> None:
        self.set_fields(workspace, workspace_id, by_marker)


def inspect_directory(
    directory: str, index_valid: Callable[[str, str], bool] | None = None
) -> Found | None:
    """Whether the canonical ``directory`` is a workspace: marker, old layout, or index (an
    index entry counts only if ``index_valid(directory, id)``, when given)."""
    marked = read_marker(directory)
    if marked is not None:
        return Found(directory, marked, by_marker=True)
    if legacy_store_dir(directory) is not None:
        return Found(directory, None, by_marker=True)
    indexed = index_lookup(directory)
    if indexed is not None and (index_valid is None or index_valid(directory, indexed)):
        return Found(directory, indexed, by_marker=False)
    return None


def find_workspace(
    start: str, index_valid: Callable[[str, str], bool] | None = None
) -> Found | None:
    """The nearest workspace at or above ``start``."""
    path = os.path.realpath(start)
    while True:
        found = inspect_directory(path, index_valid)
        if found is not None:
            return found
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
