"""Screening a run's result on its way home (:func:`withhold_secrets`).

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
from typing import TYPE_CHECKING, Any

from .commitmsg import encode_message, snapshot_from_commit
from .commits import read_commit, snapshot_at, snapshot_by_id
from .credentials import credential_name_problem, secret_content_problem
from .hierarchy import get_run
from .ids import new_id
from .merge import Entry, edit_tree, tree_changes
from .models import AgentRun, Snapshot
from .objects import MODE_EXEC, MODE_FILE, Commit, encode_commit
from .odb import PackWriter
from .runs import SECRET_KIND, WITHHELD_REF_PREFIX, incoming_ref

if TYPE_CHECKING:
    from .store import Store

__all__ = ["withhold_secrets"]


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
        result = snapshot_by_id(store, result_id)
    base = snapshot_by_id(store, run.base_snapshot) if run.base_snapshot else None
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
        withheld.append({"path": path, "reason": reason, "kind": SECRET_KIND})
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
