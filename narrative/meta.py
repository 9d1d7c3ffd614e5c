"""Objectives, threads and runs as JSON records in git objects, under one metadata ref.

``refs/narrative/meta`` points at a commit whose tree is::

    objectives/<objective-id>.json
    threads/<thread-id>.json
    runs/<run-id>.json

Every change is a new commit on that ref, made with compare-and-swap and retried when another
process got there first, so concurrent writers never lose a record. Because it is an ordinary
ref, a bundle carries the whole hierarchy with it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from .errors import ConcurrentUpdate, StoreCorrupted
from .jsonio import parse_json
from .objects import (
    MODE_DIR,
    MODE_FILE,
    Commit,
    Signature,
    encode_commit,
    encode_tree,
    parse_commit,
    parse_tree,
)
from .odb import ObjectStore
from .refs import RefStore

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")

__all__ = ["META_REF", "RECORD_KINDS", "MetaStore"]

META_REF = "refs/narrative/meta"
RECORD_KINDS = ("objectives", "threads", "runs")
_IDENTITY = ("narrative", "narrative@localhost")
_MAX_ATTEMPTS = 50
_DECODED_KEPT = 50_000
"""Decoded records kept per store (a few tens of MB at most): a hub lists a store's runs for
every run it starts, so each version of a record is decoded once, not once per listing."""
_TREES_KEPT = 16
"""Parsed record trees kept (``runs/`` of a store with 10,000 runs: ~10k entries)."""
if TYPE_CHECKING:
    _Change = Callable[[dict[str, Any] | None], dict[str, Any] | None]


class MetaStore:
    """Read and write hierarchy records."""

    def __init__(
        self,
        odb: ObjectStore,
        refs: RefStore,
        writer_lock: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.odb = odb
        self.refs = refs
        self._writer_lock = writer_lock
        # Both keyed by object id: an object's content never changes, so neither can go stale.
        self._decoded: dict[tuple[bytes, object], object] = {}
        self._trees: dict[bytes, dict[bytes, bytes]] = {}
        self._cache_lock = threading.Lock()

    def _head(self) -> tuple[bytes | None, dict[bytes, bytes]]:
        """Current meta commit and its root tree entries (name → subtree oid)."""
        head = self.refs.read(META_REF)
        if head is None:
            return None, {}
        kind, data = self.odb.read(head)
        if kind != "commit":
            raise StoreCorrupted(f"{META_REF} does not point at a commit")
        _, tdata = self.odb.read(parse_commit(data).tree)
        return head, {name: oid for name, _mode, oid in parse_tree(tdata)}

    def _subtree(self, root: dict[bytes, bytes], kind: str) -> dict[bytes, bytes]:
        """The record name → blob id entries of ``kind`` (a copy: callers change it)."""
        oid = root.get(kind.encode())
        if oid is None:
            return {}
        entries = self._trees.get(oid)
        if entries is None:
            _, data = self.odb.read(oid)
            entries = {name: boid for name, _mode, boid in parse_tree(data)}
            self._keep(self._trees, oid, entries, _TREES_KEPT)
        return dict(entries)

    def _keep(self, cache: dict[Any, Any], key: Any, value: Any, most: int) -> None:
        with self._cache_lock:
            cache[key] = value
            while len(cache) > most:  # the oldest first
                cache.pop(next(iter(cache)))

    def _decode(self, oid: bytes, name: bytes) -> dict[str, Any]:
        _, data = self.odb.read(oid)
        try:
            record = parse_json(data)
        except ValueError as exc:
            raise StoreCorrupted(f"metadata record {name.decode()} is not JSON") from exc
        if not isinstance(record, dict):
            raise StoreCorrupted(f"metadata record {name.decode()} is not an object")
        return record

    def get(self, kind: str, ident: str) -> dict[str, Any] | None:
        """One record, or None."""
        _, root = self._head()
        name = f"{ident}.json".encode()
        oid = self._subtree(root, kind).get(name)
        return None if oid is None else self._decode(oid, name)

    def all(self, kind: str) -> list[dict[str, Any]]:
        """Every record of ``kind``, in id order."""
        _, root = self._head()
        sub = self._subtree(root, kind)
        return [self._decode(sub[name], name) for name in sorted(sub)]

    def decoded(self, kind: str, decode: Callable[[dict[str, Any]], T]) -> list[T]:
        """Every record of ``kind`` as ``decode`` makes it, in id order. What ``decode`` made
        of a record is kept by the record's content (its blob id) and handed out again, so it
        must be immutable (the models' frozen dataclasses); a record that changed is a new
        blob, decoded anew."""
        _, root = self._head()
        sub = self._subtree(root, kind)
        out = []
        for name in sorted(sub):
            key = (sub[name], decode)
            value = self._decoded.get(key)
            if value is None:
                value = decode(self._decode(sub[name], name))
                self._keep(self._decoded, key, value, _DECODED_KEPT)
            out.append(value)
        return out  # type: ignore[return-value]

    def ids(self, kind: str) -> list[str]:
        """Ids of every record of ``kind`` without reading the records."""
        _, root = self._head()
        return sorted(n.decode()[: -len(".json")] for n in self._subtree(root, kind))

    def update(
        self,
        kind: str,
        ident: str,
        change: _Change,
        message: str,
    ) -> dict[str, Any] | None:
        """Read-modify-write one record atomically; ``change`` gets the current record or None
        and returns the new one (None deletes). Retried on concurrent updates."""
        return self.update_many({(kind, ident): change}, message)[(kind, ident)]

    def update_many(
        self, changes: dict[tuple[str, str], _Change], message: str
    ) -> dict[tuple[str, str], dict[str, Any] | None]:
        """Like :meth:`update` for several records in one commit (made only if one changed)."""
        with self._writer_lock():
            delay = 0.001
            for _attempt in range(_MAX_ATTEMPTS):
                head, root = self._head()
                root = dict(root)
                results: dict[tuple[str, str], dict[str, Any] | None] = {}
                changed = False
                for kind in sorted({k for k, _i in changes}):
                    sub = self._subtree(root, kind)
                    before = dict(sub)
                    for (k, ident), change in changes.items():
                        if k != kind:
                            continue
                        name = f"{ident}.json".encode()
                        current = self._decode(sub[name], name) if name in sub else None
                        new = change(current)
                        results[(kind, ident)] = new
                        if new is None:
                            sub.pop(name, None)
                            continue
                        # compared as stored (``sub == before`` below), not with ``current``:
                        # a change function may have edited ``current`` in place and returned
                        # it; an unchanged record's blob exists, so nothing is written for it
                        blob = json.dumps(new, sort_keys=True, indent=1).encode() + b"\n"
                        sub[name] = self.odb.write_loose("blob", blob)
                    if sub == before:
                        continue
                    changed = True
                    entries = [(n, MODE_FILE, o) for n, o in sub.items()]
                    if entries:
                        root[kind.encode()] = self.odb.write_loose("tree", encode_tree(entries))
                    else:
                        root.pop(kind.encode(), None)
                if not changed:
                    return results
                tree = self.odb.write_loose(
                    "tree", encode_tree([(n, MODE_DIR, o) for n, o in root.items()])
                )
                sig = Signature(*_IDENTITY, int(time.time()))
                commit = encode_commit(Commit(tree, (head,) if head else (), sig, sig, message))
                oid = self.odb.write_loose("commit", commit)
                try:
                    self.refs.update(META_REF, oid, expected=head)
                    return results
                except ConcurrentUpdate:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
        raise ConcurrentUpdate("could not update metadata records: too much contention")
