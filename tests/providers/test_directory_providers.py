"""The ``local`` and ``worktree`` providers against real files and stock git, beyond the provider
contract (``test_contract.py``: lifecycle, exec, files, restore and collect, reconnect, delete):
symlinks out of the directory, restores that touch only what differs and keep uncaptured
work, the directory rules of each."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from narrative.commits import thread_snapshots
from narrative.errors import InvalidInput
from narrative.hierarchy import list_threads
from narrative.ids import new_id
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers import directory_processes
from providers.base import BaseProvider, ProviderContext
from providers.directory_processes import marked_processes
from providers.local import LocalConfig, LocalProvider
from providers.manager import EnvironmentManager
from providers.proctree import environment_marker
from providers.worktree import WorktreeConfig, WorktreeProvider
from tests.conftest import git_tree_of
from tests.providers.contract_targets import sandbox_or_skip


@pytest.fixture(params=["worktree", "local"])
def provider(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> BaseProvider:
    context = ProviderContext(store, "owner-test", new_id("environment"), "box")
    if request.param == "local":
        return LocalProvider(context, LocalConfig(path=str(tmp_path / "local-env")))
    return WorktreeProvider(context, WorktreeConfig())


def test_symlinks_out_of_the_directory_and_missing_files_are_refused(
    provider: BaseProvider, tmp_path: Path
) -> None:
    rid = provider.create()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, Path(rid) / "link")
    for bad in ("link/x", "link/../../x"):
        with pytest.raises(InvalidInput):
            provider.write_file(rid, bad, b"x")
        with pytest.raises(InvalidInput):
            provider.read_file(rid, bad)
    assert list(outside.iterdir()) == []
    with pytest.raises(InvalidInput, match="no such file"):
        provider.read_file(rid, "missing.txt")


def test_restore_between_runs_touches_only_what_differs(
    provider: BaseProvider, store: Store, workspace: Path, tmp_path: Path
) -> None:
    (workspace / ".gitignore").write_text("*.log\n")
    (workspace / "keep").mkdir()
    (workspace / "keep" / "same.txt").write_text("unchanged\n")
    first = take_snapshot(store).snapshot
    (workspace / "README.md").write_text("# second\n")
    (workspace / "src" / "app.py").unlink()
    (workspace / "src" / "app.py").mkdir()  # a file becomes a directory
    (workspace / "src" / "app.py" / "main.py").write_text("pass\n")
    second = take_snapshot(store).snapshot
    rid = provider.create()
    provider.restore(rid, first)
    inode = os.stat(Path(rid) / "keep" / "same.txt").st_ino
    (Path(rid) / "build.log").write_text("ignored output of a run\n")
    (Path(rid) / "cache").mkdir()
    (Path(rid) / "cache" / "x.log").write_text("ignored\n")
    provider.restore(rid, second)
    assert os.stat(Path(rid) / "keep" / "same.txt").st_ino == inode  # not rewritten
    assert not (Path(rid) / "build.log").exists() and not (Path(rid) / "cache").exists()
    assert git_tree_of(Path(rid), tmp_path, exclude=()) == second.tree
    (Path(rid) / "src" / "app.py" / "debug.log").write_text("ignored, in the way\n")
    provider.restore(rid, first)  # the directory must become a file again
    assert git_tree_of(Path(rid), tmp_path, exclude=()) == first.tree
    assert not [t for t in list_threads(store) if t.name == "env/box"]  # nothing uncaptured


def test_restore_saves_uncaptured_leftovers(provider: BaseProvider, store: Store) -> None:
    base = take_snapshot(store).snapshot
    rid = provider.create()
    provider.restore(rid, base)
    provider.restore(rid, base)  # holds exactly the base: nothing to save
    assert not [t for t in list_threads(store) if t.name == "env/box"]
    (Path(rid) / "precious.txt").write_text("agent work nobody collected\n")
    provider.restore(rid, base)
    assert not (Path(rid) / "precious.txt").exists()
    saved = next(t for t in list_threads(store) if t.name == "env/box")
    snap = next(thread_snapshots(store, saved.id))
    assert "precious.txt" in store.odb.repo()[snap.tree]  # pygit2 tree lookup by name


def test_worktree_delete_keeps_uncollected_work(store: Store) -> None:
    context = ProviderContext(store, "o", new_id("environment"), "wt")
    provider = WorktreeProvider(context, WorktreeConfig())
    rid = provider.create()
    provider.restore(rid, take_snapshot(store).snapshot)
    (Path(rid) / "result.txt").write_text("only here\n")
    provider.delete(rid)
    assert not os.path.exists(rid)
    saved = next(t for t in list_threads(store) if t.name == "env/wt")
    assert "result.txt" in store.odb.repo()[next(thread_snapshots(store, saved.id)).tree]


def test_local_refuses_non_empty_or_nested_directories(store: Store, tmp_path: Path) -> None:
    context = ProviderContext(store, "o", new_id("environment"), "l")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    for path in (busy, Path(store.workspace) / "inside", Path(store.git_dir)):
        with pytest.raises(InvalidInput):
            LocalProvider(context, LocalConfig(path=str(path))).create()


def test_a_restore_after_an_emptying_reset(provider: BaseProvider, store: Store) -> None:
    """An emptied directory is remembered as holding the empty tree, which no snapshot may
    have stored: a restore that follows must still write the snapshot (it failed with the
    empty tree "missing from the store", e.g. a remote environment reset then restored)."""
    base = take_snapshot(store, message="base").snapshot
    rid = provider.create()
    provider.reset(rid, None)
    provider.restore(rid, base)
    collected = provider.collect(rid, store.config.default_thread, None, "restored")
    assert collected.tree == base.tree


def test_a_reset_that_cannot_read_the_process_list_fails(
    provider: BaseProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending an environment's leftovers reads each process's environment for its marker: a
    read that fails for any reason but the process being gone or not ours (here: out of
    descriptors, which root's tests provoke only at the boundary) fails the reset. It used to
    skip the process, which then outlived the reset and reached the next run."""
    rid = provider.create()
    handle = provider.spawn(rid, ["sleep", "60"])
    real_open = open

    def out_of_descriptors(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/") and str(path).endswith("/environ"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(directory_processes, "open", out_of_descriptors, raising=False)
    with pytest.raises(OSError) as failure:
        provider.end_leftovers(rid)
    assert failure.value.errno == errno.EMFILE
    monkeypatch.undo()
    provider.end_leftovers(rid)
    deadline = time.monotonic() + 15
    while provider.alive(rid, handle):
        assert time.monotonic() < deadline, "the spawned process outlived the reset"
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["stop", "delete"])
@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
@pytest.mark.parametrize("kind", ["worktree", "local"])
def test_stop_and_delete_end_every_process_started_in_the_environment(
    kind: str, sandbox: str, ending: str, store: Store, tmp_path: Path
) -> None:
    """A spawned tree, a process of it that left for a session of its own, and (unsandboxed)
    a daemon an exec left behind all end when the environment is stopped or deleted. Both
    left them running before: the agent's processes outlived the environment the user had
    stopped or deleted."""
    if sandbox == "bwrap":
        sandbox_or_skip()
    env_id = new_id("environment")
    context = ProviderContext(store, "owner-test", env_id, "box")
    provider: BaseProvider
    if kind == "local":
        config = LocalConfig(path=str(tmp_path / "local-env"), sandbox=sandbox)
        provider = LocalProvider(context, config)
    else:
        provider = WorktreeProvider(context, WorktreeConfig(sandbox=sandbox))
    rid = provider.create()
    provider.spawn(rid, ["sh", "-c", "setsid sleep 300 & exec sleep 300"])
    provider.exec(rid, ["sh", "-c", "setsid sleep 301 < /dev/null > /dev/null 2>&1 &"])
    var, value = environment_marker(env_id)
    running = {"sleep 300": 2, "sleep 301": 1 if sandbox == "none" else 0}
    deadline = time.monotonic() + 15
    while _commands(marked_processes(value, var)) != running:
        assert time.monotonic() < deadline, _commands(marked_processes(value, var))
        time.sleep(0.05)
    getattr(provider, ending)(rid)
    assert marked_processes(value, var) == []


def _commands(pids: list[int]) -> dict[str, int]:
    """How many of ``pids`` run each ``sleep`` (their other processes aside: the sandbox's)."""
    counted = {"sleep 300": 0, "sleep 301": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode().strip()
        except FileNotFoundError:
            continue
        if command in counted:
            counted[command] += 1
    return counted


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_sweeping_a_leaked_checkout_ends_its_processes(
    sandbox: str, store: Store, tmp_path: Path
) -> None:
    """A checkout whose record was lost is deleted by ``env sweep``; the processes its agent
    started end with it. Before, the sweep looked for its own marker ("env-sweep") and left
    them running on the user's machine."""
    if sandbox == "bwrap":
        sandbox_or_skip()
    env_id = new_id("environment")
    provider = WorktreeProvider(
        ProviderContext(store, "owner-test", env_id, "box"), WorktreeConfig(sandbox=sandbox)
    )
    rid = provider.create()  # never recorded: as if the manager died before it wrote the record
    provider.spawn(rid, ["sh", "-c", "setsid sleep 300 & exec sleep 300"])
    var, value = environment_marker(env_id)
    deadline = time.monotonic() + 15
    while _commands(marked_processes(value, var))["sleep 300"] != 2:
        assert time.monotonic() < deadline, _commands(marked_processes(value, var))
        time.sleep(0.05)
    assert EnvironmentManager(store).sweep(["worktree"]) == [rid]
    assert not os.path.exists(rid)
    assert marked_processes(value, var) == []
