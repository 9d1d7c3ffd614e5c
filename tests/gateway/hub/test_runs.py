"""Isolated runs end to end through the real ``narrative`` executable and the Python API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.hub.direct import pick_base, run_isolated
from narrative.hierarchy import get_thread, list_runs
from narrative.history import resolve_snapshot
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.manager import EnvironmentManager
from tests.conftest import Cli, tree_bytes


def _user_files(ws: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(ws).items() if not k.startswith(".narrative")}


def test_cli_run_in_a_worktree_leaves_the_workspace_alone(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    cli.run("env", "create", "wt", "--provider", "worktree")
    before = _user_files(workspace)
    proc = cli.run(
        "run", "start", "--env", "wt", "--json", "--",
        "sh", "-c", "echo working; echo changed >> README.md; echo new > new.txt; rm src/app.py",
    )  # fmt: skip
    assert proc.stderr.startswith("working\n")  # streamed, and kept off stdout under --json
    run = __import__("json").loads(proc.stdout)
    assert run["status"] == "succeeded" and run["exit_code"] == 0 and run["environment"] == "wt"
    assert _user_files(workspace) == before
    names = cli.run("diff", run["base_snapshot"], run["result_snapshot"], "--name-status").stdout
    assert sorted(names.splitlines()) == ["A\tnew.txt", "D\tsrc/app.py", "M\tREADME.md"]
    thread = cli.json("thread", "show", run["thread"])
    assert thread["forked_from"] == run["base_snapshot"]
    result = cli.json("show", run["result_snapshot"])
    assert result["run"] == run["id"] and result["parent"] == run["base_snapshot"]


def test_cli_failed_and_timed_out_runs(cli: Cli) -> None:
    cli.run("init")
    cli.run("env", "create", "wt")
    failed = cli.run("run", "start", "--env", "wt", "--", "sh", "-c", "exit 5", check=False)
    assert failed.returncode == 1 and "failed" in failed.stderr
    slow = cli.run(
        "run", "start", "--env", "wt", "--timeout", "0.5", "--json", "--", "sleep", "30",
        check=False,
    )  # fmt: skip
    data = __import__("json").loads(slow.stdout)
    assert slow.returncode == 1 and data["timed_out"] and data["status"] == "failed"
    runs = cli.items("run", "list")
    assert [(r["status"], r["exit_code"]) for r in runs] == [("failed", 5), ("failed", 124)]
    assert all(r["result_snapshot"] for r in runs)


def test_cli_bad_requests_record_nothing(cli: Cli) -> None:
    cli.run("init")
    missing = cli.run("run", "start", "--env", "nope", "--", "true", check=False)
    assert missing.returncode == 1 and "no environment named 'nope'" in missing.stderr
    gpu = cli.run("env", "create", "g", "--require", "gpu,python", check=False)
    assert gpu.returncode == 1 and "no provider offers gpu, python" in gpu.stderr
    assert "worktree lacks gpu" in gpu.stderr
    cli.run("env", "create", "wt")
    both = cli.run(
        "run", "start", "--env", "wt", "--snapshot", "x", "--thread", "y", "--", "true",
        check=False,
    )  # fmt: skip
    assert both.returncode == 2
    assert cli.items("run", "list") == []


def test_cli_env_commands(cli: Cli) -> None:
    cli.run("init")
    created = cli.json("env", "create", "wt", "--no-start")
    assert created["state"] == "created"
    assert cli.json("env", "start", "wt")["state"] == "running"
    out = cli.run("env", "exec", "wt", "--", "sh", "-c", "echo hi; exit 4", check=False)
    assert (out.returncode, out.stdout) == (4, "hi\n")
    assert "hi" in cli.items("env", "logs", "wt")
    assert [e["name"] for e in cli.items("env", "list")] == ["wt"]
    health = [{"name": "wt", "health": "ok", "state": "running", "detail": ""}]
    assert cli.items("env", "health") == health
    assert cli.json("env", "stop", "wt")["state"] == "stopped"
    assert cli.json("env", "delete", "wt")["state"] == "archived"
    assert cli.items("env", "list") == []
    assert len(cli.items("env", "list", "--all")) == 1
    assert cli.items("env", "sweep") == []


def test_cli_env_watch_reconnects_and_reports(cli: Cli) -> None:
    cli.run("init")
    record = cli.json("env", "create", "wt")
    __import__("shutil").rmtree(record["resource_id"])
    out = cli.run("env", "watch", "--interval", "0.1", "--count", "1")
    assert "wt: gone (not_available)" in out.stderr
    assert out.stdout.split() == ["wt", "gone", "not_available"]


def test_api_run_from_a_chosen_snapshot(store: Store, workspace: Path) -> None:
    first = take_snapshot(store).snapshot
    (workspace / "README.md").write_text("# changed later\n")
    take_snapshot(store)
    manager = EnvironmentManager(store)
    manager.create("wt")
    outcome = run_isolated(
        manager,
        "wt",
        ["sh", "-c", "cat README.md; echo done > out.txt"],
        pick_base(manager, first.id),
    )
    assert outcome.exit_code == 0 and outcome.base.id == first.id
    assert outcome.result is not None
    assert store.odb.repo()[outcome.result.tree]["README.md"].data == b"# demo\n"
    run = list_runs(store)[0]
    assert run.result_snapshot == outcome.result.id and run.base_snapshot == first.id
    assert get_thread(store, run.thread_id).forked_from == first.id
    assert resolve_snapshot(store, outcome.result.id).parent == first.id


def test_api_run_that_changes_nothing_reports_the_base(store: Store) -> None:
    manager = EnvironmentManager(store)
    manager.create("wt")
    base = pick_base(manager)
    outcome = run_isolated(manager, "wt", ["true"], base)
    assert outcome.result is not None and outcome.result.tree == base.tree
    assert outcome.run.status == "succeeded"


def test_a_direct_run_does_not_load_the_gateway_for_a_plain_environment() -> None:
    """The tools node (and with it the gateway's config, router and protocol) serves hybrid
    environments only: a direct run elsewhere does not pay for importing it at start."""
    script = (
        "import sys, gateway.hub.direct\n"
        "print(sorted(m for m in ('gateway.hub.tools_node', 'gateway.config', 'gateway.router')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
