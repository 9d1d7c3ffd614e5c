"""Retention and repacking: ids stay stable, protected snapshots survive, git agrees."""

from __future__ import annotations

from pathlib import Path

import pytest

from narrative.commits import thread_snapshots
from narrative.errors import InvalidInput
from narrative.gc import RetentionPolicy, collect_garbage, parse_duration
from narrative.hierarchy import create_thread, finish_run, start_run
from narrative.history import resolve_snapshot
from narrative.restore import materialize
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git, tree_bytes


def _snapshots(store: Store, ws: Path, count: int) -> list[str]:
    ids = []
    for i in range(count):
        (ws / "counter.txt").write_text(f"{i}\n")
        (ws / f"file{i}.bin").write_bytes(bytes([i]) * 5000)
        ids.append(take_snapshot(store, message=f"s{i}").snapshot.id)
    return ids


def test_keep_last_drops_old_snapshots_but_keeps_ids(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    ids = _snapshots(store, workspace, 6)
    main = store.config.default_thread
    run = start_run(store, main, base_snapshot=ids[1])
    finish_run(store, run.id, "succeeded", 0, ids[1])
    fork = create_thread(store, store.config.default_objective, "fork", ids[2])
    (workspace / "fork.txt").write_text("fork\n")
    forked = take_snapshot(store, fork.id).snapshot
    before = {i: resolve_snapshot(store, i) for i in ids}
    report = collect_garbage(store, RetentionPolicy(keep_last=2))
    kept = [s.id for s in thread_snapshots(store, main)]
    # newest two, the run's snapshot and the fork point survive, in order
    assert kept == [ids[5], ids[4], ids[2], ids[1]]
    assert sorted(report.dropped) == sorted([ids[0], ids[3]])
    for i in kept:
        after = resolve_snapshot(store, i)
        assert after.tree == before[i].tree and after.message == before[i].message
    # the fork now hangs off the rewritten fork point
    fork_snap = resolve_snapshot(store, forked.id)
    assert fork_snap.parent == ids[2]
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
    assert store.odb.pack_count() == 1
    assert not any((Path(store.git_dir) / "objects").glob("??/*"))
    # content of a kept snapshot is intact
    out = tmp_path / "out"
    materialize(store, resolve_snapshot(store, ids[4]), str(out))
    assert (out / "counter.txt").read_text() == "4\n"
    # snapshotting after gc still works, using the pruned stat cache safely
    (workspace / "after.txt").write_text("after\n")
    assert take_snapshot(store).created


def test_gc_without_policy_only_packs(store: Store, workspace: Path) -> None:
    ids = _snapshots(store, workspace, 3)
    before = tree_bytes(Path(store.git_dir) / "refs")
    report = collect_garbage(store, RetentionPolicy())
    assert report.dropped == [] and report.packs_after == 1
    assert [s.id for s in thread_snapshots(store, store.config.default_thread)] == ids[::-1]
    assert tree_bytes(Path(store.git_dir) / "refs") == before


def test_dry_run_changes_nothing(store: Store, workspace: Path) -> None:
    ids = _snapshots(store, workspace, 4)
    before = tree_bytes(Path(store.git_dir))
    report = collect_garbage(store, RetentionPolicy(keep_last=1), dry_run=True)
    assert sorted(report.dropped) == sorted(ids[:3])
    assert tree_bytes(Path(store.git_dir)) == before


def test_keep_within(store: Store, workspace: Path) -> None:
    _snapshots(store, workspace, 3)
    report = collect_garbage(store, RetentionPolicy(keep_within=parse_duration("1h")))
    assert report.dropped == []
    assert parse_duration("2w") == 14 * 86400
    with pytest.raises(InvalidInput):
        parse_duration("soon")


def test_gc_never_rewrites_history_that_left_the_store(tmp_path: Path) -> None:
    """Issue 12 clarification: gc may drop old snapshots, but never rewrite commits another
    machine holds (exported or pushed), or the next incremental transfer breaks."""
    from tests.conftest import Cli

    ws = tmp_path / "ws"
    ws.mkdir()
    cli = Cli(ws)
    cli.run("init")
    ids = []
    for i in range(6):
        (ws / "counter.txt").write_text(f"{i}\n")
        ids.append(cli.json("snapshot", "-m", f"s{i}")["id"])
    full = tmp_path / "full.bundle"
    cli.run("export", str(full))  # ids[0..5] now exist elsewhere
    commits = {i: cli.json("show", i)["commit"] for i in ids}
    for i in range(6, 9):
        (ws / "counter.txt").write_text(f"{i}\n")
        ids.append(cli.json("snapshot", "-m", f"s{i}")["id"])
    report = cli.json("gc", "--keep-last", "1")
    # only unshared snapshots were dropped; every shared one keeps its commit
    assert sorted(report["dropped"]) == sorted(ids[6:8])
    for i in ids[:6]:
        assert cli.json("show", i)["commit"] == commits[i]
    # so a receiver of the first bundle takes an incremental one made after gc
    other = tmp_path / "other"
    other.mkdir()
    receiver = Cli(other)
    receiver.run("init")
    receiver.run("import", str(full))
    inc = tmp_path / "inc.bundle"
    cli.run("export", str(inc), "--since", ids[5])
    receiver.run("import", str(inc))
    out = tmp_path / "out"
    receiver.run("restore", ids[8], "--to", str(out))
    assert (out / "counter.txt").read_text() == "8\n"
    store = Store.open(workspace=str(ws))
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
