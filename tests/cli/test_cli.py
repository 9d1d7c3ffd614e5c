"""The ``narrative`` command end to end: JSON shapes, exit codes, errors that write nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.conftest import Cli, git, store_dir_of


def _digest_tree(path: Path) -> str:
    """A fingerprint of every file (path, mode, content) below ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            st = os.lstat(full)
            h.update(str(st.st_mode).encode())
            if os.path.islink(full):
                h.update(os.readlink(full).encode())
            else:
                with open(full, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def test_init_info_and_store_layout(cli: Cli, workspace: Path) -> None:
    info = cli.json("init")
    assert info["workspace"] == str(workspace.resolve())
    # the store lives in the per-user data directory; the workspace holds only a marker
    data_home = Path(os.environ["XDG_DATA_HOME"]).resolve()
    assert info["store"] == str(data_home / "narrative" / "stores" / info["workspace_id"])
    assert cli.json("info")["store"] == info["store"]
    assert cli.json("info")["workspace_id"] == info["workspace_id"]
    assert (workspace / ".narrative" / ".gitignore").read_text() == "*\n"
    assert (workspace / ".narrative" / "id").read_text() == info["workspace_id"] + "\n"
    assert sorted(os.listdir(workspace / ".narrative")) == [".gitignore", "id"]
    assert "store: " + info["store"] in cli.run("info").stdout
    # a real repository for stock git
    assert git("--git-dir", info["store"], "rev-parse", "--is-bare-repository").strip() == "true"
    again = cli.run("init", check=False)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_store_elsewhere_via_flag_and_env(workspace: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "elsewhere"
    cli = Cli(workspace)
    cli.json("--store", str(store_dir), "init")
    assert not (workspace / ".narrative").exists()
    snap = cli.json("snapshot", env={"NARRATIVE_STORE": str(store_dir)})
    assert snap["created"] is True
    # from any directory, the store knows its workspace
    other = Cli(tmp_path)
    assert other.items("--store", str(store_dir), "log")[0]["id"] == snap["id"]


def test_snapshot_log_show_json_shapes(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    snap = cli.json("snapshot", "-m", "first")
    for key in ("id", "commit", "tree", "thread", "run", "parent", "created_at"):
        assert key in snap
    same = cli.run("snapshot", "--json")
    assert json.loads(same.stdout)["created"] is False
    assert "nothing changed" in same.stderr
    (workspace / "x.txt").write_text("x")
    second = cli.json("snapshot", "-m", "second")
    assert second["parent"] == snap["id"]
    log = cli.items("log")
    assert [s["id"] for s in log] == [second["id"], snap["id"]]
    assert set(log[0]) >= set(snap) - {"kind", "created", "new_thread"}
    shown = cli.json("show", second["id"][:10])
    assert shown["id"] == second["id"] and shown["message"] == "second"
    quiet = cli.run("-q", "snapshot")
    assert quiet.stdout.strip() == second["id"] and quiet.stderr == ""


def test_hierarchy_commands(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    obj = cli.json("objective", "create", "Fix the parser", "-d", "flaky")
    assert obj["title"] == "Fix the parser"
    thread = cli.json("thread", "create", "attempt-1", "--objective", obj["id"])
    assert thread["objective_id"] == obj["id"]
    run = cli.json("run", "start", "--manual", "--thread", "attempt-1", "--agent", "claude")
    assert run["status"] == "running" and run["thread"] == thread["id"]
    assert run["base_snapshot"]
    (workspace / "fix.py").write_text("fixed = True\n")
    done = cli.json("run", "finish", run["id"], "--exit-code", "0")
    assert done["status"] == "succeeded" and done["exit_code"] == 0
    result = cli.json("show", done["result_snapshot"])
    assert result["run"] == run["id"] and result["thread"] == thread["id"]
    runs = cli.items("run", "list")
    assert [(r["id"], r["thread"], r["status"]) for r in runs] == [
        (run["id"], thread["id"], "succeeded")
    ]
    assert len(cli.items("log", "--objective", obj["id"])) == 2
    fork = cli.json("thread", "create", "fork", "--from", result["id"])
    assert fork["forked_from"] == result["id"]
    assert {t["name"] for t in cli.items("thread", "list")} == {"main", "attempt-1", "fork"}
    twice = cli.run("run", "finish", run["id"], check=False)
    assert twice.returncode == 1 and "already finished" in twice.stderr


def test_diff_against_git(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    a = cli.json("snapshot")
    (workspace / "README.md").write_text("# demo\nmore\n")
    (workspace / "added.txt").write_text("new\n")
    os.unlink(workspace / "src" / "app.py")
    live = cli.json("diff", a["id"], "--name-status")
    assert [(f["status"], f["path"]) for f in live["files"]] == [
        ("M", "README.md"),
        ("A", "added.txt"),
        ("D", "src/app.py"),
    ]
    assert live["to"] == "workspace"
    b = cli.json("snapshot")
    ours = cli.run("diff", a["id"], b["id"], "--name-status").stdout
    store = cli.json("info")["store"]
    oracle = git("--git-dir", store, "diff", "--name-status", a["commit"], b["commit"])
    assert ours.split() == oracle.split()
    stat = cli.json("diff", a["id"], b["id"], "--stat")
    assert stat["totals"] == {"files": 3, "insertions": 2, "deletions": 1}
    patch = cli.run("diff", a["id"], b["id"]).stdout
    assert "+more" in patch and "diff --git a/added.txt b/added.txt" in patch


def test_restore_cli_reports_safety_snapshot(cli: Cli, workspace: Path, tmp_path: Path) -> None:
    cli.run("init")
    a = cli.json("snapshot")
    (workspace / "README.md").write_text("changed\n")
    out = cli.run("restore", a["id"], "--json")
    data = json.loads(out.stdout)
    assert data["safety_snapshot"] and "undo with" in out.stderr
    assert (workspace / "README.md").read_text() == "# demo\n"
    target = tmp_path / "copy"
    cli.run("restore", a["id"], "--to", str(target))
    assert (target / "src" / "app.py").read_text() == "print('hello')\n"


def test_errors_are_one_line_and_write_nothing(cli: Cli, workspace: Path, tmp_path: Path) -> None:
    missing = Cli(tmp_path)
    proc = missing.run("snapshot", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("narrative: error: no narrative store")
    assert "Traceback" not in proc.stderr
    cli.run("init")
    cli.run("snapshot")
    before = _digest_tree(workspace)
    for args in (
        ("show", "snap-doesnotexist"),
        ("restore", "snap-nope"),
        ("diff", "nope"),
        ("log", "--thread", "no-such-thread"),
        ("run", "finish", "run-0000000000zzzzzzzzzz"),
        ("snapshot", "--thread", "ghost"),
        ("thread", "create", "../evil"),
        ("gc", "--keep-within", "soon"),
    ):
        proc = cli.run(*args, check=False)
        assert proc.returncode == 1, args
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert _digest_tree(workspace) == before, args
    usage = cli.run("snapshot", "--no-such-flag", check=False)
    assert usage.returncode == 2


def test_corrupted_store_is_reported(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    config = store_dir_of(workspace) / "narrative" / "config.json"
    good = config.read_text()
    config.write_text("{not json")
    proc = cli.run("snapshot", check=False)
    assert proc.returncode == 1 and "unreadable store config" in proc.stderr
    config.write_text(json.dumps({"version": 1, "workspace": str(workspace)}))
    proc = cli.run("snapshot", check=False)
    assert proc.returncode == 1 and "invalid store config" in proc.stderr
    config.write_text(good)
    ref_dir = store_dir_of(workspace) / "refs" / "narrative" / "threads"
    cli.run("snapshot")
    next(ref_dir.iterdir()).write_text("garbage\n")
    proc = cli.run("log", "--all", check=False)
    assert proc.returncode == 1 and "unreadable" in proc.stderr


def test_config_sets_the_size_cap_and_default_thread(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    assert cli.json("config", "max_file_size", "1k") == {"kind": "config", "max_file_size": 1024}
    (workspace / "big.bin").write_bytes(b"b" * 2000)
    snap = cli.json("snapshot")
    assert [s["path"] for s in snap["skipped"]] == ["big.bin"]
    other = cli.json("thread", "create", "other")
    assert cli.json("config", "default_thread", "other") == {
        "kind": "config",
        "default_thread": other["id"],
    }
    (workspace / "x.txt").write_text("x")
    assert cli.json("snapshot")["thread"] == other["id"]
    bad = cli.run("config", "max_file_size", "lots", check=False)
    assert bad.returncode == 1 and "invalid size" in bad.stderr
