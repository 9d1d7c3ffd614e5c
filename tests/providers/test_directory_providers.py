"""The ``local`` and ``worktree`` providers against real files, processes and stock git."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from narrative.commits import thread_snapshots
from narrative.errors import InvalidInput
from narrative.hierarchy import list_threads
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.base import BaseProvider, Health, ProviderContext
from providers.errors import ExecFailed, ResourceGone
from providers.local import LocalConfig, LocalProvider
from providers.worktree import WorktreeConfig, WorktreeProvider

from ..conftest import git_tree_of, tree_bytes


@pytest.fixture(params=["worktree", "local"])
def provider(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> BaseProvider:
    context = ProviderContext(store, "owner-test", "env-0000000000test000000", "box")
    if request.param == "local":
        return LocalProvider(context, LocalConfig(path=str(tmp_path / "local-env")))
    return WorktreeProvider(context, WorktreeConfig())


def test_exec_streams_output_and_returns_the_exit_code(provider: BaseProvider) -> None:
    rid = provider.create()
    seen: list[tuple[str, bytes]] = []
    result = provider.exec(
        rid,
        ["sh", "-c", "echo out; echo err >&2; pwd; exit 7"],
        env={"X_TEST": "1"},
        on_output=lambda s, c: seen.append((s, c)),
    )
    assert result.exit_code == 7 and not result.timed_out
    assert result.stdout == f"out\n{os.path.realpath(rid)}\n".encode()
    assert result.stderr == b"err\n"
    assert b"".join(c for s, c in seen if s == "stdout") == result.stdout
    assert provider.exec(rid, ["sh", "-c", 'printf "$X_TEST"'], env={"X_TEST": "v"}).stdout == b"v"


def test_timeout_kills_the_whole_process_group(provider: BaseProvider, tmp_path: Path) -> None:
    rid = provider.create()
    marker = tmp_path / "grandchild-alive"
    started = time.monotonic()
    result = provider.exec(rid, ["sh", "-c", f"(sleep 2; touch {marker}) & sleep 30"], timeout=0.5)
    assert result.timed_out and result.exit_code == 124
    assert time.monotonic() - started < 10
    time.sleep(2.5)
    assert not marker.exists(), "the background child survived the timeout"


def test_missing_program_is_a_clear_error(provider: BaseProvider) -> None:
    rid = provider.create()
    with pytest.raises(ExecFailed, match="no-such-program"):
        provider.exec(rid, ["no-such-program"])


def test_files_round_trip_and_escapes_are_refused(provider: BaseProvider, tmp_path: Path) -> None:
    rid = provider.create()
    blob = bytes(range(256)) * 4096
    provider.write_file(rid, "deep/dir/data.bin", blob)
    assert provider.read_file(rid, "deep/dir/data.bin") == blob
    provider.delete_file(rid, "deep/dir/data.bin")
    assert not (Path(rid) / "deep/dir/data.bin").exists()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, Path(rid) / "link")
    for bad in ("/etc/passwd", "../x", "a/../../x", "link/x", "."):
        with pytest.raises(InvalidInput):
            provider.write_file(rid, bad, b"x")
        with pytest.raises(InvalidInput):
            provider.read_file(rid, bad)
    assert list(outside.iterdir()) == []
    with pytest.raises(InvalidInput, match="no such file"):
        provider.read_file(rid, "missing.txt")


def test_restore_then_collect_matches_git(
    provider: BaseProvider, store: Store, workspace: Path, tmp_path: Path
) -> None:
    (workspace / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (workspace / "run.sh").chmod(0o755)
    os.symlink("src/app.py", workspace / "app-link")
    (workspace / ".gitignore").write_text("*.log\n")
    base = take_snapshot(store).snapshot
    rid = provider.create()
    provider.restore(rid, base)
    expected = {k: v for k, v in tree_bytes(workspace).items() if not k.startswith(".narrative")}
    assert tree_bytes(Path(rid)) == expected  # content, modes and links
    assert git_tree_of(Path(rid), tmp_path, exclude=()) == base.tree
    provider.exec(rid, ["sh", "-c", "echo more >> README.md; rm src/app.py; echo x > x.log"])
    thread = list_threads(store)[0].id
    result = provider.collect(rid, thread, None, "collected")
    assert result.tree == git_tree_of(Path(rid), tmp_path, exclude=("*.log",))
    assert result.tree != base.tree


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


def test_lifecycle_health_and_reconnect(provider: BaseProvider) -> None:
    rid = provider.create()
    provider.start(rid)
    assert provider.health(rid) is Health.OK
    provider.stop(rid)
    provider.reconnect(rid)
    provider.delete(rid)
    provider.delete(rid)  # idempotent
    if isinstance(provider, WorktreeProvider):
        assert provider.health(rid) is Health.GONE
        with pytest.raises(ResourceGone):
            provider.reconnect(rid)
    else:
        assert os.path.isdir(rid), "local environments never remove the user's directory"


def test_worktree_delete_keeps_uncollected_work(store: Store) -> None:
    context = ProviderContext(store, "o", "env-0000000000test000001", "wt")
    provider = WorktreeProvider(context, WorktreeConfig())
    rid = provider.create()
    provider.restore(rid, take_snapshot(store).snapshot)
    (Path(rid) / "result.txt").write_text("only here\n")
    provider.delete(rid)
    assert not os.path.exists(rid)
    saved = next(t for t in list_threads(store) if t.name == "env/wt")
    assert "result.txt" in store.odb.repo()[next(thread_snapshots(store, saved.id)).tree]


def test_local_refuses_non_empty_or_nested_directories(store: Store, tmp_path: Path) -> None:
    context = ProviderContext(store, "o", "env-0000000000test000002", "l")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    for path in (busy, Path(store.workspace) / "inside", Path(store.git_dir)):
        with pytest.raises(InvalidInput):
            LocalProvider(context, LocalConfig(path=str(path))).create()
