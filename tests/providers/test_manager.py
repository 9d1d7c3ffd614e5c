"""The environment manager over real worktree environments: lifecycle, health, reconnect,
sweeping, logs."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from narrative.errors import InvalidInput
from narrative.store import Store
from providers import registry
from providers.base import Health, ProviderContext
from providers.errors import (
    EnvironmentExists,
    IllegalTransition,
    NoProviderAvailable,
    ProviderError,
)
from providers.lifecycle import EnvState
from providers.manager import EnvironmentManager
from providers.records import EnvironmentRecord
from providers.worktree import WorktreeConfig, WorktreeProvider, worktrees_dir


class FlakyProvider(WorktreeProvider):
    """A worktree whose reachability a test controls: stands in for a remote whose network
    drops (the one thing that cannot be produced for real with a local directory)."""

    name = "flaky"
    unreachable = False

    def health(self, resource_id: str) -> Health:
        if FlakyProvider.unreachable and os.path.isdir(resource_id):
            return Health.UNREACHABLE
        return super().health(resource_id)


@pytest.fixture
def flaky() -> Iterator[type[FlakyProvider]]:
    registry.register("flaky", FlakyProvider)
    FlakyProvider.unreachable = False
    yield FlakyProvider
    registry._LOADED.pop("flaky", None)


def test_create_start_stop_restart_delete(store: Store) -> None:
    manager = EnvironmentManager(store)
    record = manager.create("box", require=["python"])
    assert record.provider == "worktree" and record.state is EnvState.RUNNING
    assert record.resource_id and os.path.isdir(record.resource_id)
    assert "python" in record.capabilities
    assert manager.stop("box").state is EnvState.STOPPED
    with pytest.raises(ProviderError, match="stopped; start it first"):
        manager.exec("box", ["true"])
    assert manager.start("box").state is EnvState.RUNNING
    assert manager.restart("box").state is EnvState.RUNNING
    states = [h["to"] for h in manager.get("box").history]
    assert states == ["starting", "running", "stopping", "stopped", "starting", "running",
                      "restarting", "running"]  # fmt: skip
    archived = manager.delete("box")
    assert archived.state is EnvState.ARCHIVED and not os.path.exists(record.resource_id)
    assert manager.environments() == []
    assert manager.create("box").id != record.id  # the name is free again


def test_bad_requests_change_nothing(store: Store) -> None:
    manager = EnvironmentManager(store)
    with pytest.raises(NoProviderAvailable, match="gpu"):
        manager.create("g", require=["gpu"])
    with pytest.raises(InvalidInput, match="invalid worktree config: bogus"):
        manager.create("w", provider="worktree", config={"bogus": 1})
    with pytest.raises(InvalidInput, match="invalid environment name"):
        manager.create("../evil")
    with pytest.raises(NoProviderAvailable, match="worktree lacks gpu"):
        manager.create("w", provider="worktree", require=["gpu"])
    assert manager.environments(include_archived=True) == []
    manager.create("a")
    with pytest.raises(EnvironmentExists):
        manager.create("a")
    with pytest.raises(IllegalTransition):
        manager._move(manager.get("a"), EnvState.CREATED)


def test_failed_creation_is_recorded_as_error(store: Store, tmp_path: Path) -> None:
    manager = EnvironmentManager(store)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(InvalidInput):
        manager.create("l", provider="local", config={"path": str(busy)})
    record = manager.get("l")
    assert record.state is EnvState.ERROR and record.error_count == 1
    assert "not an empty directory" in (record.last_error or "")
    assert manager.delete("l").state is EnvState.ARCHIVED  # destroy works from error


def test_exec_output_goes_to_the_log(store: Store) -> None:
    manager = EnvironmentManager(store)
    manager.create("box")
    chunks: list[bytes] = []
    result = manager.exec(
        "box", ["sh", "-c", "echo visible; exit 3"], on_output=lambda s, c: chunks.append(c)
    )
    assert result.exit_code == 3 and b"".join(chunks) == b"visible\n"
    lines = manager.logs.lines("box")
    assert any(line.endswith("exec sh -c echo visible; exit 3") for line in lines)
    assert "visible" in lines and lines[-1].endswith("exit 3")
    assert manager.logs.lines("box", tail=1) == lines[-1:]


def test_heartbeat_loss_and_recovery(store: Store, flaky: type[FlakyProvider]) -> None:
    manager = EnvironmentManager(store, failure_threshold=2)
    manager.create("f", provider="flaky")
    flaky.unreachable = True
    assert [r.state for r in manager.check_health()] == ["disconnected"]
    assert [r.state for r in manager.check_health()] == ["unconnectable"]
    assert manager.get("f").consecutive_failures == 2
    flaky.unreachable = False
    report = manager.check_health(["f"])
    assert (report[0].health, report[0].state) == ("ok", "running")
    assert manager.get("f").consecutive_failures == 0


def test_resource_gone_then_destroyed(store: Store) -> None:
    manager = EnvironmentManager(store)
    record = manager.create("box")
    assert record.resource_id is not None
    shutil.rmtree(record.resource_id)
    assert [(r.health, r.state) for r in manager.check_health()] == [("gone", "not_available")]
    with pytest.raises(ProviderError):
        manager.exec("box", ["true"])
    assert manager.delete("box").state is EnvState.ARCHIVED


def test_a_restarted_manager_reconnects_from_records(store: Store) -> None:
    first = EnvironmentManager(store)
    first.create("kept")
    lost = first.create("lost")
    first.stop("kept")
    assert lost.resource_id is not None
    shutil.rmtree(lost.resource_id)
    second = EnvironmentManager(Store.open(store.git_dir))  # a fresh process, in effect
    reports = {r.name: (r.health, r.state) for r in second.reconnect_all()}
    assert reports == {"kept": ("ok", "stopped"), "lost": ("gone", "not_available")}
    second.start("kept")
    assert second.exec("kept", ["true"]).exit_code == 0


def test_interrupted_start_is_settled_on_reconnect(store: Store) -> None:
    manager = EnvironmentManager(store)
    record = manager.create("box", start=False)
    manager._move(record, EnvState.STARTING, "the process died here")
    reports = EnvironmentManager(store).reconnect_all()
    assert [(r.name, r.state) for r in reports] == [("box", "running")]


def test_leaked_resources_are_swept(store: Store) -> None:
    manager = EnvironmentManager(store)
    kept = manager.create("kept")
    leaked = Path(worktrees_dir(store)) / "env-leaked"
    leaked.mkdir(parents=True)
    (leaked / "work.txt").write_text("from a crashed manager\n")
    assert manager.sweep(["worktree"]) == [str(leaked)]
    assert not leaked.exists() and os.path.isdir(kept.resource_id or "")
    assert manager.sweep(["worktree"]) == []


def test_watch_runs_health_checks_in_the_background(store: Store) -> None:
    manager = EnvironmentManager(store, health_interval=0.05)
    record = manager.create("box")
    shutil.rmtree(record.resource_id or "")
    stop = threading.Event()
    watcher = threading.Thread(target=manager.watch, args=(stop,))
    watcher.start()
    try:
        for _ in range(200):
            if manager.get("box").state is EnvState.NOT_AVAILABLE:
                break
            stop.wait(0.02)
    finally:
        stop.set()
        watcher.join()
    assert manager.get("box").state is EnvState.NOT_AVAILABLE


def test_a_sweep_never_ends_the_processes_of_a_live_environment(
    store: Store, tmp_path: Path
) -> None:
    """A leaked checkout named by a live environment's id (that environment now lives at a
    path of its own) is swept as a leak, not as that environment: its processes run on."""
    manager = EnvironmentManager(store)
    record = manager.create("box", "worktree", {"path": str(tmp_path / "own"), "sandbox": "none"})
    handle = manager.spawn("box", ["sleep", "300"])
    leaked = Path(worktrees_dir(store)) / record.id
    leaked.mkdir(parents=True)
    try:
        assert manager.sweep(["worktree"]) == [str(leaked)]
        assert manager.alive("box", handle)
    finally:
        manager.delete("box")


class SlowCreate(WorktreeProvider):
    """A worktree whose create waits, once its checkout is made, until the test lets it go."""

    name = "slow-create"
    made = threading.Event()
    go = threading.Event()

    def create(self) -> str:
        resource = super().create()
        SlowCreate.made.set()
        assert SlowCreate.go.wait(30)
        return resource


def test_a_sweep_during_a_create_leaves_its_resource_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is written before the resource is made and names it only afterwards: a
    sweep in between (another shell's ``env sweep``) deleted the new checkout before."""
    monkeypatch.setitem(registry._LOADED, "slow-create", SlowCreate)
    SlowCreate.made.clear()
    SlowCreate.go.clear()
    created: list[EnvironmentRecord] = []
    creator = threading.Thread(
        target=lambda: created.append(EnvironmentManager(store).create("box", "slow-create"))
    )
    creator.start()
    try:
        assert SlowCreate.made.wait(30)
        assert EnvironmentManager(store).sweep(["slow-create"]) == []
    finally:
        SlowCreate.go.set()
        creator.join(30)
    assert created and created[0].state is EnvState.RUNNING
    assert os.path.isdir(created[0].resource_id or "")


def test_the_resource_of_a_create_that_died_is_swept(store: Store) -> None:
    """A record written and its resource made by a process that died before it recorded the
    resource: the sweep takes the resource (nothing holds the environment's creation)."""
    manager = EnvironmentManager(store)
    record = manager.records.add(EnvironmentRecord(name="box", provider="worktree"))
    context = ProviderContext(store, manager.owner, record.id, "box")
    made = WorktreeProvider(context, WorktreeConfig()).create()
    assert manager.sweep(["worktree"]) == [made]
    assert not os.path.exists(made)
