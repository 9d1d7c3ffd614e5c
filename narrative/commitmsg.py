"""How snapshot metadata is carried in commit messages (git trailers).

A snapshot commit's message is the user's message followed by one trailer paragraph::

    fix the parser

    Narrative-Snapshot: snap-01jd...
    Narrative-Thread: th-01jd...
    Narrative-Run: run-01jd...                       (only for snapshots taken by a run)
    Narrative-Stats: {"files": 50000, "bytes": 1048576000, "hashed": 1}
    Narrative-Skipped: {"path": "big.iso", "size": 734003200, "reason": "too-large"}
    Narrative-Merged-From: snap-01jd...              (only on merge results)

Trailers travel inside the commit, so bundles carry them and ids are identical on every machine.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import StoreCorrupted
from .ids import is_id
from .jsonio import parse_json
from .models import Snapshot, iso_from_timestamp
from .objects import Commit

__all__ = [
    "encode_message",
    "is_snapshot_commit",
    "merged_from",
    "snapshot_from_commit",
    "snapshot_names",
]

_PREFIX = "Narrative-"


def encode_message(
    message: str,
    snapshot_id: str,
    thread_id: str,
    run_id: str | None,
    stats: dict[str, int],
    skipped: list[dict[str, Any]],
    extra: dict[str, str] | None = None,
) -> str:
    """The full commit message for a new snapshot; ``extra`` adds ``Narrative-<key>`` trailers
    (e.g. ``Merged-From`` on a merge), which readers that do not know them ignore."""
    body = message.strip() or "snapshot"
    trailers = [f"Narrative-Snapshot: {snapshot_id}", f"Narrative-Thread: {thread_id}"]
    if run_id:
        trailers.append(f"Narrative-Run: {run_id}")
    trailers.append("Narrative-Stats: " + json.dumps(stats, sort_keys=True, separators=(",", ":")))
    trailers += [
        "Narrative-Skipped: " + json.dumps(s, sort_keys=True, separators=(",", ":"))
        for s in skipped
    ]
    trailers += [f"Narrative-{key}: {value}" for key, value in (extra or {}).items()]
    return body + "\n\n" + "\n".join(trailers) + "\n"


def _trailers(message: str) -> tuple[str, dict[str, list[str]]]:
    body, sep, last = message.rstrip("\n").rpartition("\n\n")
    if not sep:
        return message, {}
    found: dict[str, list[str]] = {}
    for line in last.split("\n"):
        key, colon, value = line.partition(": ")
        if not colon or not key.startswith(_PREFIX):
            return message, {}
        found.setdefault(key[len(_PREFIX) :], []).append(value)
    return body, found


def is_snapshot_commit(commit: Commit) -> bool:
    """Whether a commit carries snapshot trailers."""
    return "Snapshot" in _trailers(commit.message)[1]


def snapshot_names(message: str) -> tuple[str, str] | None:
    """``(snapshot id, thread id)`` named by a commit message's trailers, or None for a commit
    that is not a snapshot; nothing else is decoded (history walks read thousands)."""
    trailers = _trailers(message)[1]
    snapshot, thread = trailers.get("Snapshot"), trailers.get("Thread")
    if not snapshot:
        return None
    return snapshot[0], thread[0] if thread else ""


def merged_from(commit: Commit) -> list[str]:
    """Snapshot ids named by ``Narrative-Merged-From`` trailers (merge results only)."""
    return _trailers(commit.message)[1].get("Merged-From", [])


def snapshot_from_commit(
    commit_oid: bytes, commit: Commit, parent_snapshot: str | None
) -> Snapshot:
    """Decode a snapshot commit; StoreCorrupted if its trailers are malformed."""
    body, trailers = _trailers(commit.message)
    try:
        snap_id = trailers["Snapshot"][0]
        thread = trailers["Thread"][0]
        run = trailers.get("Run", [None])[0]
        stats = parse_json(trailers.get("Stats", ["{}"])[0])
        skipped = [parse_json(s) for s in trailers.get("Skipped", [])]
    except (KeyError, IndexError, ValueError) as exc:
        raise StoreCorrupted(f"commit {commit_oid.hex()} is not a valid snapshot") from exc
    if not (is_id(snap_id, "snapshot") and is_id(thread, "thread")):
        raise StoreCorrupted(f"commit {commit_oid.hex()} has malformed snapshot trailers")
    if run is not None and not is_id(run, "run"):
        raise StoreCorrupted(f"commit {commit_oid.hex()} has a malformed run id")
    if not isinstance(stats, dict) or not all(isinstance(s, dict) for s in skipped):
        raise StoreCorrupted(f"commit {commit_oid.hex()} has malformed snapshot metadata")
    return Snapshot(
        id=snap_id,
        commit=commit_oid.hex(),
        tree=commit.tree.hex(),
        thread=thread,
        run=run,
        parent=parent_snapshot,
        message=body.strip(),
        created_at=iso_from_timestamp(commit.committer.time),
        stats=stats,
        skipped=skipped,
        parent_commit=commit.parents[0].hex() if commit.parents else None,
    )
