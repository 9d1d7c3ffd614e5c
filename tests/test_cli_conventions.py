"""Machine-facing conventions of the CLI (issue 14 item 6): with ``--json`` an error is one
JSON document on stdout (``{"error": {"code", "message"}}``, exit 1; usage errors exit 2), and
the global options work in any position before ``--`` (after it, they belong to the command)."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Cli


def test_a_json_error_is_one_document_on_stdout(cli: Cli, workspace: Path) -> None:
    proc = cli.run("show", "snap-doesnotexist", "--json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {
        "error": {"code": "store_not_found", "message": json.loads(proc.stdout)["error"]["message"]}
    }
    assert proc.stderr == ""
    cli.run("init")
    proc = cli.run("show", "snap-doesnotexist", "--json", check=False)
    error = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and error["code"] == "snapshot_not_found", proc
    assert "snap-doesnotexist" in error["message"]


def test_a_usage_error_with_json_exits_2_with_a_document(cli: Cli, workspace: Path) -> None:
    proc = cli.run("log", "--no-such-option", "--json", check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "usage"
    plain = cli.run("log", "--no-such-option", check=False)
    assert plain.returncode == 2 and "Usage:" in plain.stderr and plain.stdout == ""


def test_without_json_an_error_is_one_line_on_stderr(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    proc = cli.run("show", "snap-doesnotexist", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("narrative: error: ") and proc.stderr.count("\n") == 1


def test_global_options_after_the_subcommand(cli: Cli, workspace: Path, tmp_path: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    quiet = cli.run("snapshot", "-m", "one", "-q")
    assert quiet.stderr == ""
    elsewhere = Cli(tmp_path)
    assert elsewhere.json("log", "-C", str(workspace))[0]["message"] == "one"
    assert elsewhere.json("log", "--json", "-C", str(workspace), "-n", "1")[0]["message"] == "one"
    store = cli.json("info")["store"]
    assert elsewhere.json("log", "--store", store)[0]["message"] == "one"
    nested = elsewhere.json("thread", "list", "-C", str(workspace))
    assert len(nested) == 1


def test_options_after_double_dash_belong_to_the_command(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    proc = cli.run("env", "exec", "box", "--", "echo", "-v", "-q", "--json", "-C", "x")
    assert proc.stdout.strip() == "-v -q --json -C x"
