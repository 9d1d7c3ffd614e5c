"""Remotes: an fsspec directory of bundles plus an index, shared by many stores.

Layout at the remote URL::

    index.json (+ .sha256)        {"version": 1, "heads": {thread ref: commit},
                                   "bundles": [{"name", "sha256", "refs", "prerequisites"}]}
    bundles/<random>.bundle (+ .sha256)

``push`` sends one incremental bundle holding only what the remote lacks (prerequisites are the
remote's current heads), then swaps the index by compare-and-swap; if another machine pushed
in between, it re-reads the index and retries — re-exporting when its prerequisites moved — so
concurrent pushes lose nothing. A thread that moved on both sides is refused (pull first), as
git refuses a non-fast-forward. ``fetch`` imports the bundles whose objects are missing here and
records the remote's heads under ``refs/narrative/remotes/<name>/``; ``pull`` also
fast-forwards the local threads.

Remote definitions (name → URL, storage options) live in the store's ``narrative/remotes.json``
(local configuration, never shipped). Keep credentials in ``NARRATIVE_STORAGE_*`` variables
rather than in that file.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from narrative.errors import InvalidInput, NotFound
from narrative.fsutil import write_atomic
from narrative.jsonio import load_json, parse_json
from narrative.store import THREAD_REF_PREFIX, Store

from . import fsio, publishing, storage_options, verified
from .bundle import write_bundle
from .errors import ArtifactNotFound, InvalidArtifact, TransferError
from .exporter import selected_threads
from .importer import import_stream
from .pending import merge_pending, pending_merges, save_pending
from .records import BUNDLE_META_REF, collect_records, encode_records
from .thread_updates import ImportResult, fast_forward, is_ancestor

__all__ = [
    "PullResult",
    "PushResult",
    "Remote",
    "RemoteNotFound",
    "add_remote",
    "fetch",
    "get_remote",
    "list_remotes",
    "merge_pending",
    "pending_merges",
    "pull",
    "push",
    "remove_remote",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_ATTEMPTS = 20
_INDEX = "index.json"


class RemoteNotFound(ArtifactNotFound):
    """Nothing exists at a remote's URL (no such directory, bucket or prefix).

    Attributes:
        name: The remote's name.
        url: Its URL.
    """

    def __init__(self, name: str, url: str) -> None:
        super().__init__(
            url, f"remote {name}: nothing at {url} (no such directory or bucket; check the URL)"
        )
        self.name = name


class PushRejected(TransferError):
    """The remote has moved on a thread in a way a fast-forward cannot follow."""


@dataclass
class Remote:
    """A named remote: where it is and how to reach it."""

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)


def _config_path(store: Store) -> str:
    return os.path.join(store.git_dir, "narrative", "remotes.json")


def list_remotes(store: Store) -> list[Remote]:
    try:
        with open(_config_path(store), "rb") as f:
            data = load_json(f)
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise InvalidInput(f"unreadable remotes configuration: {exc}") from None
    return [Remote(n, r["url"], r.get("storage_options", {})) for n, r in sorted(data.items())]


def _save(store: Store, remotes: list[Remote]) -> None:
    data = {r.name: {"url": r.url, "storage_options": r.storage_options} for r in remotes}
    write_atomic(_config_path(store), json.dumps(data, indent=2).encode() + b"\n")


def add_remote(
    store: Store, name: str, url: str, storage_options: dict[str, Any] | None = None
) -> Remote:
    if not _NAME_RE.match(name):
        raise InvalidInput(f"invalid remote name {name!r}: letters, digits, '.', '_', '-'")
    remotes = list_remotes(store)
    if any(r.name == name for r in remotes):
        raise InvalidInput(f"remote {name!r} already exists")
    fsio.resolve(url, storage_options)  # refuse unknown protocols now, not at the first push
    remote = Remote(name, url.rstrip("/"), storage_options or {})
    _save(store, [*remotes, remote])
    return remote


def get_remote(store: Store, name: str) -> Remote:
    for remote in list_remotes(store):
        if remote.name == name:
            return remote
    raise NotFound(f"remote {name}")


def remove_remote(store: Store, name: str) -> None:
    remotes = list_remotes(store)
    if not any(r.name == name for r in remotes):
        raise NotFound(f"remote {name}")
    _save(store, [r for r in remotes if r.name != name])
    prefix = f"refs/narrative/remotes/{name}/"
    for ref, oid in store.refs.list(prefix).items():
        store.refs.update(ref, None, expected=oid)


def _options(remote: Remote, extra: dict[str, Any] | None) -> dict[str, Any]:
    return storage_options.merge_storage_options(remote.storage_options, extra or {})


def _read_index(
    remote: Remote, options: dict[str, Any], *, must_exist: bool = False
) -> tuple[dict[str, Any], str | None]:
    """The remote's index and its digest (None when it has none yet). With ``must_exist``
    (reading from the remote), a remote URL where nothing is at all is an error, not an empty
    remote: a typo in a path or bucket name must never read as "nothing new"."""
    url = posixpath.join(remote.url, _INDEX)
    try:
        raw = verified.read_small(url, options, limit=64 << 20)
    except ArtifactNotFound:
        if must_exist and not verified.location_exists(remote.url, options):
            raise RemoteNotFound(remote.name, remote.url) from None
        return {"version": 1, "heads": {}, "bundles": []}, None
    try:
        index = parse_json(raw)
        if index.get("version") != 1 or not isinstance(index.get("heads"), dict):
            raise ValueError("unknown layout")
        if not isinstance(index.get("bundles"), list):
            raise ValueError("no bundle list")
        for ref, oid in index["heads"].items():
            if not ref.startswith(THREAD_REF_PREFIX) or len(bytes.fromhex(oid)) != 20:
                raise ValueError(f"bad head {ref}")
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidArtifact(f"remote index {url} is invalid: {exc}") from None
    return index, hashlib.sha256(raw).hexdigest()


@dataclass
class PushResult:
    """What a push sent."""

    remote: str
    pushed: dict[str, str] = field(default_factory=dict)
    up_to_date: list[str] = field(default_factory=list)
    bundle: str | None = None
    size: int = 0
    attempts: int = 0


def push(
    store: Store,
    name: str,
    threads: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PushResult:
    """Send the selected threads (default: all) to remote ``name``."""
    remote = get_remote(store, name)
    options = _options(remote, storage_options)
    thread_ids = selected_threads(store, threads, None)
    heads = store.thread_heads()
    result = PushResult(name)
    bundle_url: str | None = None
    bundle_for: dict[str, str] | None = None
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        result.attempts = attempt
        index, digest = _read_index(remote, options)
        remote_heads = {k: bytes.fromhex(v) for k, v in index["heads"].items()}
        refs: dict[str, bytes] = {}
        prerequisites: dict[bytes, str] = {}
        result.up_to_date = []
        for tid in thread_ids:
            ref = store.thread_ref(tid)
            local = heads.get(tid)
            theirs = remote_heads.get(ref)
            if local is None or local == theirs:
                result.up_to_date.append(tid)
                continue
            if theirs is not None:
                if store.odb.exists(theirs) and is_ancestor(store, local, theirs):
                    result.up_to_date.append(tid)  # the remote is ahead: nothing to send
                    continue
                if not store.odb.exists(theirs) or not is_ancestor(store, theirs, local):
                    raise PushRejected(f"thread {tid} has moved on remote {name}: pull it first")
                prerequisites[theirs] = f"{name} {tid}"
            refs[ref] = local
        if not refs:
            if bundle_url:
                publishing.remove(bundle_url, options, missing_ok=True)
            return result
        wanted = {k: v.hex() for k, v in refs.items()}
        if bundle_for != {**wanted, **{p.hex(): "" for p in prerequisites}}:
            if bundle_url:
                publishing.remove(bundle_url, options, missing_ok=True)
            bundle_url = posixpath.join(remote.url, "bundles", f"{secrets.token_hex(12)}.bundle")
            meta_commit, meta_objects = encode_records(collect_records(store, thread_ids), 0)
            with publishing.publish(bundle_url, options) as out:
                write_bundle(
                    store.odb,
                    out,
                    {**refs, BUNDLE_META_REF: meta_commit},
                    prerequisites,
                    extra=meta_objects,
                )
            result.size, sha = out.size, out.sha256
            bundle_for = {**wanted, **{p.hex(): "" for p in prerequisites}}
        assert bundle_url is not None
        entry: dict[str, Any] = {
            "name": posixpath.basename(bundle_url),
            "sha256": sha,
            "refs": wanted,
            "prerequisites": [p.hex() for p in prerequisites],
        }
        new_heads: dict[str, str] = {**index["heads"], **wanted}
        new_index = {
            "version": 1,
            "heads": new_heads,
            "bundles": [*index["bundles"], entry],
        }
        data = json.dumps(new_index, indent=1, sort_keys=True).encode()
        if publishing.compare_and_swap_small(
            posixpath.join(remote.url, _INDEX), digest, data, options
        ):
            result.pushed = {k[len(THREAD_REF_PREFIX) :]: v for k, v in wanted.items()}
            result.bundle = str(entry["name"])
            _track(store, name, {k: bytes.fromhex(v) for k, v in new_heads.items()})
            return result
    raise TransferError(f"could not update remote {name}: too many concurrent pushes")


def _track(store: Store, name: str, heads: dict[str, bytes]) -> None:
    """Record the remote's heads as remote-tracking refs (only for objects we hold)."""
    for ref, oid in heads.items():
        if store.odb.exists(oid):
            tracking = f"refs/narrative/remotes/{name}/{ref[len('refs/narrative/') :]}"
            store.refs.update(tracking, oid)


def fetch(
    store: Store,
    name: str,
    *,
    move_threads: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[ImportResult]:
    """Import every bundle of remote ``name`` whose objects this store lacks.

    With ``move_threads`` (``pull``) local threads are fast-forwarded; otherwise only the
    remote-tracking refs move.
    """
    remote = get_remote(store, name)
    options = _options(remote, storage_options)
    index, _digest = _read_index(remote, options, must_exist=True)
    results = []
    for entry in index["bundles"]:
        refs = entry.get("refs", {})
        if refs and all(store.odb.exists(bytes.fromhex(oid)) for oid in refs.values()):
            continue
        url = posixpath.join(remote.url, "bundles", str(entry["name"]))
        with verified.open_verified(url, options) as stream:
            results.append(import_stream(store, stream, url, name, move_threads=move_threads))
    store.odb.invalidate()
    _track(store, name, {k: bytes.fromhex(v) for k, v in index["heads"].items()})
    if move_threads:
        # threads whose objects were already here (no bundle imported for them) still move
        done = {t for r in results for t in (*r.updated, *r.unchanged, *r.diverged)}
        rest = ImportResult(remote.url, "bundle", name)
        for ref, oid in index["heads"].items():
            thread_id = ref[len(THREAD_REF_PREFIX) :]
            if thread_id not in done:
                fast_forward(store, thread_id, bytes.fromhex(oid), name, rest)
        if rest.updated or rest.unchanged or rest.diverged:
            results.append(rest)
    return results


@dataclass
class PullResult:
    """What a pull did: the imports, the merge into the workspace (if the workspace's thread
    had moved on both sides), and the diverged threads left pending."""

    imports: list[ImportResult]
    merge: Any = None
    pending: list[str] = field(default_factory=list)
    updated_workspace: bool = False


def pull(
    store: Store,
    name: str,
    *,
    storage_options: dict[str, Any] | None = None,
    strategy: Any = None,
) -> PullResult:
    """Fetch from remote ``name``, fast-forward threads that only moved there, and merge a
    thread that moved on both sides, as ``git pull`` would: into the workspace when it is the
    workspace's thread and the workspace is at its head (a two-parent merge snapshot, or a
    conflict report with the merge left in progress), else recorded as pending."""
    from narrative.commits import snapshot_at
    from narrative.head import read_head
    from narrative.restore import restore_workspace
    from narrative.workspace_merge import merge_workspace

    current = store.config.default_thread
    before = store.refs.read(store.thread_ref(current))
    at_head = read_head(store) in (None, before)
    imports = fetch(store, name, move_threads=True, storage_options=storage_options)
    result = PullResult(imports)
    after = store.refs.read(store.thread_ref(current))
    if at_head and before is not None and after is not None and after != before:
        # the workspace's thread fast-forwarded: bring the workspace along, as git pull does
        # (what the workspace held is kept first; unsnapshotted files are never overwritten)
        restore_workspace(store, snapshot_at(store, after))
        result.updated_workspace = True
    before_pending = pending_merges(store)
    pending = dict(before_pending)
    diverged = {t for r in imports for t in r.diverged}
    for thread_id in sorted(diverged):
        local = store.refs.read(store.thread_ref(thread_id))
        if thread_id == current and read_head(store) in (None, local) and result.merge is None:
            # merged now (a failure raises and leaves it listed as pending); as git pull
            # does, whatever it changes: ignore files and config are only held for --force
            # when a run's result or a snapshot is merged by hand
            result.merge = merge_workspace(store, f"{name}/{thread_id}", strategy, force=True)
            pending.pop(thread_id, None)
            continue
        tracking = store.refs.read(f"refs/narrative/remotes/{name}/threads/{thread_id}")
        pending[thread_id] = {"remote": name, "theirs": tracking.hex() if tracking else ""}
        result.pending.append(thread_id)
    if pending != before_pending:
        save_pending(store, pending)
    return result
