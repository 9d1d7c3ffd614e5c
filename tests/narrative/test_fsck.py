"""``narrative fsck`` finds what is wrong with a store; stock ``git fsck --strict`` agrees on
everything git can see (objects, refs), and records are checked on top."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import NARRATIVE


def _git(store: Store, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["git", "--git-dir", store.git_dir, *args], input=data, capture_output=True, check=False
    )


def _fsck(workspace: Path) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [NARRATIVE, "fsck", "--json"], cwd=workspace, capture_output=True, text=True, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _missing_object(store: Store) -> None:
    ref = Path(store.git_dir, "refs", "narrative", "extra", "gone")
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text("12" * 20 + "\n")


def _malformed_tree(store: Store) -> None:
    blob = _git(store, "hash-object", "-w", "--stdin", data=b"x\n").stdout.strip()
    entry = b"100644 a\x00" + bytes.fromhex(blob.decode())
    tree = _git(
        store, "hash-object", "--literally", "-w", "-t", "tree", "--stdin", data=entry * 2
    ).stdout.strip()
    commit = _git(store, "commit-tree", tree.decode(), "-m", "bad").stdout.strip()
    _git(store, "update-ref", "refs/narrative/extra/bad", commit.decode())


def _invalid_record(store: Store) -> None:
    thread = store.meta.ids("threads")[0]
    store.meta.update("threads", thread, lambda _old: {"id": thread, "bogus": 1}, "corrupt")


def _ref_without_record(store: Store) -> None:
    head = next(iter(store.thread_heads().values()))
    store.refs.update("refs/narrative/threads/th-0000000000000000000000", head)


CORRUPTIONS: dict[str, tuple[Callable[[Store], None], str, bool]] = {
    # case → (corrupt, what our report says, whether stock git fsck --strict fails too)
    "missing-object": (_missing_object, "missing object 1212", True),
    "malformed-tree": (_malformed_tree, "duplicateEntries", True),
    "invalid-record": (_invalid_record, "invalid thread record", False),
    "thread-ref-without-record": (_ref_without_record, "has no thread record", False),
}


@pytest.fixture
def populated(store: Store, workspace: Path) -> Store:
    (workspace / "a.txt").write_text("a\n")
    take_snapshot(store)
    (workspace / "b.txt").write_text("b\n")
    take_snapshot(store)
    return store


def test_healthy_store_passes(populated: Store, workspace: Path) -> None:
    code, report = _fsck(workspace)
    assert (code, report) == (0, {"kind": "fsck_report", "ok": True, "problems": []})
    assert _git(populated, "fsck", "--strict", "--no-dangling").returncode == 0


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_reported(populated: Store, workspace: Path, case: str) -> None:
    corrupt, expected, git_fails = CORRUPTIONS[case]
    corrupt(populated)
    code, report = _fsck(workspace)
    assert code == 1 and report["ok"] is False
    assert any(expected in problem for problem in report["problems"]), report  # type: ignore[attr-defined]
    git_fsck = _git(populated, "fsck", "--strict", "--no-dangling")
    assert (git_fsck.returncode != 0) == git_fails, git_fsck.stderr
