"""Bundles between two stores in separate directories, over every storage backend."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from narrative.commits import all_snapshots, thread_snapshots
from narrative.errors import NarrativeError
from narrative.hierarchy import (
    create_objective,
    create_thread,
    finish_run,
    list_runs,
    list_threads,
    start_run,
)
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git
from tests.transfer.conftest import Backend
from transfer.exporter import export
from transfer.importer import import_


def _store_state(store: Store) -> Path:
    return Path(store.git_dir)


def _digest(path: Path) -> dict[str, bytes]:
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def _second_store(tmp_path: Path) -> Store:
    ws = tmp_path / "machine-b"
    ws.mkdir()
    return Store.init(str(ws))


def _history(store: Store) -> set[tuple[str, str, str | None, str]]:
    return {(s.id, s.tree, s.parent, s.thread) for s in all_snapshots(store)}


def test_bundle_round_trip_keeps_the_hierarchy(
    backend: Backend, store: Store, workspace: Path, tmp_path: Path
) -> None:
    objective = create_objective(store, "ship it")
    thread = create_thread(store, objective.id, "attempt")
    run = start_run(store, thread.id, agent="claude")
    (workspace / "a.txt").write_text("a\n")
    first = take_snapshot(store, thread.id, run.id).snapshot
    (workspace / "a.txt").write_text("b\n")
    second = take_snapshot(store, thread.id, run.id).snapshot
    finish_run(store, run.id, "succeeded", 0, second.id)
    take_snapshot(store)  # the default thread too
    url = backend.url("all.bundle")
    result = export(store, url, storage_options=backend.options)
    assert result.size > 0 and result.sha256

    other = _second_store(tmp_path)
    imported = import_(other, url, storage_options=backend.options)
    assert set(imported.updated) == {thread.id, store.config.default_thread}
    assert _history(other) >= _history(store)
    assert [s.id for s in thread_snapshots(other, thread.id)] == [second.id, first.id]
    assert {t.id for t in list_threads(other)} >= {thread.id, store.config.default_thread}
    runs = {r.id: r for r in list_runs(other)}
    assert runs[run.id].status == "succeeded" and runs[run.id].result_snapshot == second.id
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")

    # importing again changes nothing at all
    before = _digest(_store_state(other))
    again = import_(other, url, storage_options=backend.options)
    assert again.updated == {} and sorted(again.unchanged) == sorted(imported.updated)
    assert _digest(_store_state(other)) == before


def test_incremental_bundle_and_nothing_new(
    backend: Backend, store: Store, workspace: Path, tmp_path: Path
) -> None:
    for i in range(30):
        (workspace / f"f{i}.bin").write_bytes(os.urandom(5000))
    base = take_snapshot(store).snapshot
    export(store, backend.url("base.bundle"), storage_options=backend.options)
    nothing = export(
        store, backend.url("none.bundle"), since=base.id, storage_options=backend.options
    )
    assert nothing.nothing_new
    (workspace / "f3.bin").write_bytes(b"changed")
    after = take_snapshot(store).snapshot
    inc = export(store, backend.url("inc.bundle"), since=base.id, storage_options=backend.options)
    assert inc.size < 16 * 1024 and not inc.nothing_new
    other = _second_store(tmp_path)
    with pytest.raises(NarrativeError, match="import the earlier bundle first"):
        import_(other, backend.url("inc.bundle"), storage_options=backend.options)
    import_(other, backend.url("base.bundle"), storage_options=backend.options)
    result = import_(other, backend.url("inc.bundle"), storage_options=backend.options)
    assert result.updated == {store.config.default_thread: after.commit}


def test_diverged_threads_keep_both_heads(store: Store, workspace: Path, tmp_path: Path) -> None:
    take_snapshot(store)
    url = str(tmp_path / "base.bundle")
    export(store, url)
    other = _second_store(tmp_path)
    import_(other, url)
    thread = store.config.default_thread
    (workspace / "here.txt").write_text("machine a\n")
    ours = take_snapshot(store).snapshot
    # machine b works on the same thread in its own workspace
    Path(other.workspace, "there.txt").write_text("machine b\n")
    other.config.default_thread = thread
    other.save_config()
    theirs = take_snapshot(other, thread).snapshot
    export(store, str(tmp_path / "a.bundle"), threads=[thread])
    result = import_(other, str(tmp_path / "a.bundle"))
    side = result.diverged[thread]
    assert other.refs.read(other.thread_ref(thread)) == bytes.fromhex(theirs.commit)
    assert other.refs.read(side) == bytes.fromhex(ours.commit)
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")


def test_hostile_bundles_are_refused_and_change_nothing(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    snap = take_snapshot(store).snapshot
    good = tmp_path / "good.bundle"
    export(store, str(good))
    other = _second_store(tmp_path)
    before = _digest(_store_state(other))

    def refused(path: Path, match: str) -> None:
        with pytest.raises(NarrativeError, match=match):
            import_(other, str(path))
        assert _digest(_store_state(other)) == before

    # a bundle made by stock git with a ref outside the narrative namespace
    evil = tmp_path / "evil.bundle"
    subprocess.run(
        ["git", "--git-dir", store.git_dir, "update-ref", "refs/heads/main", snap.commit],
        check=True,
    )
    subprocess.run(
        ["git", "--git-dir", store.git_dir, "bundle", "create", str(evil), "refs/heads/main"],
        check=True,
        capture_output=True,
    )
    import hashlib

    Path(f"{evil}.sha256").write_text(hashlib.sha256(evil.read_bytes()).hexdigest() + "\n")
    refused(evil, "outside refs/narrative/")
    # tampered data: the sidecar no longer matches
    data = bytearray(good.read_bytes())
    data[-100] ^= 1
    tampered = tmp_path / "tampered.bundle"
    tampered.write_bytes(bytes(data))
    Path(f"{tampered}.sha256").write_text(Path(f"{good}.sha256").read_text())
    refused(tampered, "(?i)checksum|sha256|corrupt")
    # truncated, with a matching sidecar: the pack itself is caught
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(good.read_bytes()[:-50])
    Path(f"{cut}.sha256").write_text(hashlib.sha256(cut.read_bytes()).hexdigest() + "\n")
    refused(cut, "(?i)truncated|checksum|corrupt")
    # no sidecar: not a published artifact
    bare = tmp_path / "bare.bundle"
    bare.write_bytes(good.read_bytes())
    refused(bare, "(?i)not published|sidecar|not found")


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst"])
def test_archive_round_trip_recreates_the_snapshot(
    backend: Backend, store: Store, workspace: Path, tmp_path: Path, fmt: str
) -> None:
    (workspace / "bin").mkdir()
    (workspace / "bin" / "tool").write_text("#!/bin/sh\n")
    (workspace / "bin" / "tool").chmod(0o755)
    (workspace / "alias").symlink_to("README.md")
    run = start_run(store, store.config.default_thread, agent="claude")
    snap = take_snapshot(store, run_id=run.id, message="archived").snapshot
    url = backend.url(f"snap.{fmt}")
    result = export(store, url, fmt=fmt, storage_options=backend.options)
    assert result.snapshot == snap.id and result.sha256

    other = _second_store(tmp_path)
    imported = import_(other, url, storage_options=backend.options)
    assert imported.format == "archive" and imported.snapshot == snap.id
    got = next(s for s in all_snapshots(other) if s.id == snap.id)
    assert got.tree == snap.tree and got.run == run.id and got.message == "archived"
    assert any(r.id == run.id for r in list_runs(other))
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")
    before = _digest(_store_state(other))
    again = import_(other, url, storage_options=backend.options)
    assert again.updated == {}
    assert _digest(_store_state(other)) == before


def test_records_survive_a_pack_bigger_than_the_in_memory_budget(
    store: Store, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transfer import packin

    monkeypatch.setattr(packin, "_KEEP_BUDGET", 10_000)  # as if the pack were huge
    for i in range(20):
        (workspace / f"blob{i}.bin").write_bytes(os.urandom(3000))
    run = start_run(store, store.config.default_thread)
    take_snapshot(store, run_id=run.id)
    url = str(tmp_path / "big.bundle")
    export(store, url)
    other = _second_store(tmp_path)
    result = import_(other, url)
    assert result.records >= 3
    assert any(r.id == run.id for r in list_runs(other))
