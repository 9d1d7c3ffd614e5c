"""Remotes: incremental pushes, fetch and pull, and concurrent pushers losing nothing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from narrative.commits import thread_snapshots
from narrative.hierarchy import create_thread
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git
from tests.transfer.conftest import Backend
from transfer import verified
from transfer.remotes import PushRejected, add_remote, fetch, push


def _machine(tmp_path: Path, name: str) -> Store:
    ws = tmp_path / name
    ws.mkdir()
    return Store.init(str(ws))


def _index(backend: Backend) -> dict:  # type: ignore[type-arg]
    return json.loads(verified.read_small(backend.url("remote", "index.json"), backend.options))


def test_push_fetch_pull_round_trip(
    backend: Backend, store: Store, workspace: Path, tmp_path: Path
) -> None:
    add_remote(store, "origin", backend.url("remote"), backend.options)
    for i in range(20):
        (workspace / f"f{i}.txt").write_text(f"{i}\n" * 200)
    first = take_snapshot(store).snapshot
    pushed = push(store, "origin")
    assert pushed.pushed == {store.config.default_thread: first.commit}
    assert push(store, "origin").pushed == {}  # up to date: nothing sent
    (workspace / "f1.txt").write_text("changed\n")
    second = take_snapshot(store).snapshot
    inc = push(store, "origin")
    assert inc.size < 16 * 1024
    assert len(_index(backend)["bundles"]) == 2

    other = _machine(tmp_path, "b")
    add_remote(other, "origin", backend.url("remote"), backend.options)
    fetch(other, "origin")
    thread = store.config.default_thread
    tracking = f"refs/narrative/remotes/origin/threads/{thread}"
    assert other.refs.read(tracking) == bytes.fromhex(second.commit)
    assert other.refs.read(other.thread_ref(thread)) is None  # fetch leaves threads alone
    fetch(other, "origin", move_threads=True)  # pull
    assert [s.id for s in thread_snapshots(other, thread)] == [second.id, first.id]
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")


def test_diverged_push_is_rejected(store: Store, workspace: Path, tmp_path: Path) -> None:
    remote_dir = str(tmp_path / "remote")
    add_remote(store, "origin", remote_dir)
    take_snapshot(store)
    push(store, "origin")
    other = _machine(tmp_path, "b")
    add_remote(other, "origin", remote_dir)
    fetch(other, "origin", move_threads=True)
    thread = store.config.default_thread
    Path(other.workspace, "b.txt").write_text("b\n")
    take_snapshot(other, thread)
    push(other, "origin")
    (workspace / "a.txt").write_text("a\n")
    take_snapshot(store)
    with pytest.raises(PushRejected, match="pull it first"):
        push(store, "origin")


def test_concurrent_pushes_lose_nothing(backend: Backend, tmp_path: Path) -> None:
    machines = [_machine(tmp_path, f"m{i}") for i in range(2)]
    expected = {}
    for i, store in enumerate(machines):
        add_remote(store, "origin", backend.url("remote"), backend.options)
        thread = create_thread(store, store.config.default_objective, f"work-{i}")
        for round_no in range(3):
            Path(store.workspace, "x.txt").write_text(f"{i}-{round_no}\n")
            take_snapshot(store, thread.id)
        expected[f"refs/narrative/threads/{thread.id}"] = store.refs.read(
            store.thread_ref(thread.id)
        )
    errors: list[BaseException] = []

    def pusher(store: Store) -> None:
        try:
            push(store, "origin")
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=pusher, args=(m,)) for m in machines]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    heads = _index(backend)["heads"]
    for ref, oid in expected.items():
        assert oid is not None and heads[ref] == oid.hex()
    # a third machine gets both threads
    third = _machine(tmp_path, "third")
    add_remote(third, "origin", backend.url("remote"), backend.options)
    fetch(third, "origin", move_threads=True)
    for ref, oid in expected.items():
        assert third.refs.read(ref) == oid
