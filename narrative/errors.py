"""The error tree of the Narrative Engine core.

Every error raised on purpose by the packages derives from :class:`NarrativeError`, so the CLI
can print one clear line and exit 1. Errors carry structured attributes, and mix in a built-in
where one fits (``LookupError`` for unknown ids, ``TimeoutError`` for lock waits)::

    NarrativeError
    ├── StoreError
    │   ├── StoreNotFound            no store for this workspace
    │   ├── StoreExists              init over an existing store
    │   ├── StoreCorrupted           objects/refs/metadata unreadable
    │   ├── WorkspaceCopied          the workspace is a copy or move of the store's workspace
    │   └── LockTimeout (+TimeoutError)
    ├── NotFound (+LookupError)
    │   ├── ObjectiveNotFound(objective_id)
    │   ├── ThreadNotFound(thread_id)
    │   ├── RunNotFound(run_id)
    │   └── SnapshotNotFound(snapshot_id)
    ├── AmbiguousId(prefix, candidates)
    ├── InvalidInput (+ValueError)   bad ids, names, options, paths
    │   ├── UnsafePath(path, reason)  a path the path rule refuses (narrative.paths)
    │   ├── RunNotUsable(run_id)      a run's result that is missing, or from a failed run
    │   └── ProtectedChange(paths)    a merge changing ignore files or config, without --force
    ├── ConcurrentUpdate             compare-and-swap lost too many times
    ├── NonFastForward(ref, old, new) a thread head would stop descending from its old value
    ├── RestoreError                 a restore that would lose data, or cannot proceed
    ├── WorkspaceUnreadable(path)    a snapshot cannot read the workspace's top directory
    └── MergeError                   a workspace merge cannot start, continue or be undone
        ├── MergeInProgress          another merge has not been finished or aborted
        └── NoMergeInProgress        --continue/--abort with nothing to act on

Sibling packages (transfer, gateway, providers) hang their own subtrees below
:class:`NarrativeError`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any


__all__ = [
    "validation_problem",
    "AmbiguousId",
    "ConcurrentUpdate",
    "InvalidInput",
    "LockTimeout",
    "MergeError",
    "MergeInProgress",
    "NarrativeError",
    "NoMergeInProgress",
    "NonFastForward",
    "NotFound",
    "ObjectiveNotFound",
    "ProtectedChange",
    "RestoreError",
    "RunNotFound",
    "RunNotUsable",
    "SnapshotNotFound",
    "StoreCorrupted",
    "StoreError",
    "StoreExists",
    "StoreNotFound",
    "ThreadNotFound",
    "UnsafePath",
    "WatcherStopped",
    "WorkspaceUnreadable",
    "WorkspaceCopied",
]


class NarrativeError(Exception):
    """Root of every error the toolkit raises on purpose."""

    @property
    def code(self) -> str:
        """A stable machine-readable name for the error: its class name in snake_case
        (``SnapshotNotFound`` → ``snapshot_not_found``), as ``--json`` errors report it."""
        name = type(self).__name__
        return "".join(
            "_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name)
        )


class StoreError(NarrativeError):
    """The shadow store is missing, unusable or busy."""


class StoreNotFound(StoreError):
    """No narrative store was found for a workspace."""

    def __init__(self, path: str, detail: str | None = None) -> None:
        super().__init__(detail or f"no narrative store for {path} (run 'narrative init')")
        self.path = path


class StoreExists(StoreError):
    """``init`` was asked to create a store where one already exists."""

    def __init__(self, path: str) -> None:
        super().__init__(f"a narrative store already exists at {path}")
        self.path = path


class StoreCorrupted(StoreError):
    """Objects, refs or metadata of the store cannot be read."""


class WorkspaceCopied(StoreError):
    """The workspace's marker names a store whose workspace is another directory: this one is a
    copy (or the original was moved). Nothing reads or writes its files until the user says
    which it is."""

    def __init__(self, path: str, recorded: str, workspace_id: str) -> None:
        super().__init__(
            f"{path} is a copy or a move of the workspace {recorded} (workspace id "
            f"{workspace_id}): run 'narrative init --adopt' in it to make it that store's "
            "workspace (the original was moved), or 'narrative init --fork' to give it a store "
            "of its own that starts with the same history"
        )
        self.path = path
        self.recorded = recorded
        self.workspace_id = workspace_id


class LockTimeout(StoreError, TimeoutError):
    """A store lock could not be taken in time."""

    def __init__(self, path: str, seconds: float) -> None:
        super().__init__(
            f"store busy, retry: timed out after {seconds:.0f}s waiting for lock {path}"
        )
        self.path = path
        self.seconds = seconds


class NotFound(NarrativeError, LookupError):
    """An id names nothing in the store."""

    kind = "object"

    def __init__(self, ident: str, hint: str = "") -> None:
        super().__init__(f"unknown {self.kind}: {ident}" + (f" ({hint})" if hint else ""))
        self.ident = ident


class ObjectiveNotFound(NotFound):
    """No objective with this id."""

    kind = "objective"

    @property
    def objective_id(self) -> str:
        return self.ident


class ThreadNotFound(NotFound):
    """No thread with this id or name."""

    kind = "thread"

    @property
    def thread_id(self) -> str:
        return self.ident


class RunNotFound(NotFound):
    """No agent run with this id."""

    kind = "run"

    @property
    def run_id(self) -> str:
        return self.ident


class SnapshotNotFound(NotFound):
    """No snapshot with this id, commit or prefix."""

    kind = "snapshot"

    @property
    def snapshot_id(self) -> str:
        return self.ident


class AmbiguousId(NarrativeError, LookupError):
    """A prefix matches more than one id."""

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        shown = ", ".join(sorted(candidates)[:5])
        super().__init__(f"ambiguous id {prefix!r}: matches {shown}")
        self.prefix = prefix
        self.candidates = candidates


class InvalidInput(NarrativeError, ValueError):
    """An argument, option, id or path is malformed."""


class UnsafePath(InvalidInput):
    """A path that may not be written (or read) in a workspace: see :mod:`narrative.paths`.

    Attributes:
        path: The offending path, as given (``str`` or ``bytes``).
        reason: Why it is refused.
    """

    def __init__(self, path: str | bytes, reason: str) -> None:
        shown = path if isinstance(path, str) else path.decode("utf-8", "backslashreplace")
        super().__init__(f"unsafe path {shown!r}: {reason}")
        self.path = path
        self.reason = reason


class ConcurrentUpdate(NarrativeError):
    """A compare-and-swap update kept losing against other writers."""


class WatcherStopped(NarrativeError):
    """The file watcher cannot keep a complete journal (e.g. the inotify watch limit):
    snapshots scan in full."""


class NonFastForward(NarrativeError):
    """A thread head would move to a commit that does not descend from it (or be deleted):
    snapshots would drop out of the thread's history. Only a forced move may do that
    (``narrative thread reset --force``, gc's history rewrite)."""

    def __init__(self, ref: str, old: bytes, new: bytes | None) -> None:
        target = new.hex()[:12] if new is not None else "nothing (a deletion)"
        super().__init__(
            f"refusing to move {ref} from {old.hex()[:12]} to {target}: that is not a "
            "descendant, so snapshots would drop out of the thread "
            "(use 'narrative thread reset --force' to do it anyway)"
        )
        self.ref = ref
        self.old = old
        self.new = new


class WorkspaceUnreadable(NarrativeError):
    """The workspace's top directory cannot be listed (gone, or refused): a snapshot of it
    would record every file as deleted, so none is taken."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"cannot read the workspace {path}: {reason}; nothing was snapshotted")


class RestoreError(NarrativeError):
    """A restore cannot proceed without risking unsnapshotted work."""


class MergeError(NarrativeError):
    """A workspace merge cannot start, continue or be undone."""


class MergeInProgress(MergeError):
    """A merge was started and has not been continued or aborted yet."""

    def __init__(self, source: str) -> None:
        super().__init__(
            f"a merge of {source} is in progress: finish it with 'narrative merge --continue' "
            "or undo it with 'narrative merge --abort'"
        )
        self.source = source


class NoMergeInProgress(MergeError):
    """``--continue`` or ``--abort`` was asked for, but no merge is in progress."""

    def __init__(self) -> None:
        super().__init__("no merge is in progress")


class RunNotUsable(InvalidInput):
    """A run has no result to diff or merge, or it did not succeed and its result is only used
    when asked for (``--allow-failed``), or the result deletes most of its base (``--force``).

    Attributes:
        run_id: The run.
    """

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class ProtectedChange(InvalidInput):
    """A merge would change files that steer what the store and the gateway do (ignore files,
    ``proxyExecution.json``, ``narrative.toml``); refused unless forced.

    Attributes:
        paths: The protected paths the merge would change.
    """

    def __init__(self, paths: list[str]) -> None:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(
            f"the merge would change {shown} (ignore rules, gateway routing or config): "
            "check the change with 'narrative diff', then merge with --force"
        )
        self.paths = paths


def validation_problem(exc: Any, top: str = "", skip: int = 0, drop: tuple[str, ...] = ()) -> str:
    """``where: what`` of a pydantic ``ValidationError``'s first error, for a one-line message:
    the field's dotted location (its first ``skip`` parts and any in ``drop`` left out; ``top``
    when nothing is left) and pydantic's reason."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"][skip:] if p not in drop) or top
    return f"{where}: {first['msg']}"
