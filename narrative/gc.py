"""Retention and packing: drop old snapshots by policy, then repack what is still reachable.

Policy (per thread): keep the newest ``keep_last``, keep those younger than ``keep_within``;
always keep the head, every snapshot an agent run points to and every fork point of another
thread. Dropping snapshots from the middle of a thread rewrites the kept ones on top of each
other; their snapshot ids (carried in trailers) never change, only their commits. History that
another machine may hold (pushed, exported, shipped: :mod:`narrative.shared`) is never
rewritten, so the same snapshot keeps the same commit everywhere.

Safety: gc holds the store's ``gc`` lock exclusively while every snapshot and metadata writer
holds it shared, so no writer can be reusing an object gc is about to delete. Thread refs move
by compare-and-swap; a thread that moved meanwhile is left alone and reported. The new pack is
published before any old pack or loose object is removed.

Head logs: every commit a thread's head log names (each head the thread ever had, see
:mod:`narrative.refs`) stays reachable, so a head left behind by a forced reset or by gc's own
rewrite survives; log entries older than the retention (``keep_within``, else
:data:`HEAD_LOG_RETENTION`) are expired first and then protect nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field

from .commits import read_commit, thread_snapshots
from .errors import ConcurrentUpdate, InvalidInput
from .fsutil import unlink_quiet
from .hierarchy import list_runs, list_threads
from .models import Snapshot
from .objects import MODE_DIR, Commit, encode_commit, parse_commit, parse_tree
from .odb import PackWriter
from .repack import copy_objects
from .shared import shared_commits
from .statcache import StatCache, is_delta_file
from .store import Store

__all__ = [
    "HEAD_LOG_RETENTION",
    "GcReport",
    "RetentionPolicy",
    "collect_garbage",
    "parse_duration",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TMP_MAX_AGE = 3600.0
#: How long head log entries keep old heads when the policy has no ``keep_within`` (git's
#: default reflog expiry).
HEAD_LOG_RETENTION = 90 * 86400.0


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise InvalidInput(f"invalid duration {text!r} (examples: 30m, 12h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which snapshots survive; with neither limit set, every snapshot does."""

    keep_last: int | None = None
    keep_within: float | None = None


@dataclass
class GcReport:
    """What gc did (or would do, for a dry run)."""

    dropped: list[str] = field(default_factory=list)
    kept: int = 0
    rewritten_threads: list[str] = field(default_factory=list)
    moved_threads: list[str] = field(default_factory=list)
    packs_before: int = 0
    packs_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def _store_bytes(store: Store) -> int:
    total = 0
    for root, _dirs, files in os.walk(store.odb.objects_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _iso_age(created_at: str, now: float) -> float:
    import datetime as dt

    stamp = dt.datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return now - stamp.timestamp()


def collect_garbage(store: Store, policy: RetentionPolicy, dry_run: bool = False) -> GcReport:
    """Apply ``policy`` and repack the store."""
    report = GcReport(packs_before=store.odb.pack_count(), bytes_before=_store_bytes(store))
    with store.lock("gc"):
        heads = store.thread_heads()
        protected = {t.forked_from for t in list_threads(store) if t.forked_from}
        for r in list_runs(store):
            protected |= {s for s in (r.base_snapshot, r.result_snapshot) if s}
        shared = shared_commits(store)
        now = time.time()
        plans: dict[str, tuple[list[Snapshot], bytes | None]] = {}
        for thread_id, head in heads.items():
            snaps = list(thread_snapshots(store, thread_id, head))
            # Only what no other machine holds may be rewritten: the newest shared snapshot
            # and everything below it stay exactly as they are (same commits).
            frozen = next(
                (i for i, s in enumerate(snaps) if bytes.fromhex(s.commit) in shared), len(snaps)
            )
            open_part = snaps[:frozen]
            kept = [s for i, s in enumerate(open_part) if _keep(i, s, policy, protected, now)]
            report.kept += len(kept) + len(snaps) - frozen
            dropped = [s.id for s in open_part if s not in kept]
            if dropped:
                report.dropped += dropped
                root_parent = (
                    snaps[frozen].commit if frozen < len(snaps) else snaps[-1].parent_commit
                )
                plans[thread_id] = (kept[::-1], bytes.fromhex(root_parent) if root_parent else None)
        if dry_run:
            report.packs_after, report.bytes_after = report.packs_before, report.bytes_before
            return report
        _rewrite(store, heads, plans, report)
        retention = policy.keep_within if policy.keep_within is not None else HEAD_LOG_RETENTION
        for ref in store.refs.logged_refs():
            store.refs.expire_head_log(ref, now - retention)
        _repack(store)
        _clean_tmp(store)
    report.packs_after = store.odb.pack_count()
    report.bytes_after = _store_bytes(store)
    return report


def _keep(
    index: int, snap: Snapshot, policy: RetentionPolicy, protected: set[str], now: float
) -> bool:
    if policy.keep_last is None and policy.keep_within is None:
        return True
    return (
        index == 0
        or snap.id in protected
        or (policy.keep_last is not None and index < policy.keep_last)
        or (policy.keep_within is not None and _iso_age(snap.created_at, now) < policy.keep_within)
    )


def _rewrite(
    store: Store,
    heads: dict[str, bytes],
    plans: dict[str, tuple[list[Snapshot], bytes | None]],
    report: GcReport,
) -> None:
    """Re-chain the kept snapshots of each planned thread, fork parents first."""
    mapping: dict[bytes, bytes] = {}
    pending = dict(plans)
    while pending:
        progressed = False
        for thread_id, (kept, fork) in list(pending.items()):
            if fork is not None and _commit_thread(store, fork) in pending:
                continue  # its fork point is on a thread not rewritten yet
            parent = mapping.get(fork, fork) if fork else None
            for snap in kept:
                old_oid = bytes.fromhex(snap.commit)
                c = read_commit(store, old_oid)
                if c.parents == ((parent,) if parent else ()):
                    new_oid = old_oid
                else:
                    new = Commit(
                        c.tree, (parent,) if parent else (), c.author, c.committer, c.message
                    )
                    new_oid = store.odb.write_loose("commit", encode_commit(new))
                mapping[old_oid] = new_oid
                parent = new_oid
            try:
                # the one history rewrite allowed; the head log keeps the old head named
                store.refs.update(
                    store.thread_ref(thread_id),
                    parent,
                    expected=heads[thread_id],
                    force=True,
                    reason="gc: history rewritten",
                )
                report.rewritten_threads.append(thread_id)
            except ConcurrentUpdate:
                report.moved_threads.append(thread_id)
            del pending[thread_id]
            progressed = True
        if not progressed:  # pragma: no cover - fork cycles cannot be built
            break


def _commit_thread(store: Store, oid: bytes) -> str | None:
    from .commitmsg import is_snapshot_commit, snapshot_from_commit

    c = read_commit(store, oid)
    return snapshot_from_commit(oid, c, None).thread if is_snapshot_commit(c) else None


def _reachable(store: Store) -> set[bytes]:
    """Every object reachable from any ref of the store or any entry of a head log."""
    seen: set[bytes] = set()
    commits = list(store.refs.list("refs/").values())
    for ref in store.refs.logged_refs():
        for entry in store.refs.head_log(ref):
            commits += [oid for oid in (entry.old, entry.new) if oid is not None]
    trees: list[bytes] = []
    while commits:
        oid = commits.pop()
        if oid in seen:
            continue
        seen.add(oid)
        kind, data = store.odb.read(oid)
        if kind != "commit":
            continue
        c = parse_commit(data)
        trees.append(c.tree)
        commits.extend(c.parents)
    while trees:
        oid = trees.pop()
        if oid in seen:
            continue
        seen.add(oid)
        for _name, mode, child in parse_tree(store.odb.read(oid)[1]):
            if mode == MODE_DIR:
                trees.append(child)
            elif mode != 0o160000:
                seen.add(child)
    return seen


def _repack(store: Store) -> None:
    odb = store.odb
    odb.invalidate()
    old_packs = [p for p in os.listdir(odb.pack_dir) if p.startswith("pack-")]
    loose = [
        os.path.join(odb.objects_dir, d, f)
        for d in os.listdir(odb.objects_dir)
        if len(d) == 2
        for f in os.listdir(os.path.join(odb.objects_dir, d))
    ]
    keep = _reachable(store)
    writer = PackWriter(odb)
    try:
        copy_objects(odb, sorted(keep), writer)
        new_name = writer.publish()
    except BaseException:
        writer.abort()
        raise
    for name in old_packs:
        if new_name and name.startswith(new_name + "."):
            continue
        unlink_quiet(os.path.join(odb.pack_dir, name))
    for path in loose:
        unlink_quiet(path)
    for d in os.listdir(odb.objects_dir):
        if len(d) == 2:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(odb.objects_dir, d))
    odb.invalidate()
    _prune_caches(store, keep)


def _prune_caches(store: Store, keep: set[bytes]) -> None:
    """Drop stat-cache entries whose objects are gone, so no snapshot reuses a missing id."""
    cache_dir = os.path.join(store.git_dir, "narrative", "cache")
    if not os.path.isdir(cache_dir):
        return
    for name in os.listdir(cache_dir):
        if not name.startswith("stat-") or is_delta_file(name):
            continue  # (a delta is read, and removed, with its base)
        path = os.path.join(cache_dir, name)
        cache = StatCache.load(path, store.config.max_file_size)
        if not cache.oids() <= keep or (cache.head and cache.head[0] not in keep):
            StatCache.remove(path)


def _clean_tmp(store: Store) -> None:
    """Remove temp files left by killed writers."""
    now = time.time()
    tmp = store.odb.tmp_dir
    if not os.path.isdir(tmp):
        return
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        try:
            if now - os.lstat(path).st_mtime > _TMP_MAX_AGE:
                os.unlink(path)
        except OSError:
            continue
