"""``run start`` without a command (issue 14 item 5): only with ``--manual``; such a run is
listed as waiting for ``run finish`` with its age, and swept as abandoned (cancelled, with the
reason) after ``config manual_run_timeout``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import Cli


def test_a_run_without_a_command_needs_manual(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    proc = cli.run("run", "start", check=False)
    assert proc.returncode == 2 and "--manual" in proc.stderr
    assert cli.items("run", "list") == []  # nothing recorded
    both = cli.run("run", "start", "--manual", "--", "true", check=False)
    assert both.returncode == 2 and "--manual" in both.stderr


def test_a_manual_run_waits_for_finish_and_is_swept_when_abandoned(
    cli: Cli, workspace: Path
) -> None:
    cli.run("init")
    kept = cli.json("run", "start", "--manual", "--agent", "me")
    listed = cli.items("run", "list")
    assert listed[0]["id"] == kept["id"] and listed[0]["manual"] is True
    assert listed[0]["waiting"].startswith("run finish (") and listed[0]["age_seconds"] >= 0
    assert "run finish (" in cli.run("run", "list").stdout
    cli.run("run", "finish", kept["id"], "--exit-code", "0")
    assert cli.json("run", "show", kept["id"])["status"] == "succeeded"

    cli.run("config", "manual_run_timeout", "1s")
    left = cli.json("run", "start", "--manual", "--agent", "forgetful")
    time.sleep(1.5)
    proc = cli.run("run", "list", "--json")
    assert "abandoned" in proc.stderr
    swept = {r["id"]: r for r in json.loads(proc.stdout)["items"]}[left["id"]]
    assert swept["status"] == "cancelled" and "abandoned" in swept["reason"]
    assert swept["waiting"] == ""
    late = cli.run("run", "finish", left["id"], check=False)
    assert late.returncode == 1 and "already finished" in late.stderr
    assert cli.json("run", "show", kept["id"])["status"] == "succeeded"  # finished: untouched
