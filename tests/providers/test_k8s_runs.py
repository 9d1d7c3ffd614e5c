"""A run on a ``k8s`` environment for real: ``env create`` makes the claim, ``run start`` the
pod (run by the test kubelet as a container), the runtime in the pod dials the hub over TCP
with its token from the environment's Secret, fetches its input, runs the command and ships
the result home; ``env delete`` removes every object. Plus what the user sees of a pod that
cannot run (the kubelet's reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from narrative.store import Store
from providers.docker.image import host_runtime
from providers.zygote import WARM_LINE
from tests.conftest import Cli, git, store_dir_of
from tests.gateway.hub.hub_support import events, file, start
from tests.providers.k8s_support import REAL_CONTEXT

pytestmark = [pytest.mark.timeout(300), pytest.mark.long]


def _create(cli: Cli, name: str, config: dict[str, Any], *extra: str) -> dict[str, Any]:
    pairs = [("runtime", json.dumps(host_runtime().runtime)), *extra_pairs(config)]
    args = [a for key, value in pairs for a in ("--config", f"{key}={value}")]
    out = cli.run("env", "create", name, "--provider", "k8s", "--json", *args, *extra)
    return dict(json.loads(out.stdout))


def extra_pairs(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in config.items()]


def _objects(config: dict[str, Any]) -> dict[str, list[str]]:
    """Names of every object of the namespace the provider makes, by kind."""
    from kubernetes import client
    from kubernetes import config as kconfig

    api = kconfig.new_client_from_config(
        config_file=config.get("kubeconfig"), context=config.get("context")
    )
    try:
        core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
        ns = config.get("namespace", "default")
        return {
            "pods": [p.metadata.name for p in core.list_namespaced_pod(ns).items],
            "claims": [
                c.metadata.name for c in core.list_namespaced_persistent_volume_claim(ns).items
            ],
            "secrets": [s.metadata.name for s in core.list_namespaced_secret(ns).items],
            "policies": [p.metadata.name for p in net.list_namespaced_network_policy(ns).items],
        }
    finally:
        api.close()


@pytest.mark.skipif(bool(REAL_CONTEXT), reason="runs the host's runtime: the stand-in only")
def test_a_run_in_a_pod_comes_home_and_delete_removes_everything(
    cli: Cli, workspace: Path, k8s_config: dict[str, Any]
) -> None:
    from tests.providers.k8s_support import STANDIN

    cli.run("init")
    created = _create(cli, "pod", k8s_config)
    name = created["resource_id"]
    execs_before = len(STANDIN[0].exec_commands)
    run = start(
        cli,
        "--env",
        "pod",
        "--",
        "sh",
        "-c",
        "cat README.md > seen.txt; echo done > out.txt; id -u > uid.txt",
    )
    assert run["status"] == "succeeded", run
    # one exec a run: it readies the pod, spawns the runtime, says when it is up, and stays
    # open until it ended to read its log (each exec into a pod costs CPU, which fifty pods'
    # runs pay fifty times)
    execs = STANDIN[0].exec_commands[execs_before:]
    assert len(execs) == 1, [" ".join(argv)[:80] for argv in execs]
    # the pod's warm runtime forked the run's (providers.zygote); its log came home whole
    assert WARM_LINE.strip() in cli.run("env", "logs", "pod", "--runtime").stdout
    store = Store.open(str(store_dir_of(workspace)))
    assert file(store, run["result_snapshot"], "out.txt") == "done\n"
    assert file(store, run["result_snapshot"], "seen.txt") == "# demo\n"  # the input came in
    assert file(store, run["result_snapshot"], "uid.txt") == "1000\n"  # not root
    git("fsck", "--strict", cwd=store_dir_of(workspace))
    objects = _objects(k8s_config)
    assert name in objects["pods"] and name in objects["claims"] and name in objects["policies"]
    assert f"{name}-env" in objects["secrets"]
    cli.run("env", "delete", "pod")
    objects = _objects(k8s_config)
    leftovers = [n for names in objects.values() for n in names if n.startswith(name)]
    assert leftovers == [], objects


@pytest.mark.skipif(bool(REAL_CONTEXT), reason="runs the host's runtime: the stand-in only")
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_runs_one_after_another_in_one_pod(
    cli: Cli, workspace: Path, k8s_config: dict[str, Any], warm: bool
) -> None:
    """Three runs in one pod, each seeing only its own input, each runtime forked by the warm
    runtime (or, with ``warm_runtime=false``, started afresh). Run 1's agent stops the warm
    runtime (SIGSTOP) and sends it an order of its own: run 2 starts all the same."""
    cli.run("init")
    _create(cli, "again", k8s_config, "--config", f"warm_runtime={str(warm).lower()}")
    meddle = r"""
for p in /proc/[0-9]*; do
    read -r line < "$p/stat"; set -- ${line##*") "}; [ "$2" = 1 ] || continue
    case "$(tr '\0' ' ' < "$p/cmdline")" in *" runtime --warm "*) kill -STOP "${p#/proc/}";; esac
done
printf 'bogus\0' > /tmp/narrative-warm-runtime.order
echo left > /tmp/left.txt
echo one > out.txt
"""
    second = "if [ -e /tmp/left.txt ]; then echo stale; else echo fresh; fi > out.txt"
    for i, script in enumerate([meddle, second, "cat README.md > out.txt"]):
        run = start(cli, "--env", "again", "--", "sh", "-c", script)
        assert run["status"] == "succeeded", run
        store = Store.open(str(store_dir_of(workspace)))
        want = ["one\n", "fresh\n", "# demo\n"][i]
        assert file(store, run["result_snapshot"], "out.txt") == want
    log = cli.run("env", "logs", "again", "--runtime").stdout
    assert log.count(WARM_LINE.strip()) == (3 if warm else 0), log[-3000:]
    cli.run("env", "delete", "again")


# Run 1's agent leaves a reader of the environment's Secret that dropped its environment and
# session; it copies every key it finds to PID 1's output (the container's log), after a pause
# that lets run 1's own key go.
LEAVE_A_READER = r"""
setsid env -i sh -c '
    echo "reader up" >/proc/1/fd/1
    sleep 1
    while :; do
        for f in "$0"/*; do [ -f "$f" ] && echo "READ $f $(cat "$f")"; done
    done >/proc/1/fd/1 2>/dev/null
' /var/run/narrative-env </dev/null >/dev/null 2>&1 &
sleep 1.5
"""


@pytest.mark.skipif(bool(REAL_CONTEXT), reason="reads the test kubelet's container log")
def test_a_process_a_run_leaves_never_reads_the_next_runs_token(
    cli: Cli, workspace: Path, k8s_config: dict[str, Any]
) -> None:
    """The next run's token goes into the environment's Secret only once every process of
    the last run was killed: a reader run 1 leaves behind sees none of run 2's keys. (Before
    the fix the hub wrote the Secret first, then swept in the same exec: this test read run
    2's token there.)"""
    from tests.providers import docker_support
    from tests.providers.k8s_support import STANDIN

    cli.run("init")
    rid = _create(cli, "leak", k8s_config)["resource_id"]
    assert start(cli, "--env", "leak", "--", "sh", "-c", LEAVE_A_READER)["status"] == "succeeded"
    second = start(cli, "--env", "leak", "--", "true")
    assert second["status"] == "succeeded", second
    spawned = [
        e for e in events(store_dir_of(workspace), second["id"]) if e["type"] == "runtime.spawned"
    ]
    marker = spawned[0]["handle"].removeprefix("k8s:")
    server = STANDIN[0]
    uid = server.objects[("pods", k8s_config.get("namespace", "default"), rid)]["metadata"]["uid"]
    api = docker_support.connect()
    try:
        log = api.logs(server.containers[uid]).decode(errors="replace")
    finally:
        api.close()
    assert "reader up" in log  # the reader ran, and was looking when run 2 started
    assert marker not in log and "NARRATIVE_TOKEN" not in log, log[-2000:]
    cli.run("env", "delete", "leak")


def test_a_pod_that_cannot_run_says_why(
    cli: Cli, workspace: Path, k8s_config: dict[str, Any]
) -> None:
    cli.run("init")
    config = {**k8s_config, "image": "no-such-image:404", "start_timeout": 3}
    out = cli.run(
        "env",
        "create",
        "broken",
        "--provider",
        "k8s",
        *[a for k, v in extra_pairs(config) for a in ("--config", f"{k}={v}")],
        check=False,
    )
    assert out.returncode == 1, out
    message = out.stderr.strip().splitlines()[-1]
    assert "did not run within 3s" in message and "no-such-image:404" in message, message
    assert "Traceback" not in out.stderr
