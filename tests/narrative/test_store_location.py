"""Where the store lives (issue 12, bug 6): outside the workspace, found through a marker or
the workspace's path, never aliased by a copy, migrated from the old in-workspace layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, git, kill_after, store_dir_of, tree_bytes


def _fsck(store_dir: Path) -> None:
    git("--git-dir", str(store_dir), "fsck", "--strict", "--no-dangling")


def _snapshots(cli: Cli) -> list[str]:
    return [s["id"] for s in cli.items("log", "--all")]


def _restored(cli: Cli, snapshot: str, target: Path) -> dict[str, bytes]:
    cli.run("restore", snapshot, "--to", str(target))
    return tree_bytes(target)


def _user_files(workspace: Path) -> dict[str, bytes]:
    """What a snapshot holds: every file but the marker and the user's own ``.git``."""
    return {
        k: v for k, v in tree_bytes(workspace).items() if not k.startswith((".narrative", ".git/"))
    }


def _three_snapshots(cli: Cli, workspace: Path) -> dict[str, dict[str, bytes]]:
    """Snapshot three states of the workspace; snapshot id → its files."""
    states = {}
    for n in range(3):
        (workspace / f"file{n}.txt").write_text(f"content {n}\n")
        (workspace / "src" / "app.py").write_text(f"print({n})\n")
        snap = cli.json("snapshot", "-m", f"state {n}")
        states[snap["id"]] = _user_files(workspace)
    return states


def test_git_clean_fdx_in_the_workspace_keeps_every_snapshot(cli: Cli, workspace: Path) -> None:
    git("init", "-q", cwd=workspace)
    cli.run("init")
    states = _three_snapshots(cli, workspace)
    assert git("status", "--porcelain", "--ignored", cwd=workspace).count(".narrative") == 1
    git("clean", "-fdx", cwd=workspace)
    assert not (workspace / ".narrative").exists()
    # found again by the workspace's path, from a subdirectory too; the marker comes back
    (workspace / "sub").mkdir()
    assert sorted(_snapshots(Cli(workspace / "sub"))) == sorted(states)
    assert (workspace / ".narrative" / "id").is_file()
    store_dir = store_dir_of(workspace)
    _fsck(store_dir)
    for snap, files in states.items():
        assert _restored(cli, snap, workspace.parent / f"check-{snap}") == files


def test_rm_rf_of_a_worktree_checkout_leaves_the_store_intact(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    states = _three_snapshots(cli, workspace)
    cli.run("env", "create", "box", "--provider", "worktree")
    argv = ["run", "start", "--env", "box", "--json", "--", "sh", "-c", "echo out > made.txt"]
    run = json.loads(cli.run(*argv).stdout)
    assert run["status"] == "succeeded"
    checkout = Path(cli.json("env", "show", "box")["resource_id"])
    assert (checkout / "file2.txt").is_file() and (checkout / "made.txt").is_file()
    store_dir = store_dir_of(workspace)
    for inside in (store_dir, workspace):
        assert not checkout.is_relative_to(inside.resolve())
    before = tree_bytes(store_dir)
    shutil.rmtree(checkout)
    assert tree_bytes(store_dir) == before
    _fsck(store_dir)
    assert set(states) <= set(_snapshots(cli))
    assert cli.items("env", "health", "box")[0]["health"] == "gone"
    cli.run("env", "delete", "box")


def test_removing_a_store_reports_the_checkouts_it_leaves(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    cli.run("snapshot")
    cli.run("env", "create", "box", "--provider", "worktree")
    checkout = Path(cli.json("env", "show", "box")["resource_id"])
    (checkout / "uncollected.txt").write_text("work nobody collected\n")
    assert cli.json("info")["orphaned_checkouts"] is None
    shutil.rmtree(store_dir_of(workspace))
    cli.run("init")  # a new store for the same workspace
    assert cli.json("info")["orphaned_checkouts"] == [str(checkout)]
    assert "orphaned_checkouts: " in cli.run("info").stdout
    assert (checkout / "uncollected.txt").is_file()  # reported, never removed


def _copy(workspace: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(workspace), str(copy)], check=True)
    (copy / "new.txt").write_text("only in the copy\n")
    return copy


def test_a_copied_workspace_refuses_to_snapshot_and_asks_for_adopt_or_fork(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    first = cli.json("snapshot", "-m", "original")["id"]
    copy = _copy(workspace, tmp_path)
    store_dir = store_dir_of(workspace)
    before = tree_bytes(store_dir)
    in_copy = Cli(copy)
    for args in (("snapshot",), ("restore", first), ("diff", first)):
        proc = in_copy.run(*args, check=False)
        assert proc.returncode == 1, (args, proc.stdout)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "copy" in proc.stderr and "--adopt" in proc.stderr and "--fork" in proc.stderr
    assert (copy / "new.txt").read_text() == "only in the copy\n"
    assert tree_bytes(store_dir) == before
    # a plain init does not silently start an unrelated history either
    assert "--fork" in in_copy.run("init", check=False).stderr
    info = in_copy.json("info")
    assert info["copy_of"] == str(workspace.resolve()) and info["store"] == str(store_dir)


def test_fork_gives_the_copy_its_own_store_with_the_shared_history(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    first = cli.json("snapshot", "-m", "original")["id"]
    cli.run("remote", "add", "origin", (tmp_path / "remote").as_uri())
    copy = _copy(workspace, tmp_path)
    store_dir = store_dir_of(workspace)
    before = tree_bytes(store_dir)
    in_copy = Cli(copy)
    forked = in_copy.json("init", "--fork")
    assert in_copy.items("remote", "list") == cli.items("remote", "list")  # goes on syncing
    assert forked["workspace"] == str(copy.resolve()) and forked["copy_of"] is None
    assert forked["store"] != str(store_dir)
    snap = in_copy.json("snapshot", "-m", "in the copy")
    assert snap["created"] is True and snap["parent"] == first
    show = in_copy.json("show", snap["id"])
    restored = _restored(in_copy, snap["id"], tmp_path / "check")
    assert restored["new.txt"].startswith(b"only in the copy\n"), show
    assert _snapshots(in_copy) == [snap["id"], first]
    _fsck(Path(forked["store"]))
    # the original's store is exactly as it was, and the original works as before
    assert tree_bytes(store_dir) == before
    assert _snapshots(cli) == [first]
    assert cli.json("snapshot")["created"] is False


def test_adopt_makes_a_moved_workspace_the_stores_workspace(
    workspace: Path, tmp_path: Path
) -> None:
    Cli(workspace).run("init")
    first = Cli(workspace).json("snapshot")["id"]
    moved = tmp_path / "moved"
    workspace.rename(moved)
    (moved / "later.txt").write_text("after the move\n")
    cli = Cli(moved)
    assert "--adopt" in cli.run("snapshot", check=False).stderr
    adopted = cli.json("init", "--adopt")
    assert adopted["workspace"] == str(moved.resolve()) and adopted["copy_of"] is None
    snap = cli.json("snapshot")
    assert snap["created"] is True and snap["parent"] == first
    # the index follows: found by its new path even without the marker
    shutil.rmtree(moved / ".narrative")
    assert cli.items("log")[0]["id"] == snap["id"]
    assert Cli(moved).run("init", "--adopt", check=False).returncode == 1  # nothing to adopt


def _old_layout_store(workspace: Path) -> Cli:
    """A store as the old layout made it: whole, in ``<workspace>/.narrative``, with no
    workspace id in its config."""
    cli = Cli(workspace)
    cli.run("--store", str(workspace / ".narrative"), "init")
    config = workspace / ".narrative" / "narrative" / "config.json"
    data = json.loads(config.read_text())
    data.pop("workspace_id", None)
    config.write_text(json.dumps(data))
    return cli


def test_an_old_layout_store_migrates_on_first_use(workspace: Path, tmp_path: Path) -> None:
    cli = _old_layout_store(workspace)
    legacy = {"NARRATIVE_STORE": str(workspace / ".narrative")}
    states = {}
    for n in range(3):
        (workspace / f"file{n}.txt").write_text(f"content {n}\n")
        snap = cli.json("snapshot", "-m", f"state {n}", env=legacy)
        states[snap["id"]] = _user_files(workspace)
    proc = cli.run("log", "--all", "--json")
    assert "moved the store" in proc.stderr and proc.stderr.count("\n") == 1
    assert sorted(s["id"] for s in json.loads(proc.stdout)["items"]) == sorted(states)
    assert sorted(os.listdir(workspace / ".narrative")) == [".gitignore", "id"]
    store_dir = store_dir_of(workspace)
    assert not store_dir.is_relative_to(workspace)
    _fsck(store_dir)
    assert "moved the store" not in cli.run("log").stderr  # once only
    for snap, files in states.items():
        assert _restored(cli, snap, tmp_path / f"check-{snap}") == files
    assert cli.json("snapshot")["created"] is False  # the same workspace, nothing changed


def test_a_store_put_in_the_workspace_on_purpose_stays_there(cli: Cli, workspace: Path) -> None:
    inside = workspace / ".narrative"
    cli.run("--store", str(inside), "init")
    snap = cli.json("snapshot", env={"NARRATIVE_STORE": str(inside)})
    proc = cli.run("log", "--json")  # found from the workspace, used where it is
    assert proc.stderr == "" and json.loads(proc.stdout)["items"][0]["id"] == snap["id"]
    assert cli.json("info")["store"] == str(inside.resolve())
    assert (inside / "narrative" / "config.json").is_file()


def test_an_unusable_data_directory_is_one_clear_error(workspace: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cli = Cli(workspace)
    before = tree_bytes(workspace)
    proc = cli.run("init", check=False, env={"XDG_DATA_HOME": str(blocker)})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot use the narrative data directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_bytes(workspace) == before


@pytest.mark.long  # several seconds: make test stays under ten minutes
@pytest.mark.slow
def test_an_old_layout_migration_killed_at_any_point_loses_nothing(
    workspace: Path, tmp_path: Path
) -> None:
    cli = _old_layout_store(workspace)
    legacy = {"NARRATIVE_STORE": str(workspace / ".narrative")}
    for n in range(200):
        (workspace / f"f{n}.bin").write_bytes(os.urandom(2000))
    first = cli.json("snapshot", env=legacy)["id"]
    expected = _user_files(workspace)
    landed = 0
    for step in range(12):  # around the ~20 ms a migration takes after a ~100 ms start-up
        delay = 0.06 + 0.01 * step
        kill_after(["log"], workspace, delay)
        legacy = workspace / ".narrative" / "narrative" / "migrating-to"
        leftovers = list(
            (Path(os.environ["XDG_DATA_HOME"]) / "narrative" / "stores").glob(".tmp-*")
        )
        landed += legacy.exists() or bool(leftovers)
        # whatever state the kill left: the snapshot is still there and restores
        assert [s["id"] for s in cli.items("log")] == [first]
        stores = Path(os.environ["XDG_DATA_HOME"]) / "narrative" / "stores"
        assert not list(stores.glob(".tmp-*"))  # what a killed copy left is cleaned up
        assert _restored(cli, first, tmp_path / f"check-{step}") == expected
        store_dir = store_dir_of(workspace)
        _fsck(store_dir)
        shutil.rmtree(workspace / ".narrative")
        shutil.copytree(store_dir, workspace / ".narrative", symlinks=True)  # old layout again
        config = workspace / ".narrative" / "narrative" / "config.json"
        data = json.loads(config.read_text())
        data.pop("workspace_id", None)
        config.write_text(json.dumps(data))
        data_stores = store_dir.parent
        for leftover in data_stores.iterdir():
            shutil.rmtree(leftover)
    print(f"{landed} of 12 kills landed mid-migration")


@pytest.mark.parametrize(
    ("xdg_data_home", "home"),
    [
        ("/data/xdg", "/home/u"),
        ("/data/xdg/", "/home/u"),
        ("relative/xdg", "/home/u"),
        ("", "/home/u"),
        ("  ", "/home/u"),
        (None, "/home/u"),
        (None, "/home/u//"),
        (None, "/"),
        (None, "relative-home"),
        (None, None),
    ],
)
def test_the_data_directory_is_where_platformdirs_puts_it(
    monkeypatch: pytest.MonkeyPatch, xdg_data_home: str | None, home: str | None
) -> None:
    """The stores live where they always did: :func:`narrative.location.data_dir` answers
    without platformdirs in the common cases, and exactly what platformdirs answers."""
    import platformdirs

    from narrative.location import data_dir

    for name, value in (("XDG_DATA_HOME", xdg_data_home), ("HOME", home)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    try:
        expected = platformdirs.user_data_dir("narrative", appauthor=False)
    except RuntimeError:  # no home at all: platformdirs gives up, and so must we
        with pytest.raises(RuntimeError):
            data_dir()
        return
    assert data_dir() == expected
