"""What runs cost, through the real CLI (issue 14, item 8): ``run show`` and ``env show`` report
wall time, CPU time, peak memory and bytes each way, measured from outside the environment by
the hub and the provider, with the phases of the run in the same record."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, store_dir_of
from tests.gateway.hub.hub_support import events, start

# runs that burn CPU and memory on purpose (~30 s): make test-long (CI runs it), so that make
# test keeps a margin under ten minutes
pytestmark = [pytest.mark.timeout(180), pytest.mark.long]

MIB = 1024 * 1024
NAP = 1.5
"""Seconds the sleeping agent sleeps."""

#: Burns about 0.6 s of CPU holding 120 MiB it wrote to (so it is resident), and keeps them a
#: moment longer, long enough for a provider that samples memory to see them.
BURN = textwrap.dedent(
    """
    import time
    held = b"x" * (120 * 1024 * 1024)
    started = time.process_time()
    while time.process_time() - started < 0.6:
        pass
    time.sleep(0.8)
    print(len(held))
    """
)

HUB_PHASES = ["prepare", "connect", "restore", "agent", "collect", "record"]
"""The phases of a run through the hub, in order (``gateway.hub.usage_records``)."""
DIRECT_PHASES = ["base", "lease", "start", "restore", "agent", "collect", "screen", "record"]
"""The phases of a direct run, in order (:func:`gateway.hub.direct.run_isolated`)."""

USAGE_KEYS = {
    "wall_seconds",
    "cpu_seconds",
    "peak_memory_bytes",
    "bytes_to_environment",
    "bytes_from_environment",
    "measured_by",
    "phases",
}


def usage_of(cli: Cli, run_id: str) -> dict[str, Any]:
    usage = cli.json("run", "show", run_id)["usage"]
    assert set(usage) == USAGE_KEYS, usage
    return dict(usage)


def burn_and_nap(cli: Cli, workspace: Path, env: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the burning agent, then the sleeping one, in ``env`` through the hub: their runs."""
    (workspace / "burn.py").write_text(BURN)
    burn = start(cli, "--env", env, "--", sys.executable, "burn.py")
    nap = start(cli, "--env", env, "--", "sleep", str(NAP))
    assert burn["status"] == nap["status"] == "succeeded", (burn, nap)
    return burn, nap


def check_hub_run_usage(
    cli: Cli, workspace: Path, burn: dict[str, Any], nap: dict[str, Any], measured_by: str
) -> None:
    """The two runs' records, against what the agents did and what the hub logged."""
    hot, idle = usage_of(cli, burn["id"]), usage_of(cli, nap["id"])
    for run, usage in ((burn, hot), (nap, idle)):
        assert measured_by in usage["measured_by"], usage
        assert list(usage["phases"]) == HUB_PHASES, usage
        assert usage["wall_seconds"] == pytest.approx(sum(usage["phases"].values()), abs=0.01)
        # the hub counted what it served the runtime and what it pulled back: the bundle sizes
        log = events(store_dir_of(workspace), run["id"])
        shipped = next(e for e in log if e["type"] == "snapshot.shipped")
        collected = next(e for e in log if e["type"] == "result.collected")
        assert usage["bytes_to_environment"] == shipped["bytes"] > 0
        assert usage["bytes_from_environment"] == collected["bytes"] > 0
    assert idle["wall_seconds"] >= NAP and idle["phases"]["agent"] >= NAP, idle
    # the burning agent's CPU and memory show, on top of what the runtime itself costs
    assert hot["cpu_seconds"] - idle["cpu_seconds"] >= 0.4, (hot, idle)
    assert hot["peak_memory_bytes"] >= 120 * MIB > idle["peak_memory_bytes"], (hot, idle)
    assert idle["cpu_seconds"] < 1.0, idle  # a sleeping agent costs about the runtime's start

    shown = cli.run("run", "show", burn["id"]).stdout
    assert "s CPU, 1" in shown and "MiB peak" in shown and f"(measured by {measured_by}" in shown

    env = cli.json("env", "show", burn["environment"])["usage"]
    assert env["runs"] == 2
    assert env["cpu_seconds"] == pytest.approx(hot["cpu_seconds"] + idle["cpu_seconds"], abs=1e-3)
    assert env["peak_memory_bytes"] == hot["peak_memory_bytes"]
    for key in ("bytes_to_environment", "bytes_from_environment"):
        assert env[key] == hot[key] + idle[key]
    assert env["phases"]["agent"] == pytest.approx(
        hot["phases"]["agent"] + idle["phases"]["agent"], abs=1e-3
    )
    assert "usage over 2 run(s):" in cli.run("env", "show", burn["environment"]).stdout


@pytest.mark.parametrize("provider", ["worktree", "local"])
def test_run_and_env_show_report_what_hub_runs_cost(
    cli: Cli, workspace: Path, tmp_path: Path, provider: str
) -> None:
    cli.run("init")
    extra = ["--config", f"path={tmp_path / 'local-env'}"] if provider == "local" else []
    cli.run("env", "create", "box", "--provider", provider, *extra)
    burn, nap = burn_and_nap(cli, workspace, "box")
    check_hub_run_usage(cli, workspace, burn, nap, f"{provider}: wait4 rusage")
    # measured around the sandbox, not inside it
    assert "in its bwrap sandbox" in usage_of(cli, burn["id"])["measured_by"]


def test_direct_run_reports_its_cost_without_bytes(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    (workspace / "burn.py").write_text(BURN)
    burn = start(cli, "--direct", "--env", "box", "--", sys.executable, "burn.py")
    nap = start(cli, "--direct", "--env", "box", "--", "sleep", str(NAP))
    hot, idle = usage_of(cli, burn["id"]), usage_of(cli, nap["id"])
    for usage in (hot, idle):
        assert list(usage["phases"]) == DIRECT_PHASES, usage
        assert usage["wall_seconds"] == pytest.approx(sum(usage["phases"].values()), abs=0.01)
        # no bundle travels: the provider copies the files itself
        assert usage["bytes_to_environment"] is None and usage["bytes_from_environment"] is None
        assert (
            "worktree: wait4 rusage of the command (in its bwrap sandbox)" in usage["measured_by"]
        )
    assert hot["cpu_seconds"] >= 0.5 and hot["peak_memory_bytes"] >= 120 * MIB, hot
    assert idle["phases"]["agent"] >= NAP and idle["cpu_seconds"] < 0.3, idle
    assert idle["peak_memory_bytes"] < 80 * MIB, idle
    assert "KiB in" not in cli.run("run", "show", nap["id"]).stdout  # unknown, not zero
    assert "in unknown / out unknown" in cli.run("run", "show", nap["id"]).stdout


def test_a_manual_run_has_no_usage_and_env_show_counts_none(cli: Cli) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    run = cli.json("run", "start", "--manual")
    assert "usage" not in cli.json("run", "show", run["id"])
    env = cli.json("env", "show", "box")["usage"]
    assert env["runs"] == 0 and env["cpu_seconds"] is None and env["phases"] == {}


def test_env_show_counts_only_the_runs_of_this_environment_not_an_earlier_one_of_its_name(
    cli: Cli,
) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    start(cli, "--direct", "--env", "box", "--", "true")
    assert cli.json("env", "show", "box")["usage"]["runs"] == 1
    cli.run("env", "delete", "box")
    cli.run("env", "create", "box", "--provider", "worktree")
    assert cli.json("env", "show", "box")["usage"]["runs"] == 0
