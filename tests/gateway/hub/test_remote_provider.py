"""The ``remote`` provider on one machine: a real ``narrative serve`` (hub B) with a worktree
environment ``box``, a developer logged in to it, and the developer's own store (A) whose
environment ``far`` is a private clone of ``box`` there. The provider contract runs against it,
and runs started at A go to B and come home. tests/multihost/test_topologies.py runs the chain
A → B → C between three hosts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from providers.contract import CHECKS, ContractTarget
from tests.conftest import NARRATIVE, Cli
from tests.gateway.hub.hub_support import serve

# a served hub and many sessions (about a minute): make test-long, which CI runs too
pytestmark = [pytest.mark.long, pytest.mark.timeout(300)]


@dataclass
class RemoteLab:
    hub_cli: Cli
    hub_workspace: Path
    dev: Cli
    dev_workspace: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dev.run(*args, env=self.env, check=check)

    def json(self, *args: str) -> dict[str, object]:
        return dict(json.loads(self.run(*args, "--json").stdout))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[RemoteLab]:
    root = tmp_path / "remote"
    hub_ws, dev_ws, home = root / "hub", root / "dev", root / "home-dev"
    hub_ws.mkdir(parents=True)
    dev_ws.mkdir()
    (hub_ws / "README.md").write_text("# the hub's own files\n")
    (dev_ws / "notes.txt").write_text("draft\n")
    hub_cli, dev = Cli(hub_ws), Cli(dev_ws)
    hub_cli.run("init")
    hub_cli.run("env", "create", "box", "--provider", "worktree")
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
    }
    with serve(hub_cli, hub_ws) as info:
        code = hub_cli.json("hub", "invite", "dev")["code"]
        dev.run("init", env=env)
        dev.run("hub", "login", info["url"], code, "--name", "b", env=env)
        yield RemoteLab(hub_cli, hub_ws, dev, dev_ws, env)


@pytest.fixture
def as_developer(lab: RemoteLab, monkeypatch: pytest.MonkeyPatch) -> RemoteLab:
    """This process reads the developer's logins (the contract drives the provider here)."""
    for name, value in lab.env.items():
        monkeypatch.setenv(name, value)
    return lab


@pytest.mark.parametrize("check", list(CHECKS))
def test_contract(as_developer: RemoteLab, check: str, tmp_path: Path) -> None:
    target = ContractTarget("remote", {"hub": "b", "environment": "box"})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    CHECKS[check](target, scratch)


def test_a_run_goes_to_the_hub_and_its_result_comes_home(lab: RemoteLab) -> None:
    created = lab.json(
        "env", "create", "far", "--provider", "remote",
        "--config", "hub=b", "--config", "environment=box",
    )  # fmt: skip
    clone = str(created["resource_id"])
    # the clone is the developer's own environment on the hub, not its template
    listed = lab.hub_cli.json("env", "list", "--all")["items"]
    assert isinstance(listed, list)
    names = {e["name"] for e in listed}
    assert {"box", clone} <= names, names
    script = "cat notes.txt; pwd; echo from the hub >> notes.txt; echo err >&2"
    done = lab.run("-q", "run", "start", "--env", "far", "--", "sh", "-c", script)
    run_id = done.stdout.split()[-1]
    assert "draft" in done.stderr and "err" in done.stderr, done.stderr
    # the command ran in the hub's checkout of the clone, not in anything of the developer's
    assert str(lab.dev_workspace) not in done.stderr
    shown = lab.json("run", "show", run_id)
    assert shown["status"] == "succeeded", shown
    lab.run("merge", run_id)
    assert (lab.dev_workspace / "notes.txt").read_text() == "draft\nfrom the hub\n"
    for info in (lab.json("info"), lab.hub_cli.json("info")):
        fsck = subprocess.run(
            ["git", "--git-dir", info["store"], "fsck", "--strict"],
            check=False,
            capture_output=True,
            text=True,
        )
        assert fsck.returncode == 0, fsck.stderr


def test_stopping_a_run_stops_it_on_the_hub(lab: RemoteLab) -> None:
    lab.run("env", "create", "slow", "--provider", "remote",
            "--config", "hub=b", "--config", "environment=box")  # fmt: skip
    script = "echo started; echo partial > partial.txt; exec sleep 300"
    proc = subprocess.Popen(
        [NARRATIVE, "-q", "run", "start", "--env", "slow", "--", "sh", "-c", script],
        cwd=lab.dev_workspace,
        env={**os.environ, **lab.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = _running_run(lab.json)
        _running_run(lab.hub_cli.json)  # delegated: it runs on the hub now
        _said(lab, run_id, "started")  # and its agent has written partial.txt there
        lab.run("run", "stop", run_id, "--grace", "2")
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    shown = lab.json("run", "show", run_id)
    assert shown["status"] == "cancelled", (shown, err)
    # the hub's run of it is over too, and what it wrote came home
    hub_runs = lab.hub_cli.json("run", "list")["items"]
    assert isinstance(hub_runs, list)
    assert all(r["status"] != "running" for r in hub_runs), hub_runs
    diff = lab.run("diff", run_id, "--allow-failed").stdout
    assert "partial.txt" in diff, diff


def test_killing_a_run_kills_it_on_the_hub(lab: RemoteLab) -> None:
    lab.run("env", "create", "doomed", "--provider", "remote",
            "--config", "hub=b", "--config", "environment=box")  # fmt: skip
    proc = subprocess.Popen(
        [NARRATIVE, "-q", "run", "start", "--env", "doomed", "--", "sleep", "300"],
        cwd=lab.dev_workspace,
        env={**os.environ, **lab.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = _running_run(lab.json)
        hub_run = _running_run(lab.hub_cli.json)
        lab.run("run", "kill", run_id)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert lab.json("run", "show", run_id)["status"] == "killed"
    # the runtime here died at once; the run it delegated was killed there too
    deadline = time.monotonic() + 30
    while lab.hub_cli.json("run", "show", hub_run)["status"] == "running":
        assert time.monotonic() < deadline, "the hub's run outlived the kill"
        time.sleep(0.2)
    assert lab.hub_cli.json("run", "show", hub_run)["status"] == "killed"


def _said(lab: RemoteLab, run_id: str, text: str, timeout: float = 60) -> None:
    """Wait until the run's output (as it came home) holds ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = lab.json("run", "show", run_id)["events"]
        assert isinstance(events, list)
        if text in "".join(e.get("data", "") for e in events if e["type"] == "agent.output"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run never said {text!r}")


def _running_run(listing: Callable[..., Any], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = listing("run", "list")["items"]
        assert isinstance(items, list)
        running = [r for r in items if r["status"] == "running"]
        if running:
            return str(running[0]["id"])
        time.sleep(0.2)
    raise AssertionError("no run started")
