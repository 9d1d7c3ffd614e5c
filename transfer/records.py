"""Hierarchy records on the move: which to ship, how to encode them, how to merge them.

A bundle carries the records of the threads it exports (plus their objectives, their runs and
the threads they were forked from) as a small parentless commit under
:data:`BUNDLE_META_REF`, built in memory at export time: the exporting store is never written.
On import the records are validated with the model classes and merged into the local metadata:
new records are added, equal ones ignored, and a record that differs is only replaced when the
incoming one is further along (a finished run over a running one, a closed objective over an
open one); otherwise the local record is kept and the conflict reported.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from narrative.errors import NarrativeError
from narrative.hierarchy import list_objectives, list_runs, list_threads
from narrative.history import resolve_snapshot
from narrative.jsonio import parse_json
from narrative.models import AgentRun, Objective, Thread
from narrative.objects import (
    MODE_DIR,
    MODE_FILE,
    Commit,
    Signature,
    encode_commit,
    encode_tree,
    hash_object,
    parse_tree,
)
from narrative.store import Store

from .errors import InvalidArtifact

__all__ = [
    "BUNDLE_META_REF",
    "Records",
    "collect_records",
    "encode_records",
    "merge_records",
    "parse_records",
]

BUNDLE_META_REF = "refs/narrative/bundle/meta"
Records = dict[str, dict[str, dict[str, Any]]]
"""collection ("objectives", "threads", "runs") → id → record."""

_MODELS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "objectives": Objective.from_dict,
    "threads": Thread.from_dict,
    "runs": AgentRun.from_dict,
}
_MAX_RECORD = 1 << 20


def collect_records(store: Store, thread_ids: Iterable[str], *, fork_runs: bool = True) -> Records:
    """Records for ``thread_ids``, the threads they fork from, their objectives and runs;
    without ``fork_runs``, only the runs of ``thread_ids`` themselves (a runtime restoring a
    run's base needs none of the thousands of runs its user's main thread may hold)."""
    threads = {t.id: t for t in list_threads(store)}
    asked = {t for t in thread_ids if t in threads}
    wanted: set[str] = set()
    todo = sorted(asked)
    while todo:
        tid = todo.pop()
        if tid in wanted:
            continue
        wanted.add(tid)
        fork = threads[tid].forked_from
        if fork:
            # a fork point collected away by gc: the thread still travels without it
            with contextlib.suppress(NarrativeError):
                todo.append(resolve_snapshot(store, fork).thread)
    objectives = {threads[t].objective_id for t in wanted}
    return {
        "objectives": {o.id: o.to_dict() for o in list_objectives(store) if o.id in objectives},
        "threads": {t: threads[t].to_dict() for t in sorted(wanted)},
        "runs": {
            r.id: r.to_dict()
            for r in list_runs(store)
            if r.thread_id in (wanted if fork_runs else asked)
        },
    }


def encode_records(records: Records, when: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A commit holding ``records`` (as the metadata tree does); returns its id and every
    object (kind, content) needed to ship it, commit last."""
    objects: list[tuple[str, bytes]] = []
    root = []
    for kind in sorted(records):
        entries = []
        for ident, record in sorted(records[kind].items()):
            blob = json.dumps(record, sort_keys=True, indent=1).encode() + b"\n"
            objects.append(("blob", blob))
            entries.append((f"{ident}.json".encode(), MODE_FILE, hash_object("blob", blob)))
        if entries:
            tree = encode_tree(entries)
            objects.append(("tree", tree))
            root.append((kind.encode(), MODE_DIR, hash_object("tree", tree)))
    root_tree = encode_tree(root)
    objects.append(("tree", root_tree))
    sig = Signature("narrative", "narrative@localhost", when)
    commit = encode_commit(
        Commit(hash_object("tree", root_tree), (), sig, sig, "narrative records for transfer")
    )
    objects.append(("commit", commit))
    return hash_object("commit", commit), objects


def parse_records(read: Callable[[bytes], bytes | None], commit_tree: bytes) -> Records:
    """Decode and validate the records under a metadata root tree.

    ``read`` returns an object's content (None if unavailable). Every record must pass its
    model's validation and be filed under its own id; otherwise InvalidArtifact.
    """
    out: Records = {}
    root = read(commit_tree)
    if root is None:
        raise InvalidArtifact("bundle records are incomplete")
    for kind_name, mode, sub_oid in parse_tree(root):
        kind = kind_name.decode("utf-8", "replace")
        if kind not in _MODELS or mode != MODE_DIR:
            raise InvalidArtifact(f"unexpected entry {kind!r} in bundle records")
        sub = read(sub_oid)
        if sub is None:
            raise InvalidArtifact("bundle records are incomplete")
        for name, _mode, blob_oid in parse_tree(sub):
            data = read(blob_oid)
            if data is None or len(data) > _MAX_RECORD:
                raise InvalidArtifact(f"bundle record {name!r} is missing or too large")
            try:
                record = parse_json(data)
                model = _MODELS[kind](record)
            except (ValueError, NarrativeError) as exc:
                raise InvalidArtifact(f"invalid {kind} record {name!r}: {exc}") from None
            if name != f"{model.id}.json".encode():
                raise InvalidArtifact(f"{kind} record {name!r} is filed under the wrong id")
            out.setdefault(kind, {})[model.id] = record
    return out


_PROGRESS = {"running": 0, "succeeded": 1, "failed": 1, "cancelled": 1, "killed": 1}
_OBJECTIVE_PROGRESS = {"open": 0, "done": 1, "abandoned": 1}


def _further(kind: str, incoming: dict[str, Any], local: dict[str, Any]) -> bool:
    if kind == "runs":
        return _PROGRESS.get(incoming.get("status", ""), 0) > _PROGRESS.get(local["status"], 0)
    if kind == "objectives":
        rank = _OBJECTIVE_PROGRESS
        return rank.get(incoming.get("status", ""), 0) > rank.get(local["status"], 0)
    return False


def merge_records(store: Store, records: Records, source: str) -> tuple[int, list[str]]:
    """Merge incoming records into the store in one metadata commit.

    Returns (records added or advanced, descriptions of conflicts where the local one was kept).
    """
    conflicts: list[str] = []
    applied = 0
    changes: dict[tuple[str, str], Callable[[dict[str, Any] | None], dict[str, Any] | None]] = {}

    def decide(kind: str, ident: str, incoming: dict[str, Any]) -> Any:
        def change(local: dict[str, Any] | None) -> dict[str, Any] | None:
            nonlocal applied
            if local is None or (local != incoming and _further(kind, incoming, local)):
                applied += 1
                return incoming
            if local != incoming:
                conflicts.append(f"{kind[:-1]} {ident}: kept the local record")
            return local

        return change

    for kind, items in records.items():
        for ident, record in items.items():
            changes[(kind, ident)] = decide(kind, ident, record)
    if changes:
        store.meta.update_many(changes, f"import records from {source}")
    return applied, conflicts
