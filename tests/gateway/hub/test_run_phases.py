"""Each phase of a run is timed and reported by ``run show`` (issue 18, run start): a direct
run's by the CLI's clock, a hub run's by the hub's events. The phases are checked for presence,
order and that they add up to the run's wall time, never for how long they took."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.gateway.hub.hub_support import start
from tests.gateway.hub.test_usage import DIRECT_PHASES, HUB_PHASES, usage_of


def check_phases(cli: Cli, run_id: str, expected: list[str]) -> None:
    usage = usage_of(cli, run_id)
    phases = usage["phases"]
    assert list(phases) == expected, usage
    assert all(seconds >= 0 for seconds in phases.values()), usage
    assert usage["wall_seconds"] == pytest.approx(sum(phases.values()), abs=0.01), usage
    shown = cli.run("run", "show", run_id).stdout
    line = next(text for text in shown.splitlines() if text.startswith("phases: "))
    assert [part.split()[0] for part in line[len("phases: ") :].split(", ")] == expected, line


def test_a_direct_run_reports_each_of_its_phases(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("env", "create", "box", "--provider", "worktree")
    run = start(cli, "--direct", "--env", "box", "--", "sh", "-c", "echo b > b.txt; sleep 0.3")
    assert run["status"] == "succeeded", run
    check_phases(cli, run["id"], DIRECT_PHASES)
    assert usage_of(cli, run["id"])["phases"]["agent"] >= 0.3


def test_a_hub_run_reports_each_of_its_phases(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("env", "create", "box", "--provider", "worktree")
    run = start(cli, "--env", "box", "--", "sh", "-c", "echo b > b.txt; sleep 0.3")
    assert run["status"] == "succeeded", run
    check_phases(cli, run["id"], HUB_PHASES)
    assert usage_of(cli, run["id"])["phases"]["agent"] >= 0.3
