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
from tests.conftest import Cli, git, store_dir_of
from tests.gateway.hub.hub_support import file, start
from tests.providers.k8s_support import REAL_CONTEXT, k8s_config_fixture  # noqa: F401

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
    # ready the pod and spawn (held until the runtime is up), wait for its end, copy its log: a hub
    # that looks into the pod again and again while the runtime starts costs fifty pods dear
    execs = STANDIN[0].exec_commands[execs_before:]
    assert len(execs) <= 3, [" ".join(argv)[:80] for argv in execs]
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
