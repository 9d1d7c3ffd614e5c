"""Naming agent runs on the command line, the two snapshots that bound a run, and the guards
a run's result passes: on its way home (:func:`withhold_secrets`) and into the workspace
(:func:`check_merge`).

**Secrets stay out of results.** A run's result is screened once, where it is recorded (every
provider's result, collected directly or shipped by the runtime, goes through
:func:`withhold_secrets`): a file the result added or changed that the secret scanner
(:mod:`narrative.credentials`) finds credential-like by name or content, and a deletion of a
file named like a credential, is *withheld*. The run's thread then holds the result with those
paths as its base had them (so a merge leaves the user's copy alone: withheld counts as skipped,
never as deleted), listed in the snapshot's ``skipped`` entries with ``kind: secret``. The raw
result stays in this store only, under ``refs/narrative/withheld/<run>``, which no export, push
or bundle carries; ``merge``/``diff`` with ``include_secrets`` use it.

A result never reaches a thread unscreened: whoever brings it in (an import of the runtime's
bundle, a provider collecting the environment) stages it under :func:`incoming_ref`, and
:func:`withhold_secrets` moves the run's thread forward to what passed the screening. A crash
in between leaves the result staged, on no thread, so nothing exports or pushes it; and the
thread head only ever moves to a descendant.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from .commitmsg import encode_message, snapshot_from_commit
from .credentials import credential_name_problem, secret_content_problem
from .errors import AmbiguousId, ProtectedChange, RunNotFound, RunNotUsable
from .hierarchy import get_run, list_runs
from .history import read_commit, resolve_snapshot, snapshot_at
from .ids import is_id, new_id
from .merge import Entry, edit_tree, tree_changes
from .models import AgentRun, Snapshot
from .objects import MODE_EXEC, MODE_FILE, Commit, encode_commit
from .odb import PackWriter

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "PROTECTED_NAMES",
    "WITHHELD_REF_PREFIX",
    "INCOMING_REF_PREFIX",
    "check_deletions",
    "check_merge",
    "incoming_ref",
    "is_protected",
    "is_run_ref",
    "resolve_run",
    "run_snapshots",
    "withheld_files",
    "withhold_secrets",
]

#: Where a run's unscreened result is kept (local to this store; see the module docstring).
WITHHELD_REF_PREFIX: Final = "refs/narrative/withheld/"
#: Where a run's result waits to be screened (see the module docstring).
INCOMING_REF_PREFIX: Final = "refs/narrative/incoming/"
#: File names (any directory, compared lower-cased) whose change a merge applies only with
#: ``force``: they decide what later snapshots ignore, and how the gateway routes calls.
PROTECTED_NAMES: Final = frozenset(
    {".gitignore", ".narrativeignore", "proxyexecution.json", "narrative.toml"}
)
_SECRET: Final = "secret"


def incoming_ref(run_id: str) -> str:
    """The ref a run's result is staged under until :func:`withhold_secrets` records it."""
    return INCOMING_REF_PREFIX + run_id


def is_run_ref(ref: str) -> bool:
    """Whether an argument names a run (run ids and their prefixes start with ``run-``)."""
    return ref.strip().startswith("run-")


def resolve_run(store: Store, ref: str) -> AgentRun:
    """A run by id or unique id prefix."""
    ref = ref.strip()
    if is_id(ref, "run"):
        return get_run(store, ref)
    matches = [r for r in list_runs(store) if r.id.startswith(ref)] if is_run_ref(ref) else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(ref)
    raise AmbiguousId(ref, [r.id for r in matches])


def run_snapshots(
    store: Store, run: AgentRun, *, allow_failed: bool = False, include_secrets: bool = False
) -> tuple[Snapshot | None, Snapshot]:
    """(base, result) snapshots of a run.

    A run that did not succeed (failed, cancelled, killed, or still going) has no usable
    result unless ``allow_failed``: its result may be partial, or the state of an environment
    that never received the input, and merging it would delete the user's files.
    ``include_secrets``: the result as the run left it, with the files
    :func:`withhold_secrets` withheld.

    Raises:
        RunNotUsable: no result, or a result of a run that did not succeed.
    """
    if run.result_snapshot is None:
        raise RunNotUsable(
            run.id, f"run {run.id} has no result snapshot yet (status: {run.status})"
        )
    if run.status != "succeeded" and not allow_failed:
        code = f", exit {run.exit_code}" if run.exit_code is not None else ""
        raise RunNotUsable(
            run.id,
            f"run {run.id} did not succeed ({run.status}{code}): its result is only used with "
            "--allow-failed",
        )
    base = resolve_snapshot(store, run.base_snapshot) if run.base_snapshot else None
    raw = store.refs.read(WITHHELD_REF_PREFIX + run.id) if include_secrets else None
    if raw is not None:
        return base, snapshot_at(store, raw)
    return base, resolve_snapshot(store, run.result_snapshot)


def withheld_files(snapshot: Snapshot) -> list[dict[str, Any]]:
    """The files :func:`withhold_secrets` withheld from ``snapshot`` (path and reason)."""
    return [
        {"path": s.get("path"), "reason": s.get("reason")}
        for s in snapshot.skipped
        if s.get("kind") == _SECRET
    ]


def withhold_secrets(
    store: Store, run_id: str, result_id: str | None, known: Iterable[bytes] = ()
) -> str | None:
    """Screen run ``run_id``'s result ``result_id`` for secrets and record what passes on the
    run's thread; returns the snapshot to record as the run's result.

    The result is the one staged under :func:`incoming_ref` (or, when the environment held
    nothing new, an existing snapshot such as the base, recorded as it is). Only paths it
    changed from the run's base are read. When something is withheld (see the module
    docstring), a new snapshot takes its place: the base's commit as its parent (so no commit
    the agent made reaches a thread), the withheld paths as the base had them. The run's
    thread then moves forward to it, and the staged ref goes. ``known``: exact secrets to look
    for (the run's tokens, the gateway key, each in the forms
    :func:`narrative.credentials.secret_forms` gives).

    Raises:
        ConcurrentUpdate: the run's thread moved meanwhile (the result stays staged, and is
            not recorded).
        NonFastForward: the result does not descend from the run's thread head.
    """
    if result_id is None:
        return None
    run = get_run(store, run_id)
    staged_ref = incoming_ref(run.id)
    staged = store.refs.read(staged_ref)
    result = snapshot_at(store, staged) if staged is not None else None
    if result is None or result.id != result_id:
        result = resolve_snapshot(store, result_id)
    base = resolve_snapshot(store, run.base_snapshot) if run.base_snapshot else None
    secrets = [k for k in known if k]
    edits: dict[str, Entry | None] = {}
    withheld: list[dict[str, Any]] = []
    size_change = 0
    changes = tree_changes(
        store.odb, bytes.fromhex(base.tree) if base else None, bytes.fromhex(result.tree)
    )
    for path, (old, new) in sorted(changes.items()):
        reason = credential_name_problem(path)
        if new is None:
            reason = reason and "it deletes a file named like a credential"
        elif reason is None and new[0] in (MODE_FILE, MODE_EXEC):
            data = store.odb.read(new[1])[1]
            reason = secret_content_problem(data, secrets)
        if reason is None:
            continue
        edits[path] = old
        withheld.append({"path": path, "reason": reason, "kind": _SECRET})
        size_change += _blob_size(store, old) - _blob_size(store, new)
    raw = bytes.fromhex(result.commit)
    if not withheld:
        return _record_result(store, run, result, raw, staged)
    parents = (bytes.fromhex(base.commit),) if base else read_commit(store, raw).parents
    stats = dict(result.stats)
    stats["files"] = stats.get("files", 0) + sum(
        (old is not None) - (changes[p][1] is not None) for p, old in edits.items()
    )
    stats["bytes"] = max(0, stats.get("bytes", 0) + size_change)
    stats["skipped"] = len(result.skipped) + len(withheld)
    body = result.message.strip() + f" ({len(withheld)} secret-looking file(s) withheld)"
    snapshot_id = new_id("snapshot")
    message = encode_message(
        body, snapshot_id, run.thread_id, run.id, stats, [*result.skipped, *withheld]
    )
    template = read_commit(store, raw)
    with store.lock("gc", shared=True):
        writer = PackWriter(store.odb)
        try:
            tree = edit_tree(store.odb, writer, bytes.fromhex(result.tree), edits)
            commit = Commit(tree, parents, template.author, template.committer, message)
            oid = writer.add_raw("commit", encode_commit(commit))
            writer.publish()
        except BaseException:
            writer.abort()
            raise
        # the raw result is named first, so that a crash before the thread moves loses nothing
        store.refs.update(WITHHELD_REF_PREFIX + run.id, raw)
        screened = snapshot_from_commit(oid, commit, base.id if base else None)
        return _record_result(store, run, screened, oid, staged)


def _record_result(
    store: Store, run: AgentRun, result: Snapshot, oid: bytes, staged: bytes | None
) -> str:
    """Move the run's thread forward to ``oid`` (a result of that thread), then drop the
    staged ref ``staged`` named; the result's id."""
    if result.thread == run.thread_id:
        ref = store.thread_ref(run.thread_id)
        head = store.refs.read(ref)
        if head != oid:
            store.refs.update(ref, oid, expected=head, reason=f"result of run {run.id}")
    if staged is not None:
        store.refs.update(incoming_ref(run.id), None, expected=staged)
    return result.id


def _blob_size(store: Store, entry: Entry | None) -> int:
    return 0 if entry is None else len(store.odb.read(entry[1])[1])


def is_protected(path: str) -> bool:
    """Whether a merge changes ``path`` only with ``force`` (:data:`PROTECTED_NAMES`)."""
    return path.rsplit("/", 1)[-1].lower() in PROTECTED_NAMES


def check_merge(
    store: Store,
    base: Snapshot | None,
    theirs: Snapshot,
    ours: bytes | None,
    *,
    force: bool,
    deletions: bool,
) -> None:
    """Refuse, unless ``force``, a merge of ``theirs`` that looks like an accident or an
    attack rather than work: one that changes a protected file (:func:`is_protected`; only
    where ``theirs`` differs from both its ``base`` and the tree ``ours``), and with
    ``deletions`` (a failed run's result) one that deletes most of its base.

    Raises:
        ProtectedChange: protected files would change.
        RunNotUsable: the result deletes more than half of its base's files.
    """
    if force:
        return
    if deletions:
        check_deletions(store, base, theirs, force)
    theirs_tree = bytes.fromhex(theirs.tree)
    changed = tree_changes(store.odb, bytes.fromhex(base.tree) if base else None, theirs_tree)
    protected = [p for p in changed if is_protected(p)]
    if protected and ours is not None:
        differs = tree_changes(store.odb, ours, theirs_tree)
        protected = [p for p in protected if p in differs]
    if protected:
        raise ProtectedChange(sorted(protected))


def check_deletions(store: Store, base: Snapshot | None, result: Snapshot, force: bool) -> None:
    """Refuse a result that deletes more than half of its base's files, unless ``force``:
    what an agent that wiped its checkout (or never received it) would look like."""
    if force or base is None:
        return
    from .trees import flatten_tree

    before = flatten_tree(store.odb, bytes.fromhex(base.tree))
    after = flatten_tree(store.odb, bytes.fromhex(result.tree))
    deleted = sum(1 for path in before if path not in after)
    if before and deleted * 2 > len(before):
        raise RunNotUsable(
            result.run or result.id,
            f"the result deletes {deleted} of the {len(before)} files of its base; "
            "merge it with --force if that is what you want",
        )
