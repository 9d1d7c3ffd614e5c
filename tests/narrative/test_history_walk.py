"""A long history costs only what is shown of it (issue 18, the 10,000-snapshot row):
``narrative log -n N`` reads N + 1 commits, and resolving a snapshot id decodes only the
snapshot it returns (and its parent's id), not every snapshot it passes on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import narrative.commits
from cli.main import cli
from narrative.history import resolve_snapshot
from narrative.jsonio import parse_json
from narrative.models import Snapshot
from narrative.odb import ObjectStore
from narrative.snapshot import take_snapshot
from narrative.store import Store

DEPTH = 20


def _history(store: Store, workspace: Path) -> list[Snapshot]:
    """DEPTH snapshots on the default thread, oldest first."""
    made = []
    for i in range(DEPTH):
        (workspace / "step.txt").write_text(f"{i}\n")
        made.append(take_snapshot(store, message=f"step {i}").snapshot)
    return made


def test_log_n_reads_only_the_commits_it_shows(
    store: Store, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _history(store, workspace)
    commits_read: list[bytes] = []
    read = ObjectStore.read

    def counting_read(self: ObjectStore, oid: bytes) -> tuple[str, bytes]:
        kind, data = read(self, oid)
        if kind == "commit":
            commits_read.append(oid)
        return kind, data

    monkeypatch.setattr(ObjectStore, "read", counting_read)
    shown = CliRunner().invoke(cli, ["--store", store.git_dir, "log", "-n", "5", "--json"])
    assert shown.exit_code == 0, shown.output
    items = parse_json(shown.output)["items"]
    assert [s["id"] for s in items] == [s.id for s in reversed(made[-5:])]
    # five shown, the parent of the last (for its id), the thread's head looked up once more:
    # a few, not the DEPTH of the history
    assert len(commits_read) <= 8, f"{len(commits_read)} commits read for 5 snapshots"


def test_resolving_an_id_decodes_only_the_snapshot_found(
    store: Store, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _history(store, workspace)
    decoded: list[str] = []
    decode = narrative.commits.snapshot_from_commit

    def counting_decode(*args: Any) -> Snapshot:
        snap = decode(*args)
        decoded.append(snap.id)
        return snap

    monkeypatch.setattr(narrative.commits, "snapshot_from_commit", counting_decode)
    oldest, middle = made[0], made[DEPTH // 2]
    assert resolve_snapshot(store, oldest.id) == oldest
    assert resolve_snapshot(store, middle.commit[:12]) == middle
    assert resolve_snapshot(store, middle.id[:-3]) == middle
    # each resolution decodes the snapshot it returns (and its parent, for the parent's id)
    assert len(decoded) <= 6, f"{len(decoded)} snapshots decoded for 3 resolutions"
