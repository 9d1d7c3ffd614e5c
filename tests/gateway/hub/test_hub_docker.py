"""The hub with a Docker environment (real engine, DESIGN.md §5): the runtime runs inside a
container without a network and reaches the hub through the unix socket mounted into it; an
agent there cannot reach a server on the host's loopback (with ``network=host`` it could)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from narrative.store import Store
from providers.base import RUNTIME_BOOTSTRAP
from providers.manager import EnvironmentManager
from providers.records import hub_socket_dir
from tests.conftest import NARRATIVE, Cli, git, store_dir_of
from tests.gateway.hub.hub_support import (
    AGENT,
    FAILING_RUNTIME,
    ROUTING,
    check_failing_runtime,
    check_loopback_isolation,
    counting_agent,
    events,
    file,
    serve,
    start,
    types,
    wait_for_output,
)
from tests.gateway.hub.hub_support import (
    routes as routes_of,
)
from tests.gateway.hub.test_usage import (
    BURN,
    DIRECT_PHASES,
    MIB,
    burn_and_nap,
    check_hub_run_usage,
    usage_of,
)

# real servers and runtimes over TLS / in containers: make test-long (CI runs it), to keep
# make test under ten minutes
pytestmark = pytest.mark.long

REPO = str(Path(__file__).resolve().parents[3])
WORKDIR = "/agent"  # outside every mount below
#: This checkout's CLI in isolated mode, as the directory providers start it.
RUNTIME = [sys.executable, "-I", "-c", RUNTIME_BOOTSTRAP, REPO]


@pytest.fixture(autouse=True)
def _no_container_left(cli: Cli) -> Any:
    """Whatever a test leaves (it failed, or its point was elsewhere), its environments'
    containers go with it: they would pile up on the engine, run after run."""
    yield
    listed = cli.run("env", "list", "--json", check=False)
    if listed.returncode != 0:
        return  # no store: nothing was made
    names = [item["name"] for item in json.loads(listed.stdout)["items"]]
    if names:
        cli.run("env", "delete", *names, check=False)
    cli.run("env", "sweep", check=False)


def runtime_config(image: str) -> list[str]:
    """``--config`` pairs of a container whose runtime is this checkout, mounted read-only."""
    mounts = [
        {"source": path, "target": path, "read_only": True}
        for path in sorted({"/usr", sys.base_prefix, sys.prefix, REPO})
    ]
    pairs = {
        "image": image,
        "workdir": WORKDIR,
        "runtime": json.dumps(RUNTIME),
        "mounts": json.dumps(mounts),
        # the agent imports gateway.client from this checkout
        "env": json.dumps({"HOME": "/tmp", "PYTHONPATH": REPO}),
    }
    return [arg for key, value in pairs.items() for arg in ("--config", f"{key}={value}")]


def create_box(cli: Cli, image: str, name: str = "box", *extra: str) -> dict[str, Any]:
    config = [*runtime_config(image), *extra]
    out = cli.run("env", "create", name, "--provider", "docker", "--json", *config)
    return dict(json.loads(out.stdout))


def test_agent_in_a_container_reads_through_the_hub_and_runs_commands_locally(
    cli: Cli, workspace: Path, docker_image: str
) -> None:
    cli.run("init")
    create_box(cli, docker_image)
    cli.run("env", "create", "wt", "--provider", "worktree")
    (workspace / "agent.py").write_text(AGENT)
    (workspace / "proxyExecution.json").write_text(json.dumps(ROUTING))
    runs = start(cli, "--env", "box", "--env", "wt", "--", sys.executable, "agent.py")
    assert [(r["environment"], r["status"]) for r in runs] == [
        ("box", "succeeded"),
        ("wt", "succeeded"),
    ], runs
    store = Store.open(str(store_dir_of(workspace)))
    for run in runs:
        result = json.loads(file(store, run["result_snapshot"], "agent-result.json"))
        assert result["readme"] == "# demo\n"  # served by the hub from the user's workspace
        where = result["exec"]["stdout"].split("\n")[1]
        routes = routes_of(store_dir_of(workspace), run["id"])
        env = run["environment"]
        assert routes["fs:readFile"]["route"] == [f"{env}.agent", env, "hub"]
        assert routes["exec:run"]["ranIn"] == env
        if env == "box":
            assert where == WORKDIR  # the command ran inside the container
        else:
            assert where != str(workspace)
        names = cli.run("diff", run["id"], "--name-status").stdout.splitlines()
        assert names == ["A\tagent-result.json", "A\tprogress.txt"]
    git("fsck", "--strict", cwd=store_dir_of(workspace))


def test_container_killed_mid_run_fails_the_run_and_the_hub_keeps_serving(
    cli: Cli, workspace: Path, docker_image: str, docker_api: Any
) -> None:
    cli.run("init")
    box = create_box(cli, docker_image)
    cli.run("env", "create", "wt", "--provider", "worktree")
    with serve(cli, workspace, "--reconnect-grace", "30"):
        starter = subprocess.Popen(
            [NARRATIVE, "run", "start", "--env", "box", "--json", "--", *counting_agent(600, 0.1)],
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        run_id = wait_for_output(workspace, "line-3")
        docker_api.kill(box["resource_id"])
        out, _err = starter.communicate(timeout=90)
        run = json.loads(out)
        assert run["id"] == run_id and run["status"] == "failed", run
        assert starter.returncode == 1
        history = events(store_dir_of(workspace), run_id)
        assert "runtime.lost" in types(history) and types(history)[-1] == "run.finished"
        assert cli.json("env", "show", "box")["state"] == "error"
        # the same hub still serves the next run
        ok = start(cli, "--env", "wt", "--", "true")
        assert ok["status"] == "succeeded"


def test_runtime_failing_at_once_in_a_container_shows_its_output(
    cli: Cli, workspace: Path, docker_image: str, docker_api: Any
) -> None:
    """The runtime's output stays in the container; the user still sees it."""
    cli.run("init")
    box = create_box(cli, docker_image, "box", "--config", f"runtime={json.dumps(FAILING_RUNTIME)}")
    try:
        check_failing_runtime(cli, workspace, "box")
        # the host's copy outlives the container (removed behind the store's back)
        docker_api.remove_container(box["resource_id"], force=True, v=True)
        assert cli.items("env", "logs", "box", "--runtime")[-1] == "boom-marker"
    finally:
        cli.run("env", "delete", "box")


def test_runs_need_no_network_and_the_agent_cannot_reach_host_loopback(
    cli: Cli, workspace: Path, docker_image: str, docker_api: Any
) -> None:
    """A container with the default ``network=none``: the run succeeds through the hub's unix
    socket, and its agent cannot connect to a server on the host's 127.0.0.1. The negative
    control, ``network=host``, reaches it (so the probe can fail)."""
    cli.run("init")
    box = create_box(cli, docker_image)
    create_box(cli, docker_image, "open", "--config", "network=host")
    assert docker_api.inspect_container(box["resource_id"])["HostConfig"]["NetworkMode"] == "none"
    spawned = check_loopback_isolation(cli, workspace, "box", "open")
    assert "ws+unix:///run/narrative-hub/hub.sock" in spawned["argv"]
    # the socket's directory is private to the user, and the socket is gone with its run
    env_id = EnvironmentManager(Store.open(str(store_dir_of(workspace)))).get("box").id
    directory = hub_socket_dir(env_id, create=False)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.listdir(directory) == []
    cli.run("env", "delete", "box")
    assert not os.path.exists(directory)


#: A runtime that starts in the workspace with it on ``sys.path`` (``python -m cli``, this
#: checkout on PYTHONPATH): what the check must catch.
EXPOSED_RUNTIME = json.dumps(["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "cli"])


def test_health_runs_the_runtime_import_check_in_the_container(
    cli: Cli, workspace: Path, docker_image: str
) -> None:
    """A workspace holding ``json.py`` replaces the module of a runtime started among its
    files: ``env health`` says so (not ok, the module named); the isolated runtime stays ok."""
    (workspace / "json.py").write_text("raise SystemExit('planted json.py ran')\n")
    cli.run("init")
    create_box(cli, docker_image, "exposed", "--config", f"runtime={EXPOSED_RUNTIME}")
    create_box(cli, docker_image, "isolated")
    for env in ("exposed", "isolated"):
        assert cli.items("env", "health", env)[0]["health"] == "ok"  # an empty workdir
        cli.run("run", "start", "--env", env, "--direct", "--", "true")  # restores json.py
    report = cli.items("env", "health", "exposed")[0]
    assert report["health"] != "ok" and "broken" in report["detail"], report
    assert "planted json.py ran" in report["detail"], report
    assert cli.items("env", "health", "isolated")[0]["health"] == "ok"


def test_run_and_env_show_report_what_container_runs_cost(
    cli: Cli, workspace: Path, docker_image: str
) -> None:
    cli.run("init")
    create_box(cli, docker_image)
    burn, nap = burn_and_nap(cli, workspace, "box")
    check_hub_run_usage(cli, workspace, burn, nap, "docker: the container's cgroup counters")


def test_direct_run_in_a_container_reports_its_cost(
    cli: Cli, workspace: Path, docker_image: str
) -> None:
    cli.run("init")
    create_box(cli, docker_image)
    (workspace / "burn.py").write_text(BURN)
    burn = start(cli, "--direct", "--env", "box", "--", sys.executable, "burn.py")
    usage = usage_of(cli, burn["id"])
    assert "docker: the container's cgroup counters" in usage["measured_by"]
    assert usage["cpu_seconds"] >= 0.5 and usage["peak_memory_bytes"] >= 120 * MIB, usage
    assert list(usage["phases"]) == DIRECT_PHASES
