"""Runs in a hybrid environment (:mod:`providers.hybrid`, :mod:`gateway.hub.tools_node`), with
real processes: the agent runs in one environment (a worktree; a container when the test engine
is there), its routed calls are served by a gateway node in another (a local directory), through
the hub; both are leased while the run lasts and the node is gone after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from narrative.hierarchy import list_runs
from narrative.store import Store
from providers.manager import EnvironmentManager
from providers.records import hub_socket_dir
from tests.conftest import NARRATIVE, Cli, git, store_dir_of, tree_bytes
from tests.gateway.hub.hub_support import events, file, start, types, wait_for_output
from tests.gateway.hub.hub_support import routes as routes_of

# runs over two environments each (~60 s in all): make test-long, which CI runs too, keeps
# make test under ten minutes
pytestmark = [pytest.mark.timeout(180), pytest.mark.long]

#: An agent that calls a routed capability (fs, llm) and one that is not (exec).
AGENT = textwrap.dedent(
    """
    import asyncio, json, os
    from gateway.client import GatewayClient

    async def main():
        url, token = os.environ["NARRATIVE_GATEWAY_URL"], os.environ["NARRATIVE_GATEWAY_TOKEN"]
        out = {}
        async with GatewayClient(url, token) as client:
            out["tools_file"] = await client.call("fs", "readFile", {"path": "only-in-tools.txt"})
            try:  # in the agent's workspace, not in the tools environment's
                await client.call("fs", "readFile", {"path": "README.md"})
                out["readme"] = "served"
            except Exception as exc:
                out["readme"] = str(exc)
            out["llm"] = await client.call("llm", "complete", {"prompt": "2+2"})
            out["exec"] = await client.call("exec", "run", {"argv": ["ls"]})
        with open("agent-result.json", "w") as f:
            json.dump(out, f)
        print("agent done", flush=True)

    asyncio.run(main())
    """
)
ROUTE = '["fs:*","llm:*"]'
PLUGIN = "tests.gateway.hub.hybrid_llm"


def make_tools(cli: Cli, tmp_path: Path) -> Path:
    """The tools environment ``side``: a local directory holding a file nothing else has."""
    side = tmp_path / "side"
    cli.run("env", "create", "side", "--provider", "local", "--config", f"path={side}")
    (side / "only-in-tools.txt").write_text("served where the tools are\n")
    return side


def make_pair(cli: Cli) -> None:
    cli.run(
        "env", "create", "pair", "--provider", "hybrid",
        "--config", "agent=box", "--config", "tools=side",
        "--config", f"route={ROUTE}", "--config", f'handlers=["{PLUGIN}"]',
    )  # fmt: skip


@pytest.fixture
def pair_cli(cli: Cli, workspace: Path, tmp_path: Path) -> Cli:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    make_tools(cli, tmp_path)
    make_pair(cli)
    (workspace / "agent.py").write_text(AGENT)
    return cli


def tools_nodes(store_dir: Path) -> list[int]:
    """Pids of gateway nodes still serving the store's ``side`` environment (they dial its
    hub socket, whose path holds the environment's id)."""
    store = Store.open(str(store_dir))
    socket_dir = hub_socket_dir(EnvironmentManager(store).get("side").id, create=False)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(socket_dir.encode() in a for a in argv):
            found.append(int(entry))
    return found


def check_hybrid_run(cli: Cli, workspace: Path, run: dict[str, Any], agent_env: str) -> None:
    """The routed calls ran in ``side`` by way of the hub, the others where the agent is; the
    routing is in the event log; the node is gone and the leases free."""
    assert run["status"] == "succeeded", run
    store_dir = store_dir_of(workspace)
    store = Store.open(str(store_dir))
    result = json.loads(file(store, run["result_snapshot"], "agent-result.json"))
    assert result["tools_file"]["content"] == "served where the tools are\n"
    assert "README.md" in result["readme"] and result["readme"] != "served", result
    assert result["llm"]["servedBy"] == "side" and result["llm"]["completion"] == "4"
    listed = result["exec"]["stdout"].split()
    assert "README.md" in listed and "only-in-tools.txt" not in listed, listed
    routes = routes_of(store_dir, run["id"])
    hop = ["pair.agent", "pair", "hub", "side"]
    assert routes["fs:readFile"]["route"] == hop and routes["fs:readFile"]["ranIn"] == "side"
    assert routes["llm:complete"]["route"] == hop
    assert routes["exec:run"]["route"] == ["pair.agent", "pair"], routes["exec:run"]
    assert routes["exec:run"]["ranIn"] == "pair"
    history = events(store_dir, run["id"])
    kinds = types(history)
    routing = history[kinds.index("hybrid.routing")]
    assert routing["route"] == ["fs:*", "llm:*"] and routing["tools"] == "side"
    to_hub = {"mode": "proxy", "environment": "hub"}
    assert routing["runtime"] == {"fs:*": to_hub, "llm:*": to_hub}
    to_side = {"mode": "proxy", "environment": "side"}
    assert routing["hub"] == {"from": "pair", "rules": {"fs:*": to_side, "llm:*": to_side}}
    order = ["tools.spawned", "hybrid.routing", "runtime.spawned", "agent.exited"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    assert kinds.index("tools.stopped") < kinds.index("run.finished") == len(kinds) - 1
    spawned = history[kinds.index("tools.spawned")]
    assert "NARRATIVE_TOKEN" not in json.dumps(spawned["argv"])  # in its environment only
    manager = EnvironmentManager(store)
    assert not manager.alive("side", spawned["handle"])
    assert tools_nodes(store_dir) == []
    assert {e.name: e.state.value for e in manager.environments()} == {
        "box": "running",
        "side": "running",
        "pair": "running",
    }
    assert cli.json("env", "show", agent_env)["state"] == "running"
    git("fsck", "--strict", cwd=store_dir)


def test_routed_calls_run_in_the_tools_environment(pair_cli: Cli, workspace: Path) -> None:
    run = start(pair_cli, "--env", "pair", "--", sys.executable, "agent.py")
    check_hybrid_run(pair_cli, workspace, run, "box")
    # the leases went with the run: each environment takes the next one
    again = start(pair_cli, "--env", "side", "--", "true")
    assert again["status"] == "succeeded", again


def test_both_environments_are_leased_while_the_run_lasts(pair_cli: Cli, workspace: Path) -> None:
    long = subprocess.Popen(
        [NARRATIVE, "run", "start", "--env", "pair", "--json", "--",
         "sh", "-c", "echo started; sleep 3"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        holder = wait_for_output(workspace, "started")
        store = Store.open(str(store_dir_of(workspace)))
        runs_before = {r.id for r in list_runs(store)}
        assert tools_nodes(store_dir_of(workspace))  # (with its sandbox's processes)
        for env in ("side", "box", "pair"):
            refused = pair_cli.run("run", "start", "--env", env, "--", "true", check=False)
            assert refused.returncode == 1, refused.stderr
            assert f"environment '{env}' is busy with run {holder}" in refused.stderr
        assert {r.id for r in list_runs(store)} == runs_before  # nothing recorded
    finally:
        out, err = long.communicate(timeout=60)
    assert long.returncode == 0, err
    assert json.loads(out)["status"] == "succeeded"
    assert tools_nodes(store_dir_of(workspace)) == []
    assert start(pair_cli, "--env", "box", "--", "true")["status"] == "succeeded"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (["agent=nope", "tools=side", "route=[\"fs\"]"], "agent environment 'nope' does not exist"),
        (["agent=box", "tools=gone", "route=[\"fs\"]"], "tools environment 'gone' does not exist"),
        (["agent=box", "tools=box", "route=[\"fs\"]"], "agent and tools are both 'box'"),
        (["agent=pair", "tools=side", "route=[\"fs\"]"], "'pair' is hybrid itself (no nesting)"),
        (["agent=box", "tools=pair", "route=[\"fs\"]"], "'pair' is hybrid itself (no nesting)"),
        (["agent=box", "tools=side", "route=[\"*\"]"], "route '*' must name a capability type"),
        (["agent=box", "tools=side", "route=[\"fs:*\",\"fs\"]"], "route 'fs' is given twice"),
        (["agent=box", "tools=side", "route=[\"f s\"]"], "route.0: String should match"),
        (["agent=box", "tools=side", "route=[]"], "route: List should have at least 1 item"),
        (["agent=box", "tools=side"], "route: Field required"),
    ],
    ids=["unknown-agent", "unknown-tools", "same", "nested-agent", "nested-tools",
         "star", "twice", "bad-key", "empty", "no-route"],
)  # fmt: skip
def test_bad_configs_are_refused_and_change_nothing(
    pair_cli: Cli, workspace: Path, config: list[str], message: str
) -> None:
    before = tree_bytes(store_dir_of(workspace))
    args = [a for pair in config for a in ("--config", pair)]
    refused = pair_cli.run("env", "create", "bad", "--provider", "hybrid", *args, check=False)
    assert refused.returncode == 1, refused
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("narrative: error: "), refused.stderr
    assert message in lines[0], lines[0]
    assert tree_bytes(store_dir_of(workspace)) == before


def test_agent_in_a_container_tools_in_a_directory(
    cli: Cli, workspace: Path, tmp_path: Path, docker_image: str
) -> None:
    from tests.gateway.hub.test_hub_docker import create_box

    cli.run("init")
    create_box(cli, docker_image)
    make_tools(cli, tmp_path)
    make_pair(cli)
    (workspace / "agent.py").write_text(AGENT)
    run = start(cli, "--env", "pair", "--", sys.executable, "agent.py")
    check_hybrid_run(cli, workspace, run, "box")


#: Reads the tools environment's file, says so, and reads it again after ``pause`` seconds (the
#: hub is restarted meanwhile), retrying while the connections come back.
RESTART_AGENT = textwrap.dedent(
    """
    import asyncio, json, os, time
    from gateway.client import GatewayClient

    async def read():
        url, token = os.environ["NARRATIVE_GATEWAY_URL"], os.environ["NARRATIVE_GATEWAY_TOKEN"]
        async with GatewayClient(url, token) as client:
            return await client.call("fs", "readFile", {"path": "only-in-tools.txt"})

    async def main():
        first = await read()
        print("first-read", flush=True)
        await asyncio.sleep(4)
        deadline, second = time.monotonic() + 60, None
        while second is None:
            try:
                second = await read()
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                print("retrying:", exc, flush=True)
                await asyncio.sleep(0.5)
        with open("agent-result.json", "w") as f:
            json.dump({"first": first, "second": second}, f)

    asyncio.run(main())
    """
)


def test_a_restarted_hub_adopts_the_run_and_its_tools_node(pair_cli: Cli, workspace: Path) -> None:
    import signal

    from tests.gateway.hub.hub_support import serve

    (workspace / "agent.py").write_text(RESTART_AGENT)
    with serve(pair_cli, workspace) as first:
        starter = subprocess.Popen(
            [NARRATIVE, "run", "start", "--env", "pair", "--json", "--",
             sys.executable, "agent.py"],
            cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        run_id = wait_for_output(workspace, "first-read")
        os.kill(first["pid"], signal.SIGKILL)
    with serve(pair_cli, workspace):
        out, err = starter.communicate(timeout=120)
    run = json.loads(out)
    store_dir = store_dir_of(workspace)
    history = events(store_dir, run_id)
    kinds = types(history)
    assert run["id"] == run_id and run["status"] == "succeeded", (err, history[-6:])
    assert kinds.index("run.adopted") < kinds.index("tools.resumed") < kinds.index("tools.stopped")
    result = json.loads(
        file(Store.open(str(store_dir)), run["result_snapshot"], "agent-result.json")
    )
    assert result["first"] == result["second"]
    assert result["second"]["content"] == "served where the tools are\n"
    reads = [e for e in history if e["type"] == "call.routed" and e["success"]]
    assert len(reads) >= 2 and {e["ranIn"] for e in reads} == {"side"}, reads
    assert tools_nodes(store_dir) == []


def test_a_direct_run_in_the_pair_waits_for_its_agent_environment(
    pair_cli: Cli, workspace: Path
) -> None:
    """``run start --direct`` runs in the agent environment: not while a run holds it."""
    long = subprocess.Popen(
        [NARRATIVE, "run", "start", "--env", "box", "--json", "--",
         "sh", "-c", "echo started; sleep 3"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        holder = wait_for_output(workspace, "started")
        refused = pair_cli.run(
            "run", "start", "--direct", "--env", "pair", "--", "true", check=False
        )
        assert refused.returncode == 1, refused.stderr
        assert f"environment 'box' is busy with run {holder}" in refused.stderr
    finally:
        out, err = long.communicate(timeout=60)
    assert json.loads(out)["status"] == "succeeded", err
    direct = start(pair_cli, "--direct", "--env", "pair", "--", "ls")
    assert direct["status"] == "succeeded", direct


def test_a_tools_node_that_does_not_start_fails_the_run_saying_why(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    broken = '["sh", "-c", "echo tools-broken >&2; exit 3"]'
    side = tmp_path / "side"
    cli.run("env", "create", "side", "--provider", "local",
            "--config", f"path={side}", "--config", f"runtime={broken}")  # fmt: skip
    make_pair(cli)
    proc = cli.run("run", "start", "--env", "pair", "--json", "--", "true", check=False)
    assert proc.returncode == 1, proc.stderr
    run = json.loads(proc.stdout)
    history = events(store_dir_of(workspace), run["id"])
    kinds = types(history)
    reason = history[kinds.index("run.error")]["reason"]
    assert "the tools node in 'side' exited: tools-broken" in reason, reason
    assert "runtime.spawned" not in kinds  # the agent never started
    assert tools_nodes(store_dir_of(workspace)) == []
    assert start(cli, "--env", "box", "--", "true")["status"] == "succeeded"  # leases freed


#: Makes ``exec:run`` calls: plain, and aimed at the tools node; says how each went.
EXEC_AGENT = textwrap.dedent(
    """
    import asyncio, json, os
    from gateway.client import GatewayClient

    async def main():
        url, token = os.environ["NARRATIVE_GATEWAY_URL"], os.environ["NARRATIVE_GATEWAY_TOKEN"]
        out = {}
        async with GatewayClient(url, token) as client:
            for name, target in (("plain", None), ("at-tools", "side")):
                try:
                    ran = await client.call("exec", "run", {"argv": ["ls"]}, target=target)
                    out[name] = {"ran": ran["stdout"]}
                except Exception as exc:
                    out[name] = {"refused": getattr(exc, "code", ""), "message": str(exc)}
            read = await client.call("fs", "readFile", {"path": "only-in-tools.txt"}, target="side")
            out["read-at-tools"] = read["content"]
        with open("agent-result.json", "w") as f:
            json.dump(out, f)

    asyncio.run(main())
    """
)
#: The workspace's own routing: commands go to the hub (which serves none by default).
EXEC_TO_HUB = {"rules": {"exec": {"mode": "proxy", "environment": "hub"}}}


def exec_run(pair_cli: Cli, workspace: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run of :data:`EXEC_AGENT` in ``pair`` with :data:`EXEC_TO_HUB` in the snapshot: its
    result and its events."""
    (workspace / "agent.py").write_text(EXEC_AGENT)
    (workspace / "proxyExecution.json").write_text(json.dumps(EXEC_TO_HUB))
    run = start(pair_cli, "--env", "pair", "--", sys.executable, "agent.py")
    assert run["status"] == "succeeded", run
    store_dir = store_dir_of(workspace)
    store = Store.open(str(store_dir))
    result = json.loads(file(store, run["result_snapshot"], "agent-result.json"))
    return result, events(store_dir, run["id"])


def test_the_snapshots_own_routing_is_kept_beside_the_routed_keys(
    pair_cli: Cli, workspace: Path
) -> None:
    result, history = exec_run(pair_cli, workspace)
    routing = history[types(history).index("hybrid.routing")]["runtime"]
    assert routing["exec"] == {"mode": "proxy", "environment": "hub"}, routing
    assert routing["fs:*"] == {"mode": "proxy", "environment": "hub"}
    # the user's rule sent the plain call to the hub, which runs no commands
    assert "refused" in result["plain"] and "ran" not in result["plain"], result
    plain = next(e for e in history if e["type"] == "call.routed" and e["call"] == "exec:run")
    assert plain["route"] == ["pair.agent", "pair", "hub"], plain


def test_a_target_reaches_the_tools_node_only_with_a_routed_call(
    pair_cli: Cli, workspace: Path
) -> None:
    result, _history = exec_run(pair_cli, workspace)
    assert result["at-tools"]["refused"] == "out_of_scope", result
    assert "exec:run of run" in result["at-tools"]["message"]
    assert result["read-at-tools"] == "served where the tools are\n"  # fs is routed there
