"""``narrative.json``, the manifest every archive starts with: its dataclass and canonical
encoding, the strict validation of a decoded manifest (exact keys, ids, the snapshot, its
objective/thread/run records, one entry per file), and :func:`manifest_tree`, the root tree the
file entries build, shared by the writer's connectivity check and the reader's rebuild.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from narrative.errors import NarrativeError
from narrative.fsck import PATH_MAX
from narrative.ids import is_id
from narrative.models import AgentRun, Objective, Snapshot, Thread
from narrative.objects import MODE_DIR, TreeEntry, encode_tree

from .archive import MANIFEST_VERSION, MODES, ArchiveError
from .archive_rules import check_layout, check_path, path_bytes

__all__ = [
    "ArchiveManifest",
    "check_header",
    "manifest_tree",
]


_FILE_KEYS = frozenset({"path", "mode", "size", "sha256", "blob"})
_TOP_KEYS = frozenset({"version", "snapshot", "objective", "thread", "run", "tree", "files"})
_SNAPSHOT_KEYS = frozenset(Snapshot.FIELDS)
_HEX_RE = re.compile("[0-9a-f]*")


@dataclass(frozen=True)
class ArchiveManifest:
    """The content of ``narrative.json`` (version 1).

    Attributes:
        version: Format version, always 1.
        snapshot: ``Snapshot.to_dict()`` of the archived snapshot.
        objective: The objective record, or None.
        thread: The thread record, or None.
        run: The run record when the snapshot belongs to a run, else None.
        tree: Hex id of the snapshot's root tree.
        files: One entry per non-directory tree entry, in tree order: ``{"path", "mode"
            ("100644" | "100755" | "120000"), "size", "sha256", "blob"}``.
    """

    version: int
    snapshot: dict[str, Any]
    objective: dict[str, Any] | None
    thread: dict[str, Any] | None
    run: dict[str, Any] | None
    tree: str
    files: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the manifest."""
        return {
            "version": self.version,
            "snapshot": self.snapshot,
            "objective": self.objective,
            "thread": self.thread,
            "run": self.run,
            "tree": self.tree,
            "files": self.files,
        }

    def encode(self) -> bytes:
        """Canonical bytes of ``narrative.json`` (sorted keys, ASCII, compact)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> ArchiveManifest:
        """Validate a decoded manifest strictly; ArchiveError names the first problem."""
        tree, snapshot, objective, thread, run = check_header(data)
        files = data["files"]
        if not isinstance(files, list):
            raise ArchiveError("archive manifest 'files' is not a list")
        checked = [_check_file_entry(entry) for entry in files]
        check_layout([entry["path"] for entry in checked])
        return cls(MANIFEST_VERSION, snapshot, objective, thread, run, tree, checked)


def check_header(
    data: Any,
) -> tuple[
    str, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None
]:
    """Everything in a manifest but the file list: (tree, snapshot, objective, thread, run)."""
    if not isinstance(data, dict):
        raise ArchiveError("archive manifest is not a JSON object")
    _exact_keys(data, _TOP_KEYS, "archive manifest")
    version = data["version"]
    if type(version) is not int or version != MANIFEST_VERSION:
        raise ArchiveError(f"unsupported archive manifest version {version!r}")
    tree = data["tree"]
    if not _is_hex(tree, 40):
        raise ArchiveError(f"archive manifest has an invalid tree id {tree!r}")
    snapshot = _check_snapshot(data["snapshot"], tree)
    objective, thread, run = _check_records(
        snapshot, data["objective"], data["thread"], data["run"]
    )
    return tree, snapshot, objective, thread, run


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and _HEX_RE.fullmatch(value) is not None


def _exact_keys(data: dict[str, Any], expected: frozenset[str], what: str) -> None:
    if data.keys() == expected:
        return
    if not all(isinstance(k, str) for k in data):
        raise ArchiveError(f"{what} has a non-string key")
    missing = sorted(expected - data.keys())
    if missing:
        raise ArchiveError(f"{what} lacks {missing[0]!r}")
    extra = sorted(data.keys() - expected)
    if extra:
        raise ArchiveError(f"{what} has an unknown field {extra[0]!r}")


def _check_snapshot(value: Any, tree: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArchiveError("archive manifest 'snapshot' is not an object")
    _exact_keys(value, _SNAPSHOT_KEYS, "archive manifest snapshot")

    def bad(key: str) -> ArchiveError:
        return ArchiveError(f"archive manifest snapshot has an invalid {key!r}: {value[key]!r}")

    ids = {"id": "snapshot", "thread": "thread", "run": "run", "parent": "snapshot"}
    for key, kind in ids.items():
        item = value[key]
        if item is None and key in ("run", "parent"):
            continue
        if not isinstance(item, str) or not is_id(item, kind):
            raise bad(key)
    for key in ("commit", "parent_commit"):
        if not (value[key] is None and key == "parent_commit") and not _is_hex(value[key], 40):
            raise bad(key)
    if value["tree"] != tree:
        raise ArchiveError(
            f"archive manifest snapshot tree {value['tree']!r} differs from its tree {tree!r}"
        )
    for key in ("message", "created_at"):
        if not isinstance(value[key], str):
            raise bad(key)
    try:  # checked here, before any object is written, not when the commit is rebuilt
        dt.datetime.strptime(value["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise bad("created_at") from None
    stats = value["stats"]
    if not isinstance(stats, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in stats.items()
    ):
        raise bad("stats")
    skipped = value["skipped"]
    if not isinstance(skipped, list) or not all(isinstance(s, dict) for s in skipped):
        raise bad("skipped")
    return value


def _check_records(
    snapshot: dict[str, Any], objective: Any, thread: Any, run: Any
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    parsers: dict[str, Any] = {
        "objective": Objective.from_dict,
        "thread": Thread.from_dict,
        "run": AgentRun.from_dict,
    }
    parsed: dict[str, Any] = {}
    for name, value in (("objective", objective), ("thread", thread), ("run", run)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ArchiveError(f"archive manifest {name!r} is not an object")
        try:
            parsed[name] = parsers[name](value)
        except (NarrativeError, KeyError, TypeError, ValueError) as exc:
            raise ArchiveError(f"archive manifest has an invalid {name} record: {exc}") from None
    if "thread" in parsed and parsed["thread"].id != snapshot["thread"]:
        raise ArchiveError("archive manifest thread record is not the snapshot's thread")
    if "run" in parsed and parsed["run"].id != snapshot["run"]:
        raise ArchiveError("archive manifest run record is not the snapshot's run")
    if (
        "objective" in parsed
        and "thread" in parsed
        and parsed["thread"].objective_id != parsed["objective"].id
    ):
        raise ArchiveError("archive manifest objective record is not the thread's objective")
    return objective, thread, run


def _check_file_entry(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ArchiveError("archive manifest has a file entry that is not an object")
    _exact_keys(entry, _FILE_KEYS, "archive manifest file entry")
    path = check_path(entry["path"])
    if entry["mode"] not in MODES:
        raise ArchiveError(f"archive file {path!r} has an invalid mode {entry['mode']!r}")
    size = entry["size"]
    if type(size) is not int or size < 0:
        raise ArchiveError(f"archive file {path!r} has an invalid size {size!r}")
    if entry["mode"] == "120000" and size == 0:
        raise ArchiveError(f"archive symlink {path!r} has an empty target")
    if entry["mode"] == "120000" and size > PATH_MAX:
        # also bounds the tar header bytes allowed per member (archive_read's header allowance)
        raise ArchiveError(
            f"archive symlink {path!r} has a {size}-byte target, longer than file systems "
            f"allow ({PATH_MAX})"
        )
    if not _is_hex(entry["sha256"], 64):
        raise ArchiveError(f"archive file {path!r} has an invalid sha256 {entry['sha256']!r}")
    if not _is_hex(entry["blob"], 40):
        raise ArchiveError(f"archive file {path!r} has an invalid blob id {entry['blob']!r}")
    return entry


class _Dir(dict[str, Any]):
    """A directory while trees are rebuilt (values: manifest entries or _Dir)."""


def manifest_tree(files: Iterable[dict[str, Any]], store_tree: Callable[[bytes], bytes]) -> bytes:
    """The root tree id that manifest file entries build. ``store_tree`` receives each encoded
    tree, deepest first, and returns its id (hash it, or write it to a pack). Iterative: a
    hostile manifest's deep paths cannot exhaust the interpreter's stack."""
    root = _Dir()
    for entry in files:
        node = root
        *dirs, leaf = entry["path"].split("/")
        for part in dirs:
            node = node.setdefault(part, _Dir())
        node[leaf] = entry
    ids: dict[int, bytes] = {}
    stack: list[tuple[_Dir, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in node.values() if isinstance(child, _Dir))
            continue
        entries: list[TreeEntry] = [
            (path_bytes(name), MODE_DIR, ids[id(value)])
            if isinstance(value, _Dir)
            else (path_bytes(name), MODES[value["mode"]], bytes.fromhex(value["blob"]))
            for name, value in node.items()
        ]
        ids[id(node)] = store_tree(encode_tree(entries))
    return ids[id(root)]
