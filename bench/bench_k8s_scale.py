"""Scale benchmark of the ``k8s`` provider (issue 17): N environments (default 50) through
``narrative`` against the same N pods made directly, both on the API-server stand-in and test
kubelet of the test suite (``tests/providers/k8s_standin.py``: pods are containers on the
private Docker engine, ``DOCKER_HOST``; the default image is built offline if missing).

* OURS: ONE ``narrative env create k0 ... kN-1 --provider k8s`` (each claim, Secret,
  NetworkPolicy and pod made and waited for until it runs, 16 side by side), then ONE
  ``narrative run start --env k0 ... --env kN-1 -- sh -c 'echo hi > out.txt'`` (a fan-out
  through the hub: the runtime in each pod dials it, fetches its input, runs, ships its
  result home), then ONE ``env delete k0 ... kN-1``. The hub is the ``run start`` process:
  its peak RSS is reported (target ≤ 200 MB).
* ANCHOR: the official client, no hub, no narrative: for each pod, create a claim and the pod
  and wait until it runs, then run the same command in each through ``pods/exec`` and read
  ``out.txt`` back, then delete each pod and claim and wait until it is gone.

Measured here (2 vCPUs, quiet), 50 environments, seven runs: 1.29-1.64x, median 1.40x (target
met in six of seven); the code before (two execs a run, every record of the store decoded per
run, runtimes importing the runs of their base's thread), alternating in the same period:
1.58x, 1.92x. Hub peak RSS 67 MB (target met). Each pod's warm runtime
(``providers/zygote.py``) imports the runtime during the creates, and each run's runtime is
forked from it; one ``pods/exec`` a run. Before: 11.3x, 4.6x, 2.76x, 1.85x, 1.75x, 1.59x
(README, "Kubernetes scale").

Target: OURS / ANCHOR ≤ 1.5x against the anchor one pod at a time; the anchor 16 pods at a
time (as ``env create`` works) is reported beside it.

Usage::

    DOCKER_HOST=unix:///tmp/nd-docker/docker.sock python bench/bench_k8s_scale.py --count 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import compile_bytecode, isolated_env, log, report_phases, run  # noqa: E402

COMMAND = "echo hi > out.txt"
PARALLEL = 16
"""Pods at a time in the second anchor: what ``env create`` does by default."""


def anchor(kubeconfig: str, count: int, workers: int = 1, prefix: str = "anchor") -> float:
    """Seconds to make, use and remove ``count`` pods with the client alone, ``workers`` pods
    at a time (1: one after another)."""
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client, config, watch

    from providers.k8s import manifests
    from providers.k8s.config import K8sConfig
    from providers.k8s.podexec import PodExec
    from providers.k8s.rest import KubeRest

    api = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    cfg = K8sConfig(kubeconfig=kubeconfig, grace_period=2)
    labels = {"bench": "anchor"}
    names = [f"{prefix}-{i}" for i in range(count)]

    def wait(name: str, gone: bool) -> None:
        for event in watch.Watch().stream(
            core.list_namespaced_pod,
            "default",
            field_selector=f"metadata.name={name}",
            timeout_seconds=600,
        ):
            pod = api.sanitize_for_serialization(event["object"])
            if gone and event["type"] == "DELETED":
                return
            if not gone and manifests.pod_state(pod).state == "running":
                return
        raise RuntimeError(f"{name}: timed out")

    def make(name: str) -> None:
        claim = core.create_namespaced_persistent_volume_claim(
            "default", manifests.claim_manifest(name, cfg, labels)
        )
        owner = manifests.owner_reference("PersistentVolumeClaim", name, claim.metadata.uid)
        core.create_namespaced_pod("default", manifests.pod_manifest(name, cfg, labels, owner))
        wait(name, gone=False)

    pods = PodExec(KubeRest(api), "default")  # the client's exec WebSocket (ws_client)

    def use(name: str) -> None:
        pods.quiet(name, ["sh", "-c", f"cd /work && {COMMAND}"], "run")
        assert pods.quiet(name, ["cat", "/work/out.txt"], "read") == b"hi\n"

    def remove(name: str) -> None:
        core.delete_namespaced_pod(name, "default", grace_period_seconds=2)
        wait(name, gone=True)
        core.delete_namespaced_persistent_volume_claim(name, "default")

    started = time.perf_counter()
    seconds = []
    with ThreadPoolExecutor(workers) as pool:
        for phase in (make, use, remove):
            list(pool.map(phase, names))
            seconds.append(time.perf_counter() - started - sum(seconds))
    elapsed = time.perf_counter() - started
    log(f"  creates {seconds[0]:.1f} s, runs {seconds[1]:.1f} s, deletes {seconds[2]:.1f} s")
    api.close()
    return elapsed


def ours(kubeconfig: str, count: int, scratch: Path) -> tuple[float, float, float]:
    """Seconds through narrative (creates, fan-out, deletes), the fan-out's seconds and the
    hub's peak RSS in MB."""
    from providers.docker.image import host_runtime

    home, ws = scratch / "home", scratch / "ws"
    home.mkdir()
    ws.mkdir()
    (ws / "README.md").write_text("# bench\n")
    env = isolated_env(home)
    env["PYTHONPATH"] = str(REPO)
    exe = [sys.executable, "-m", "cli"]
    config = {
        "kubeconfig": kubeconfig,
        "grace_period": "2",
        "runtime": json.dumps(host_runtime().runtime),
    }
    pairs = [a for k, v in config.items() for a in ("--config", f"{k}={v}")]
    names = [f"k{i}" for i in range(count)]
    compile_bytecode(env, ws)  # fifty runtimes start as installed, not compiling from source
    started = time.perf_counter()
    run([*exe, "init"], env=env, cwd=ws)
    made = run([*exe, "env", "create", *names, "--provider", "k8s", *pairs], env=env, cwd=ws)
    if made.rc != 0:
        raise RuntimeError(made.stderr[-2000:])
    created = time.perf_counter()
    envs = [a for name in names for a in ("--env", name)]
    fan = run([*exe, "run", "start", "--json", *envs, "--", "sh", "-c", COMMAND], env=env, cwd=ws)
    if fan.rc != 0:
        raise RuntimeError(fan.stderr[-2000:])
    doc = json.loads(fan.stdout)
    items = doc["items"] if doc["kind"] == "run_result_list" else [doc]
    failed = [r for r in items if r["status"] != "succeeded"]
    if failed or len(items) != count:
        raise RuntimeError(f"{len(failed)} of {len(items)} runs failed: {failed[:2]}")
    deleted = run([*exe, "env", "delete", *names], env=env, cwd=ws)
    if deleted.rc != 0:
        raise RuntimeError(deleted.stderr[-2000:])
    creating = created - started
    log(f"  creates {creating:.1f} s, fan-out {fan.seconds:.1f} s, deletes {deleted.seconds:.1f} s")
    report_phases(exe, env, ws, [r["id"] for r in items])  # fifty ``run show``: not timed
    return creating + fan.seconds + deleted.seconds, fan.seconds, fan.maxrss_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--skip-anchor", action="store_true", help="(debugging) only ours")
    parser.add_argument("--json-out", type=Path, help="samples as JSON (for bench/run_all.py)")
    args = parser.parse_args()
    from tests.providers import docker_support
    from tests.providers.k8s_standin import standin_cluster

    api = docker_support.connect()
    from providers.docker.image import DEFAULT_IMAGE, build_image

    try:
        api.inspect_image(DEFAULT_IMAGE)
    except Exception:
        build_image(api, DEFAULT_IMAGE)
    scratch = Path(tempfile.mkdtemp(prefix="bench-k8s-"))
    try:
        # not the tests' "pytest-" owner prefix: a test session sweeping the shared engine
        # would remove the bench's containers
        label = "bench-k8s-" + uuid.uuid4().hex[:12]
        for kubeconfig, _server in standin_cluster(api, str(scratch), label):
            log(f"anchor: {args.count} pods through the client, one after another")
            direct = anchor(kubeconfig, args.count) if not args.skip_anchor else 1.0
            log(f"anchor: {args.count} pods through the client, {PARALLEL} at a time")
            side = anchor(kubeconfig, args.count, PARALLEL, "side") if not args.skip_anchor else 1.0
            log(f"ours: {args.count} environments through narrative")
            try:
                total, fan_out, rss = ours(kubeconfig, args.count, scratch)
            except Exception as exc:
                log(f"ours failed: {exc}")
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for container in api.containers(all=True, filters={"label": f"narrative.owner={label}"}):
            api.remove_container(container["Id"], force=True)
        api.close()
    ratio, ratio_side = total / direct, total / side
    print(
        f"k8s scale, {args.count} environments (stand-in API server + test kubelet on Docker, "
        f"{os.cpu_count()} CPUs)"
    )
    print(f"  anchor (client, no hub), one pod at a time: {direct:8.1f} s")
    print(f"  anchor (client, no hub), {PARALLEL} pods at a time: {side:8.1f} s")
    print(
        f"  narrative (env create x{args.count}, one fan-out run, env delete x{args.count}): "
        f"{total:8.1f} s, of which the fan-out {fan_out:.1f} s"
    )
    print(f"  ratio {ratio:.2f}x (target <= 1.5x: {'ok' if ratio <= 1.5 else 'MISSED'})")
    print(f"  ratio against the anchor {PARALLEL} at a time: {ratio_side:.2f}x")
    print(
        f"  hub peak RSS during the fan-out {rss:.0f} MB (target <= 200 MB: "
        f"{'ok' if rss <= 200 else 'MISSED'})"
    )
    if args.json_out is not None:
        row = {"key": "scale", "ours": [total], "anchor": [direct], "fan_out": fan_out,
               "ours_rss_kib": [int(rss * 1024)], "target": 1.5}  # fmt: skip
        args.json_out.write_text(json.dumps({"benchmark": "k8s_scale", "rows": [row]}) + "\n")


if __name__ == "__main__":
    main()
