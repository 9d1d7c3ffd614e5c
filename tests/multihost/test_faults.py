"""Faults between hosts during a run on an ``ssh`` environment (issue 16).

The developer's machine ``dev`` serves the hub (``narrative serve`` on its loopback, so the box
reaches it only through the SSH tunnel) and the box runs an agent that prints ``tick 1`` ..
``tick N``, one a second, then writes ``fin.txt``. After each fault: the run ends in the state
that matches what happened, its output holds every tick exactly once, the runtime reconnected
within 30 s of the link coming back (:data:`RECONNECT_WITHIN`), and the developer's store
passes ``git fsck --strict``.

Marker ``faults`` (``make test-faults``, run by CI); all of them together stay under ten
minutes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Network, make_ssh_key
from tests.multihost.ssh_hosts import Lab, make_lab

pytestmark = pytest.mark.faults

RECONNECT_WITHIN = 30.0
"""Seconds within which a runtime is connected again once its link is back (issue 16)."""


@pytest.fixture
def lab(tmp_path: Path, wheelhouse: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    require_namespaces()
    key = make_ssh_key(tmp_path / "id_ed25519")
    with Network(request.node.name) as network:
        lab = make_lab(network, key, wheelhouse)
        lab.init_workspace({"notes.txt": "draft\n"})
        lab.narrative("env", "create", "far", "--provider", "ssh", *lab.config())
        yield lab


class Hub:
    """``narrative serve`` on the developer's machine, which can be killed and restarted."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        dev = self.lab.dev
        self.proc = dev.popen(
            [dev.narrative(), "serve", "--port", "0", "--json"],
            env=dev.checkout_env(),
            cwd=self.lab.workspace(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready = json.loads(self.proc.stdout.readline())
        assert ready["kind"] == "hub_ready", ready

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        # the hub's own children (none expected) die with the popen's process group
        self.lab.dev.run(["pkill", "-KILL", "-f", "narrative serve"], check=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def hub(lab: Lab) -> Iterator[Hub]:
    served = Hub(lab)
    served.start()
    yield served
    served.stop()


TICKS = 20


def start_run(lab: Lab, ticks: int = TICKS) -> tuple[subprocess.Popen[bytes], str]:
    """Start the ticking agent on the box through the served hub; the CLI process and the
    run's id once it is recorded."""
    script = f"for i in $(seq 1 {ticks}); do echo tick $i; sleep 1; done; echo done > fin.txt"
    dev = lab.dev
    cli = dev.popen(
        [dev.narrative(), "run", "start", "--env", "far", "--", "sh", "-c", script],
        env=dev.checkout_env(),
        cwd=lab.workspace(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = lab.json("run", "list")["items"]
        started = [r["id"] for r in runs if r["status"] == "running"]
        if started:
            wait_for_event(lab, started[0], "agent.started", 60)
            return cli, started[0]
        time.sleep(0.3)
    raise AssertionError("the run was not recorded")


def events(lab: Lab, run_id: str) -> list[dict[str, Any]]:
    return list(lab.json("run", "show", run_id)["events"])


def wait_for_event(
    lab: Lab, run_id: str, kind: str, timeout: float, after: int = 0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(lab, run_id):
            if event["type"] == kind and event["seq"] > after:
                return event
        time.sleep(0.5)
    raise AssertionError(f"no {kind} event within {timeout:g}s")


def wait_finished(lab: Lab, run_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = lab.json("run", "show", run_id)
        if shown["status"] != "running":
            return dict(shown)
        time.sleep(1)
    raise AssertionError(f"run {run_id} still running after {timeout:g}s")


def ticks_of(shown: dict[str, Any]) -> list[str]:
    text = "".join(e.get("data", "") for e in shown["events"] if e["type"] == "agent.output")
    return [line for line in text.splitlines() if line.startswith("tick")]


def assert_complete(lab: Lab, shown: dict[str, Any], ticks: int = TICKS) -> None:
    """The run succeeded, every tick arrived exactly once and in order, its result holds the
    agent's file, and the developer's store passes git fsck."""
    assert shown["status"] == "succeeded", (
        shown["status"],
        shown.get("reason"),
        shown["events"][-5:],
    )
    assert ticks_of(shown) == [f"tick {i}" for i in range(1, ticks + 1)], ticks_of(shown)
    diff = lab.narrative("diff", shown["id"]).stdout.decode()
    assert "fin.txt" in diff, diff
    lab.assert_store_sound()


def reconnected_within(lab: Lab, run_id: str, link_back: float, after: int) -> float:
    """Seconds from the link coming back (a wall-clock time) to the runtime's reconnection."""
    connected = wait_for_event(lab, run_id, "runtime.connected", RECONNECT_WITHIN + 15, after)
    at = datetime.fromisoformat(connected["time"].replace("Z", "+00:00")).timestamp()
    return at - link_back


def _last_seq(lab: Lab, run_id: str) -> int:
    return max(e["seq"] for e in events(lab, run_id))


@pytest.mark.parametrize("down_for", [5, 60], ids=["5s", "60s"])
def test_link_drop_between_hub_and_environment(lab: Lab, hub: Hub, down_for: int) -> None:
    """The box's link goes down mid-run for 5 s, then 60 s: the run goes on, reconnects within
    30 s of the link's return, and loses and repeats no output."""
    ticks = TICKS if down_for < 30 else down_for + 15
    cli, run_id = start_run(lab, ticks)
    time.sleep(3)
    seen = _last_seq(lab, run_id)
    lab.box.link_down()
    time.sleep(down_for)
    assert lab.json("run", "show", run_id)["status"] == "running"
    lab.box.link_up()
    back = time.time()
    if down_for > 10:  # long enough for the hub to have noticed the disconnection
        assert reconnected_within(lab, run_id, back, seen) <= RECONNECT_WITHIN
    shown = wait_finished(lab, run_id)
    assert_complete(lab, shown, ticks)
    cli.wait(30)


def test_latency_and_loss(lab: Lab, hub: Hub) -> None:
    """300 ms each way and 5 % loss on the box's link for the whole run: it completes."""
    lab.box.netem(delay_ms=300, loss_pct=5)
    try:
        cli, run_id = start_run(lab, 10)
        shown = wait_finished(lab, run_id)
    finally:
        lab.box.clear_netem()
    assert_complete(lab, shown, 10)
    cli.wait(30)


def test_hub_killed_and_restarted(lab: Lab, hub: Hub) -> None:
    """SIGKILL of the hub mid-run and a new one started: it adopts the run when the runtime
    reconnects (through a new tunnel), and the run completes with all its output."""
    cli, run_id = start_run(lab)
    time.sleep(3)
    hub.kill()  # the command goes on following the run's event log in the store
    time.sleep(3)
    seen = _last_seq(lab, run_id)
    hub.start()
    back = time.time()
    assert reconnected_within(lab, run_id, back, seen) <= RECONNECT_WITHIN
    assert_complete(lab, wait_finished(lab, run_id))
    assert cli.wait(60) == 0  # and ends with it, successfully


def test_remote_host_reboots(lab: Lab, hub: Hub) -> None:
    """The box reboots mid-run (every process killed, /tmp cleared): the run is failed, not
    left running nor reported succeeded; the agent's partial output is kept; the environment
    (its home survived) serves the next run."""
    cli, run_id = start_run(lab, 60)
    time.sleep(4)
    lab.box.reboot()
    shown = wait_finished(lab, run_id, timeout=120)
    assert shown["status"] == "failed", shown["status"]
    assert ticks_of(shown)[:2] == ["tick 1", "tick 2"]
    cli.wait(30)
    lab.assert_store_sound()
    # the environment is marked as in error (its runtime was lost); started again, it serves
    assert lab.json("env", "show", "far")["state"] == "error"
    lab.narrative("env", "start", "far")
    again = lab.narrative("run", "start", "--env", "far", "--", "sh", "-c", "echo after > a.txt")
    assert again.returncode == 0


def test_ssh_server_restarts(lab: Lab, hub: Hub) -> None:
    """sshd restarts mid-run (its listener, not the established connection): the run
    completes; a new connection works afterwards."""
    cli, run_id = start_run(lab)
    time.sleep(3)
    lab.box.restart_sshd()
    assert_complete(lab, wait_finished(lab, run_id))
    cli.wait(30)
    lab.narrative("env", "show", "far")
