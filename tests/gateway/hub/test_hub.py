"""Runs through the hub end to end, on one machine: the real ``narrative`` executable, runtimes
started by the worktree provider that connect back over loopback with run-scoped tokens,
bundles along the chain, capability calls routed across environments, and the faults a hub
must survive (dropped connections, expiring tokens, a restarted hub, stop and kill).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.hub.client import follow_runs
from gateway.hub.events import RunEventLog
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from narrative.hierarchy import get_run, list_threads
from narrative.history import resolve_snapshot
from narrative.store import Store
from tests.conftest import NARRATIVE, Cli, git, store_dir_of
from tests.gateway.hub.hub_support import (
    AGENT,
    FAILING_RUNTIME,
    PLUGIN,
    ROUTING,
    check_failing_runtime,
    counting_agent,
    events,
    file,
    free_port,
    output,
    output_raw,
    serve,
    start,
    types,
    until,
    user_files,
    wait_for_output,
)
from tests.gateway.hub.hub_support import (
    routes as routes_of,
)

pytestmark = pytest.mark.timeout(180) if hasattr(pytest.mark, "timeout") else []


@pytest.fixture
def hub_cli(cli: Cli, workspace: Path) -> Cli:
    cli.run("init")
    cli.run("env", "create", "sandbox", "--provider", "worktree")
    return cli


def test_run_through_an_embedded_hub_ships_bundles_both_ways(hub_cli: Cli, workspace: Path) -> None:
    before = user_files(workspace)
    proc = hub_cli.run(
        "run", "start", "--env", "sandbox", "--json", "--",
        "sh", "-c", "echo working; echo changed >> README.md; echo new > new.txt; rm src/app.py",
    )  # fmt: skip
    run = json.loads(proc.stdout)
    assert "working" in proc.stderr
    assert run["status"] == "succeeded" and run["exit_code"] == 0
    assert user_files(workspace) == before
    names = hub_cli.run("diff", run["id"], "--name-status").stdout
    assert sorted(names.splitlines()) == ["A\tnew.txt", "D\tsrc/app.py", "M\tREADME.md"]
    history = events(store_dir_of(workspace), run["id"])
    kinds = types(history)
    for expected in (
        "run.created",
        "runtime.spawned",
        "runtime.connected",
        "snapshot.shipped",
        "agent.started",
        "agent.output",
        "agent.exited",
        "result.collected",
        "run.finished",
    ):
        assert expected in kinds, kinds
    assert kinds.index("snapshot.shipped") < kinds.index("agent.started")
    assert (
        kinds.index("agent.exited") < kinds.index("result.collected") < kinds.index("run.finished")
    )
    collected = history[kinds.index("result.collected")]
    assert collected["threads"] == [run["thread"]]  # the runtime's own bookkeeping stays there
    assert kinds[-1] == "run.finished"
    assert hub_cli.json("env", "show", "sandbox")["state"] == "running"
    shipped = history[kinds.index("snapshot.shipped")]
    assert shipped["bytes"] > 0 and shipped["snapshot"] == run["base_snapshot"]
    # the result came back with its hierarchy: the snapshot names the run and its thread
    result = hub_cli.json("show", run["result_snapshot"])
    assert result["run"] == run["id"] and result["thread"] == run["thread"]
    git("fsck", "--strict", cwd=store_dir_of(workspace))
    # no hub left announced, no runtime left running
    assert not list((store_dir_of(workspace) / "narrative" / "hubs").glob("*.json"))
    spawned = history[kinds.index("runtime.spawned")]
    assert spawned["handle"]
    shown = hub_cli.run("run", "show", run["id"]).stdout
    assert "agent.exited" in shown and "run.finished" in shown


def test_agent_output_arrives_byte_for_byte(hub_cli: Cli, workspace: Path) -> None:
    # every byte value, and a character cut across two writes with a pause between them
    agent = (
        "import sys, time; out = sys.stdout.buffer; out.write(bytes(range(256))); out.flush();"
        "out.write('✓'.encode()[:2]); out.flush(); time.sleep(0.3);"
        "out.write('✓'.encode()[2:] + b'\\n'); out.flush(); sys.stderr.write('é\\n')"
    )
    proc = subprocess.run(
        [NARRATIVE, "run", "start", "--env", "sandbox", "--", sys.executable, "-c", agent],
        cwd=workspace,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    expected = bytes(range(256)) + "✓\n".encode()
    assert proc.stdout.startswith(expected), proc.stdout[:300]
    assert "é\n".encode() in proc.stderr
    run_id = proc.stdout[len(expected) :].split()[0].decode()
    history = events(store_dir_of(workspace), run_id)
    assert output_raw(history, "stdout") == expected
    assert output(history, "stderr") == "é\n"
    assert "✓" in hub_cli.run("run", "show", run_id).stdout


def test_failed_timed_out_and_second_runs_reuse_the_environment(hub_cli: Cli) -> None:
    failed = hub_cli.run(
        "run", "start", "--env", "sandbox", "--", "sh", "-c", "exit 5", check=False
    )
    assert failed.returncode == 1 and "failed" in failed.stderr
    slow = hub_cli.run(
        "run", "start", "--env", "sandbox", "--timeout", "1", "--json", "--", "sleep", "30",
        check=False,
    )  # fmt: skip
    data = json.loads(slow.stdout)
    assert slow.returncode == 1 and data["timed_out"] and data["exit_code"] == 124
    ok = start(hub_cli, "--env", "sandbox", "--", "cat", "README.md")
    assert ok["status"] == "succeeded"
    runs = hub_cli.items("run", "list")
    assert [(r["status"], r["exit_code"]) for r in runs] == [
        ("failed", 5),
        ("failed", 124),
        ("succeeded", 0),
    ]
    assert all(r["result_snapshot"] for r in runs)


def test_runtime_failing_at_once_shows_its_output(hub_cli: Cli, workspace: Path) -> None:
    runtime = json.dumps(FAILING_RUNTIME)
    hub_cli.run(
        "env", "create", "broken", "--provider", "worktree", "--config", f"runtime={runtime}"
    )
    check_failing_runtime(hub_cli, workspace, "broken")
    # the next runtime's output starts after it in the shared file, and a run's event
    # carries only its own runtime's lines
    again = hub_cli.run("run", "start", "--env", "broken", "--json", "--", "true", check=False)
    run = json.loads(again.stdout)
    history = events(store_dir_of(workspace), run["id"])
    assert [e["lines"] for e in history if e["type"] == "runtime.log"] == [["boom-marker"]]
    lines = hub_cli.items("env", "logs", "broken", "--runtime")
    assert lines.count("boom-marker") == 2 and lines[-1] == "boom-marker"


def test_agent_calls_are_routed_and_the_routes_recorded(
    hub_cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    (workspace / "agent.py").write_text(AGENT)
    (workspace / "proxyExecution.json").write_text(json.dumps(ROUTING))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "hub_inference.py").write_text(PLUGIN)
    # keep the caller's path: a worktree's code, not the installed one, serves the hub
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")]))
    }
    with serve(hub_cli, workspace, "--handlers", "hub_inference", env=env):
        run = start(
            hub_cli, "--env", "sandbox", "--",
            sys.executable, "agent.py", "inference:complete", "narrative:snapshot",
        )  # fmt: skip
    assert run["status"] == "succeeded", run
    snap = Store.open(str(store_dir_of(workspace)))
    result = json.loads(file(snap, run["result_snapshot"], "agent-result.json"))
    assert result["readme"] == "# demo\n"
    assert result["exec"]["stdout"].startswith("local\n")
    # exec ran in the environment's workspace, not in the user's
    assert result["exec"]["stdout"].split("\n")[1] != str(workspace)
    assert result["extra"]["inference:complete"] == {
        "completion": "4",
        "servedBy": "hub",
        "prompt": "2+2",
    }
    routes = routes_of(store_dir_of(workspace), run["id"])
    assert routes["fs:readFile"]["route"] == ["sandbox.agent", "sandbox", "hub"]
    assert routes["fs:readFile"]["ranIn"] == "hub"
    assert routes["exec:run"]["route"] == ["sandbox.agent", "sandbox"]
    assert routes["exec:run"]["ranIn"] == "sandbox"
    assert routes["inference:complete"]["ranIn"] == "hub"
    # a snapshot the agent took in its environment came home on the run's thread
    taken = resolve_snapshot(snap, result["extra"]["narrative:snapshot"]["snapshot"])
    assert taken.thread == run["thread"] and routes["narrative:snapshot"]["ranIn"] == "sandbox"
    assert taken.id not in (run["base_snapshot"], run["result_snapshot"])
    shown = hub_cli.run("run", "show", run["id"]).stdout
    assert "fs:readFile: sandbox.agent -> sandbox -> hub (ran in hub" in shown


def test_fan_out_to_three_environments_gathers_three_results(hub_cli: Cli, workspace: Path) -> None:
    hub_cli.run("env", "create", "b", "c", "--provider", "worktree")  # side by side
    fan_out = hub_cli.run(
        "run", "start", "--json", "--env", "sandbox", "--env", "b", "--env", "c", "--",
        "sh", "-c", 'echo "$NARRATIVE_ENVIRONMENT" > where.txt',
    )  # fmt: skip
    runs = json.loads(fan_out.stdout)["items"]
    progress = [line for line in fan_out.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and progress[-1].startswith("[3/3] ")  # a line per run as it ends
    assert all(line.endswith("succeeded (exit 0)") for line in progress)
    assert [r["environment"] for r in runs] == ["sandbox", "b", "c"]
    assert all(r["status"] == "succeeded" for r in runs)
    assert len({r["base_snapshot"] for r in runs}) == 1
    store = Store.open(str(store_dir_of(workspace)))
    for r in runs:
        assert file(store, r["result_snapshot"], "where.txt") == f"{r['environment']}\n"
        diff = hub_cli.run("diff", r["id"], "--name-status").stdout
        assert diff.splitlines() == ["A\twhere.txt"]


def test_chain_a_b_c_brings_both_narratives_home(hub_cli: Cli, workspace: Path) -> None:
    """A (the hub) runs B; B's agent forwards a run to C through B's runtime and merges C's
    result; A gets B's result and C's run with its thread, in one bundle."""
    script = textwrap.dedent(
        """
        set -e
        narrative env create c --provider worktree >/dev/null
        narrative run start --env c --json -- sh -c 'echo from-c > c.txt' > c-run.json
        run=$(python3 -c 'import json;print(json.load(open("c-run.json"))["id"])')
        narrative merge "$run" >/dev/null
        rm c-run.json
        echo from-b > b.txt
        """
    )
    (workspace / "chain.sh").write_text(script)
    bin_dir = str(Path(NARRATIVE).parent)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = start(hub_cli, "--env", "sandbox", "--", "sh", "chain.sh", env=env)
    assert run["status"] == "succeeded", run
    names = hub_cli.run("diff", run["id"], "--name-status").stdout.splitlines()
    assert sorted(names) == ["A\tb.txt", "A\tc.txt"]
    store = Store.open(str(store_dir_of(workspace)))
    threads = {t.name for t in list_threads(store)}
    assert any(name.startswith("run/c/") for name in threads), threads
    c_runs = [r for r in store.meta.all("runs") if r["environment"] == "c"]
    assert len(c_runs) == 1 and c_runs[0]["status"] == "succeeded"
    git("fsck", "--strict", cwd=store_dir_of(workspace))


def test_stop_and_kill(hub_cli: Cli, workspace: Path) -> None:
    (workspace / "patient.sh").write_text(
        "trap 'echo bye > bye.txt; exit 3' TERM\necho started\nwhile true; do sleep 0.1; done\n"
    )
    with serve(hub_cli, workspace):
        for action, expected in (("stop", "cancelled"), ("kill", "killed")):
            starter = subprocess.Popen(
                [NARRATIVE, "run", "start", "--env", "sandbox", "--json", "--", "sh", "patient.sh"],
                cwd=workspace,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            run_id = wait_for_output(workspace, "started")
            hub_cli.run("run", action, run_id)
            out, _err = starter.communicate(timeout=60)
            run = json.loads(out)
            assert run["status"] == expected
            assert run["result_snapshot"], run
            names = hub_cli.run(
                "diff", run_id, "--name-status", "--allow-failed"
            ).stdout.splitlines()
            if action == "stop":
                assert "A\tbye.txt" in names  # the agent got SIGTERM and cleaned up
                assert run["exit_code"] == 3
    again = hub_cli.run("run", "kill", run_id, check=False)
    assert again.returncode == 1 and "already finished" in again.stderr


# -- faults, with the hub in this process ---------------------------------------------------------


async def _drive(
    store: Store, request: RunRequest, during: Any, **hub_options: Any
) -> tuple[Any, list[dict[str, Any]]]:
    async with Hub(store, **hub_options) as hub:
        run = await hub.submit(request)
        await during(hub, run)
        await follow_runs(store, [run], lambda r, e: None)
        final = await hub.wait(run.id)
    return final, RunEventLog(store, run.id).read()


def test_dropped_connection_reconnects_and_loses_no_output(store: Store) -> None:
    from providers.manager import EnvironmentManager

    EnvironmentManager(store).create("sandbox")

    async def drop(hub: Hub, run: Any) -> None:
        log = RunEventLog(store, run.id)
        await until(lambda: "line-3" in output(log.read()))
        for ws in list(hub.gateway.connections.of("sandbox")):
            await ws.close()

    request = RunRequest("sandbox", counting_agent(30, 0.05))
    final, events = asyncio.run(_drive(store, request, drop))
    assert final.status == "succeeded"
    assert output(events) == "".join(f"line-{i}\n" for i in range(1, 31))
    kinds = types(events)
    assert "runtime.disconnected" in kinds
    assert kinds.count("runtime.connected") >= 2


def test_token_expiring_mid_run_is_renewed(store: Store) -> None:
    from providers.manager import EnvironmentManager

    EnvironmentManager(store).create("sandbox")

    async def drop_after_expiry(hub: Hub, run: Any) -> None:
        await asyncio.sleep(2.5)  # the first token (ttl 1.5 s) has expired by now
        for ws in list(hub.gateway.connections.of("sandbox")):
            await ws.close()

    request = RunRequest("sandbox", counting_agent(40, 0.1))
    final, events = asyncio.run(_drive(store, request, drop_after_expiry, token_ttl=1.5))
    assert final.status == "succeeded", types(events)
    assert output(events).count("line-") == 40
    assert types(events).count("runtime.connected") >= 2


@pytest.mark.long  # several seconds: make test stays under ten minutes
@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "other-port"])
def test_hub_restart_adopts_the_run(hub_cli: Cli, workspace: Path, same_port: bool) -> None:
    """The runtime keeps dialling its hub's unix socket (a fixed path per environment), so a
    hub restarted on another TCP port adopts the run as well as one on the same port."""
    port = free_port()
    with serve(hub_cli, workspace, "--port", port) as first:
        starter = subprocess.Popen(
            [
                NARRATIVE,
                "run",
                "start",
                "--env",
                "sandbox",
                "--json",
                "--",
                *counting_agent(40, 0.1),
            ],
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        run_id = wait_for_output(workspace, "line-3")
        os.kill(first["pid"], signal.SIGKILL)
    with serve(hub_cli, workspace, "--port", port if same_port else free_port()):
        out, _err = starter.communicate(timeout=90)
    run = json.loads(out)
    history = events(store_dir_of(workspace), run_id)
    assert run["id"] == run_id and run["status"] == "succeeded", history[-6:]
    assert "run.adopted" in types(history)
    assert output(history) == "".join(f"line-{i}\n" for i in range(1, 41))
    store = Store.open(str(store_dir_of(workspace)))
    assert get_run(store, run_id).result_snapshot == run["result_snapshot"]


def test_control_calls_need_a_control_token_and_bad_requests_record_nothing(
    store: Store,
) -> None:
    from gateway.client import GatewayClient
    from gateway.errors import AccessDenied, GatewayError, NoHandler, ProtocolError
    from gateway.hub.server import control_token
    from narrative.hierarchy import list_runs
    from providers.manager import EnvironmentManager

    EnvironmentManager(store).create("sandbox")
    before = store.refs.list("refs/narrative/")

    async def main() -> None:
        async with Hub(store) as hub:
            run_token = hub.signer.issue("run-x", "sandbox", 60)
            async with GatewayClient(hub.url, run_token) as runtime_like:
                with pytest.raises(AccessDenied):
                    await runtime_like.call(
                        "hub", "runStart", {"environment": "sandbox", "argv": ["true"]}
                    )
                # the hub serves the user's workspace read-only unless told otherwise
                readme = await runtime_like.call("fs", "readFile", {"path": "README.md"})
                assert readme["content"] == "# demo\n"
                for action in ("writeFile", "deleteFile"):
                    with pytest.raises(NoHandler):
                        payload = {"path": "README.md", "content": "x"}
                        await runtime_like.call("fs", action, payload, target="hub")
                with pytest.raises(ProtocolError, match="bundle id"):
                    await runtime_like.call(
                        "narrative", "readBundle", {"bundleId": "../../gateway.key"}
                    )
            async with GatewayClient(hub.url, control_token(store, "cli-test")) as cli:
                for payload, message in (
                    ({"environment": "sandbox", "argv": []}, "argv"),
                    ({"environment": "sandbox", "argv": ["true"], "timeout": -1}, "timeout"),
                    ({"environment": "nope", "argv": ["true"]}, "nope"),
                ):
                    with pytest.raises(GatewayError, match=message):
                        await cli.call("hub", "runStart", payload, target="hub")

    asyncio.run(main())
    assert list_runs(store) == []
    assert store.refs.list("refs/narrative/") == before


def test_runtime_heartbeats_are_answered_by_the_hub(store: Store, tmp_path: Path) -> None:
    from gateway.hub.runtime import Runtime

    box = tmp_path / "box"
    box.mkdir()

    async def main() -> int:
        async with Hub(store) as hub:
            token = hub.signer.issue("run-beat", "box", 60)
            runtime = Runtime(hub.url, token, str(box), heartbeat_interval=0.05)
            serving = asyncio.get_running_loop().create_task(runtime.serve())
            await until(lambda: runtime.heartbeats >= 3, timeout=20)
            assert hub.gateway.peers().keys() >= {"box"}
            runtime._shutdown.set()
            await serving
            return runtime.heartbeats

    assert asyncio.run(main()) >= 3


def test_a_token_renewed_as_the_runtime_connects_is_presented(store: Store, tmp_path: Path) -> None:
    """The hub renews a runtime's token (runtime:setToken) the moment its connection is up, as
    it does for a runtime that took longer to start than a third of its token's life: the
    runtime presents the new token on that connection (gateway:refresh), or the hub, revoking
    the old one, would close the runtime's only connection."""
    from gateway.hub.runtime import Runtime

    box = tmp_path / "box"
    box.mkdir()

    async def main() -> tuple[str, str]:
        async with Hub(store) as hub:
            old = hub.signer.issue("run-renew", "box", 60)
            fresh = hub.signer.issue("run-renew", "box", 60)
            renewals: list[asyncio.Task[Any]] = []

            def renew_at_once(peer: str, up: bool) -> None:
                if peer == "box" and up and not renewals:
                    call = hub.gateway.call(
                        "runtime", "setToken", {"token": fresh}, target="box", timeout=10
                    )
                    renewals.append(asyncio.get_running_loop().create_task(call))

            hub.gateway.add_peer_listener(renew_at_once)
            runtime = Runtime(hub.url, old, str(box), heartbeat_interval=0.05)
            serving = asyncio.get_running_loop().create_task(runtime.serve())
            try:
                await until(lambda: bool(renewals) and renewals[0].done(), timeout=20)
                await renewals[0]
                claims = hub.gateway.peer_claims("box")
                assert claims is not None
                return claims.token_id, hub.signer.verify(fresh).token_id
            finally:
                runtime._shutdown.set()
                await serving

    held, renewed = asyncio.run(main())
    assert held == renewed


def test_kill_with_no_hub_alive_kills_the_orphaned_runtime(hub_cli: Cli, workspace: Path) -> None:
    """The process embedding the hub dies (kill -9); `run kill` then reaches the runtime through
    the provider, collects what the environment holds and records the run as killed."""
    from providers.manager import EnvironmentManager

    starter = subprocess.Popen(
        [NARRATIVE, "run", "start", "--env", "sandbox", "--", *counting_agent(600, 0.1)],
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_id = wait_for_output(workspace, "line-3")
    starter.kill()
    starter.wait()
    handle = next(
        e["handle"]
        for e in events(store_dir_of(workspace), run_id)
        if e["type"] == "runtime.spawned"
    )
    manager = EnvironmentManager(Store.open(str(store_dir_of(workspace))))
    assert manager.alive("sandbox", handle)  # orphaned, still running
    hub_cli.run("run", "kill", run_id)
    run = hub_cli.json("run", "show", run_id)
    assert run["status"] == "killed" and run["result_snapshot"]
    assert not manager.alive("sandbox", handle)
    assert types(run["events"])[-1] == "run.finished"


def test_runtime_gives_up_when_no_hub_comes_back(store: Store, tmp_path: Path) -> None:
    from gateway.hub.runtime import Runtime

    box = tmp_path / "box"
    box.mkdir()

    async def main() -> float:
        hub = Hub(store)
        await hub.start()
        token = hub.signer.issue("run-alone", "box", 60)
        runtime = Runtime(hub.url, token, str(box), heartbeat_interval=0.05, give_up_after=0.5)
        serving = asyncio.get_running_loop().create_task(runtime.serve())
        await until(lambda: runtime.heartbeats >= 1, timeout=20)
        await hub.close()  # and no hub comes back
        started = time.monotonic()
        await asyncio.wait_for(serving, 20)
        return time.monotonic() - started

    assert asyncio.run(main()) >= 0.5
