"""Hub benchmark: calls proxied through the hub, and run round trips through a Docker
environment driven by the hub and its runtime (DESIGN.md §6). Ours and the anchor alternate,
several reps, medians, ratio ours/anchor.

Scenarios:

* ``proxied`` (target: p50 ≤ 2x): a proxied call B → hub → B. The hub is the real
  ``narrative serve`` in a child process, with a tiny handler plugin ``bench:echo`` (returns its
  payload, like ``gateway:echo``) that only the hub serves. B is a gateway node in this process
  that connects exactly as the runtime does: ``Gateway(env).connect(hub_url, token)`` with a
  run-scoped token signed by the store's key (``signer.issue(run_id, "b", ttl)``), routing
  ``bench`` → ``hub``; it calls ``bench:echo`` N times in sequence after a warm-up.
  Anchor: one-hop raw ``websockets`` echo on loopback (server in a child process, client here,
  the same code as ``bench_gateway.py``), same payload.
* ``agent`` (informational, no target): the agent's view. A real run through the same hub
  (``narrative run start --env sandbox -- python agent.py``, worktree environment): the agent
  connects with ``GatewayClient(NARRATIVE_GATEWAY_URL, NARRATIVE_GATEWAY_TOKEN)`` to its runtime
  B, whose routing (``proxyExecution.json`` in the workspace) sends ``bench`` to the hub: agent
  → B → hub → B → agent, two hops each way. The agent times its own calls (same warm-up and
  N) and writes the samples to a file; one run per rep. The runtime also records every
  call's route in the run's event log (a notification to the hub and a log append per call):
  that is part of the agent's view. Anchor: the same raw one-hop echo.
* ``docker-reused`` (target ≤ 2x): ``narrative run start --env D -- true`` on the generated
  workspace (5,000 files / 100 MiB with ``--quick``), through a hub embedded in the CLI (no
  ``narrative serve``): the runtime runs inside the container (``network: "host"``,
  ``runtime: [python, -m, cli.main]``, host ``/usr``, the Python install, the venv and this
  checkout mounted read-only at the same paths, workdir ``/bench-work``); the base snapshot goes
  in as a bundle, ``true`` runs, the result comes back as a bundle. D is created once and one
  untimed run warms it up, so the runtime's store in the container already holds the base's
  objects and the restore writes nothing: this is the steady state of a reused environment,
  not a full transfer. Anchor: ``docker cp`` of the workspace in + ``docker exec C true`` +
  ``docker cp`` out, on an already running container of the same image and mounts (also
  warmed up by one untimed round).
* ``docker-first`` (target ≤ 2x): the first run in a fresh container: each rep creates a new
  environment (untimed; its time is recorded), then times the run, whose bundle carries every
  object; the anchor's container is likewise started untimed before its timed round. This is
  the full-transfer comparison.

Timings of ours are the CLI process's wall time (fork to exit). Peak RSS is the CLI's (which
embeds the hub); the runtime in the container is not its descendant and is not counted. The
docker rows also record where a run's time went, from the run's event log (runtime spawn,
runtime start-up and connect, snapshot shipped in, agent, result shipped back, retirement).

Usage::

    python bench/bench_chain.py --quick                  # 3 reps, 2,000 calls per rep
    python bench/bench_chain.py --scenarios proxied,agent --requests 10000
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_gateway as gw
import workspace
from common import (
    SideError,
    check,
    cpu_model,
    isolated_env,
    log,
    parse_bench_args,
    run,
    start_announcing,
    store_of,
    write_results,
)

from gateway.config import parse_config
from gateway.limits import Limits
from gateway.node import Gateway
from gateway.tokens import TokenSigner, load_or_create_key

REPO = Path(__file__).resolve().parent.parent

SCENARIOS = {
    "proxied": ("proxied call B → hub → B", "p50 ≤ 2x raw one-hop echo", 2.0),
    "agent": ("agent → B → hub → B → agent (informational)", "reported", None),
    "docker-reused": ("run round trip, reused Docker environment", "≤ 2x", 2.0),
    "docker-first": ("run round trip, first run in a fresh container", "≤ 2x", 2.0),
}
PAYLOAD = gw.PAYLOAD
ROUTING = {"rules": {"bench": {"mode": "proxy", "environment": "hub"}}}
WORKDIR = "/bench-work"

PLUGIN = textwrap.dedent(
    """
    async def echo(ctx, payload):
        return payload

    def register(registry):
        registry.register("bench", "echo", echo)
    """
)

AGENT = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from gateway.client import GatewayClient
    from gateway.limits import Limits

    async def main(n, payload):
        url, token = os.environ["NARRATIVE_GATEWAY_URL"], os.environ["NARRATIVE_GATEWAY_TOKEN"]
        async with GatewayClient(url, token, limits=Limits(transport_timeout=10)) as client:
            for _ in range(min(200, n)):
                await client.call("bench", "echo", payload)
            samples, clock = [], time.perf_counter
            for _ in range(n):
                t0 = clock()
                await client.call("bench", "echo", payload)
                samples.append(clock() - t0)
        # on stdout (the CLI's stderr under --json): the sandbox hides the host's /tmp
        print("SAMPLES " + json.dumps(samples), flush=True)

    asyncio.run(main(int(sys.argv[1]), json.loads(sys.argv[2])))
    """
)


@dataclass
class Row:
    key: str
    label: str
    target: str
    limit: float | None
    ours: list[float] = field(default_factory=list)
    anchor: list[float] = field(default_factory=list)
    ours_rss_kib: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if not self.ours or not self.anchor:
            return None
        return statistics.median(self.ours) / statistics.median(self.anchor)

    @property
    def status(self) -> str:
        if self.error:
            return f"skipped: {self.error}"
        if self.limit is None or self.ratio is None:
            return "—"
        return "ok" if self.ratio <= self.limit else "**MISS**"


def _round(rep: int, ours: Callable[[], None], anchor: Callable[[], None]) -> None:
    """One rep of both sides; who goes first alternates between reps."""
    for fn in (ours, anchor) if rep % 2 == 0 else (anchor, ours):
        fn()


# --------------------------------------------------------------------------- the hub


class HubSide:
    """A small workspace with a store, a worktree environment ``sandbox``, the agent and the
    routing file; ``narrative serve`` with the ``bench:echo`` plugin in a child process."""

    def __init__(self, root: Path, narrative: Path, env: dict[str, str]) -> None:
        self.ws = root / "hub-ws"
        self.narrative = narrative
        self.info = workspace.generate(self.ws, files=20, size_mb=0.1)
        (self.ws / "agent.py").write_text(AGENT)
        (self.ws / "proxyExecution.json").write_text(json.dumps(ROUTING))
        plugins = root / "plugins"
        plugins.mkdir()
        (plugins / "bench_echo.py").write_text(PLUGIN)
        self.env = {**env, "PYTHONPATH": str(plugins)}
        check(run([narrative, "init"], env=self.env, cwd=self.ws))
        create = [narrative, "env", "create", "sandbox", "--provider", "worktree"]
        check(run(create, env=self.env, cwd=self.ws))
        argv = [str(narrative), "serve", "--port", "0", "--json", "--handlers", "bench_echo"]
        proc, line = start_announcing(argv, env=self.env, cwd=self.ws)
        self.server = gw.Server(proc, str(json.loads(line)["url"]))
        key = store_of(narrative, self.ws, self.env) / "gateway.key"
        self.signer = TokenSigner(load_or_create_key(key), "hub")  # the hub's audience

    def token(self, environment: str) -> str:
        """A run-scoped token, as the hub issues its runtimes (``signer.issue(run, env, ttl)``)."""
        return self.signer.issue("run-bench-chain", environment, 3600.0)

    def stop(self) -> None:
        self.server.stop()


async def node_latency(url: str, token: str, n: int) -> list[float]:
    """B: a gateway node dialling the hub as a runtime does, calling the hub's ``bench:echo``."""
    config = parse_config(ROUTING, "bench routing")
    node = Gateway(
        "b", config=config, capabilities=["runtime"], limits=Limits(transport_timeout=10)
    )
    node.claim("bench")  # as the runtime's plugin does: routing rules apply (bench → hub)
    async with node:
        await node.connect(url, token)
        return await gw.timed(n, lambda: node.call("bench", "echo", PAYLOAD))


def latency_row(key: str, hub: HubSide, echo: gw.Server, reps: int, n: int) -> Row:
    label, target, limit = SCENARIOS[key]
    row = Row(key, label, target, limit)
    p90o: list[float] = []
    p90a: list[float] = []

    def ours() -> None:
        if key == "proxied":
            samples = asyncio.run(node_latency(hub.server.url, hub.token("b"), n))
        else:
            argv = [hub.narrative, "run", "start", "--env", "sandbox", "--json", "--"]
            argv += [sys.executable, "agent.py", str(n), json.dumps(PAYLOAD)]
            p = check(run(argv, env=hub.env, cwd=hub.ws))
            done = json.loads(p.stdout)
            if done.get("status") != "succeeded":
                raise SideError(f"the agent's run did not succeed: {done}")
            lines = [x for x in p.stderr.splitlines() if x.startswith("SAMPLES ")]
            if not lines:
                raise SideError("the agent printed no samples")
            samples = json.loads(lines[-1][len("SAMPLES ") :])
        row.ours.append(gw.pct(samples, 0.5))
        p90o.append(gw.pct(samples, 0.9))

    def anchor() -> None:
        samples = asyncio.run(gw.raw_latency(echo.url, n))
        row.anchor.append(gw.pct(samples, 0.5))
        p90a.append(gw.pct(samples, 0.9))

    for rep in range(reps):
        _round(rep, ours, anchor)
        log(
            f"  rep {rep + 1}: ours p50 {row.ours[-1] * 1e3:.3f} ms, "
            f"raw p50 {row.anchor[-1] * 1e3:.3f} ms"
        )
    row.extra = {
        "ours_p90_ms": statistics.median(p90o) * 1e3,
        "anchor_p90_ms": statistics.median(p90a) * 1e3,
        "calls_per_rep": n,
    }
    return row


# --------------------------------------------------------------------------- docker


def _mounts() -> list[dict[str, Any]]:
    """Host ``/usr``, the Python install, the venv and this checkout, read-only, same paths
    (a path inside one already mounted is left out)."""
    paths: list[str] = []
    for p in ("/usr", sys.base_prefix, sys.prefix, str(REPO)):
        real = os.path.realpath(p)
        if not any(real == q or real.startswith(q + "/") for q in paths):
            paths = [q for q in paths if not q.startswith(real + "/")] + [real]
    for p in paths:
        if p == WORKDIR or WORKDIR.startswith(p + "/") or p.startswith(WORKDIR + "/"):
            raise SideError(f"workdir {WORKDIR} overlaps the mount {p}")
    return [{"source": p, "target": p, "read_only": True} for p in paths]


def _iso(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


#: Phases of a hub run, from its event log: (name, event that ends it).
PHASES = [
    ("start-up: CLI, base snapshot, hub", "run.created"),
    ("spawn runtime (docker exec)", "runtime.spawned"),
    ("runtime start-up + connect", "runtime.connected"),
    ("ship base in (bundle, import, restore)", "snapshot.shipped"),
    ("start agent", "agent.started"),
    ("agent + result snapshot in container", "agent.exited"),
    ("ship result back (bundle)", "result.collected"),
    ("finish run record", "run.finished"),
]


def phases(store_dir: Path, run_id: str, t_start: float, t_end: float) -> dict[str, float]:
    """Seconds per phase of one run (wall clock; the CLI's launch and exit bound it)."""
    from gateway.hub.events import RunEventLog
    from narrative.store import Store

    events = RunEventLog(Store.open(str(store_dir)), run_id).read()
    first: dict[str, float] = {}
    for e in events:
        first.setdefault(e["type"], _iso(e["time"]))
    out: dict[str, float] = {}
    prev = t_start
    for name, kind in PHASES:
        if kind in first:
            out[name] = first[kind] - prev
            prev = first[kind]
    out["retire runtime, close hub, exit"] = t_end - prev
    for e in events:
        if e["type"] in ("snapshot.shipped", "result.collected"):
            out[f"{e['type']} bytes"] = float(e.get("bytes") or 0)
    return out


class DockerSide:
    def __init__(self, root: Path, ws: Path, env: dict[str, str], narrative: Path) -> None:
        import bench_docker_anchor as dock

        if shutil.which("docker") is None:
            raise SideError("no docker CLI")
        if not env.get("DOCKER_HOST"):
            raise SideError("DOCKER_HOST is not set (start one with scripts/docker-engine.sh)")
        probe = subprocess.run(["docker", "info"], env=env, capture_output=True, check=False)
        if probe.returncode != 0:
            raise SideError(f"no Docker engine answers at {env['DOCKER_HOST']}")
        self.root, self.ws, self.env, self.narrative = root, ws, env, narrative
        self.image = dock.ensure_image(env)
        self.mounts = _mounts()
        self.src = root / "docker-src"
        if not self.src.exists():
            shutil.copytree(
                ws, self.src, ignore=shutil.ignore_patterns(".narrative"), symlinks=True
            )
        self.envs: list[str] = []
        self.containers: list[str] = []
        self.counter = iter(range(1_000_000))

    # ours

    def create_env(self, name: str) -> float:
        config = {
            "image": self.image,
            "mounts": json.dumps(self.mounts),
            "network": "host",
            "runtime": json.dumps([sys.executable, "-m", "cli"]),
            "workdir": WORKDIR,
        }
        argv: list[Any] = [self.narrative, "env", "create", name, "--provider", "docker"]
        for k, v in config.items():
            argv += ["--config", f"{k}={v}"]
        self.envs.append(name)
        return check(run(argv, env=self.env, cwd=self.ws)).seconds

    def delete_env(self, name: str) -> None:
        run([self.narrative, "env", "delete", name], env=self.env, cwd=self.ws)
        self.envs.remove(name)

    def run_once(self, name: str) -> tuple[float, int, dict[str, float]]:
        argv = [self.narrative, "run", "start", "--env", name, "--json", "--", "true"]
        t0 = time.time()
        p = check(run(argv, env=self.env, cwd=self.ws))
        done = json.loads(p.stdout)
        if done.get("status") != "succeeded":
            raise SideError(f"run in {name} did not succeed: {done}")
        where = phases(store_of(self.narrative, self.ws, self.env), done["id"], t0, t0 + p.seconds)
        return p.seconds, p.maxrss_kib, where

    # anchor

    def start_container(self) -> str:
        name = f"narrative-chain-anchor-{uuid.uuid4().hex[:12]}"
        volumes = [a for m in self.mounts for a in ("-v", f"{m['source']}:{m['target']}:ro")]
        argv = ["docker", "run", "-d", "--name", name, "--network", "none", "-w", WORKDIR]
        self.containers.append(name)
        check(run([*argv, *volumes, self.image, "sleep", "infinity"], env=self.env, cwd=self.root))
        return name

    def remove_container(self, name: str) -> None:
        subprocess.run(["docker", "rm", "-f", name], env=self.env, capture_output=True, check=False)
        self.containers.remove(name)

    def anchor_round(self, container: str) -> tuple[float, dict[str, float]]:
        out = self.root / f"docker-out-{next(self.counter)}"
        steps = {}
        try:
            for step, argv in (
                ("cp in", ["docker", "cp", f"{self.src}/.", f"{container}:{WORKDIR}"]),
                ("exec true", ["docker", "exec", container, "true"]),
                ("cp out", ["docker", "cp", f"{container}:{WORKDIR}", str(out)]),
            ):
                steps[step] = check(run(argv, env=self.env, cwd=self.root)).seconds
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return sum(steps.values()), steps

    def cleanup(self) -> None:
        for name in list(self.envs):
            self.delete_env(name)
        for name in list(self.containers):
            self.remove_container(name)


def docker_row(key: str, side: DockerSide, reps: int) -> Row:
    label, target, limit = SCENARIOS[key]
    row = Row(key, label, target, limit)
    ours_phases: list[dict[str, float]] = []
    anchor_steps: list[dict[str, float]] = []
    creates: list[float] = []
    reused = key == "docker-reused"
    if reused:
        env_name, container = "dk-reused", side.start_container()
        side.create_env(env_name)
        side.run_once(env_name)  # warm-up: the runtime's store now holds the base
        side.anchor_round(container)

    def ours() -> None:
        name = env_name if reused else f"dk-first-{next(side.counter)}"
        if not reused:
            creates.append(side.create_env(name))
        seconds, rss, where = side.run_once(name)
        if not reused:
            side.delete_env(name)
        row.ours.append(seconds)
        row.ours_rss_kib.append(rss)
        ours_phases.append(where)

    def anchor() -> None:
        c = container if reused else side.start_container()
        seconds, steps = side.anchor_round(c)
        if not reused:
            side.remove_container(c)
        row.anchor.append(seconds)
        anchor_steps.append(steps)

    for rep in range(reps):
        _round(rep, ours, anchor)
        log(f"  rep {rep + 1}: ours {row.ours[-1]:.3f}s, anchor {row.anchor[-1]:.3f}s")
    if reused:
        side.delete_env(env_name)
        side.remove_container(container)

    def medians(dicts: list[dict[str, float]]) -> dict[str, float]:
        keys = list(dict.fromkeys(k for d in dicts for k in d))
        return {k: statistics.median(d[k] for d in dicts if k in d) for k in keys}

    row.extra = {"ours_phases": medians(ours_phases), "anchor_steps": medians(anchor_steps)}
    if creates:
        row.extra["env_create_seconds"] = statistics.median(creates)
    return row


# --------------------------------------------------------------------------- report


def render(rows: list[Row]) -> str:
    lines = [
        "| scenario | ours | anchor | ratio | target | ours peak RSS (MB) | status |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for r in rows:
        if r.error or not r.ours:
            lines.append(f"| {r.label} | — | — | — | {r.target} | — | {r.status} |")
            continue
        o, a = statistics.median(r.ours), statistics.median(r.anchor)
        if r.key in ("proxied", "agent"):
            ours = f"p50 {o * 1e3:.3f} ms, p90 {r.extra['ours_p90_ms']:.3f} ms"
            anchor = f"p50 {a * 1e3:.3f} ms, p90 {r.extra['anchor_p90_ms']:.3f} ms (raw echo)"
            rss = "—"
        else:
            ours, anchor = f"{o:.3f} s", f"{a:.3f} s"
            rss = f"{max(r.ours_rss_kib) / 1024:.0f}"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        lines.append(
            f"| {r.label} | {ours} | {anchor} | {ratio} | {r.target} | {rss} | {r.status} |"
        )
    for r in rows:
        if r.key.startswith("docker") and r.ours:
            lines += ["", f"{r.label}: where ours' time goes (medians, s)", ""]
            for name, value in r.extra["ours_phases"].items():
                shown = f"{value / 1024:,.0f} KiB" if name.endswith("bytes") else f"{value:.3f}"
                lines.append(f"  {name:<42} {shown}")
            steps = ", ".join(f"{k} {v:.3f}" for k, v in r.extra["anchor_steps"].items())
            lines.append(f"  anchor: {steps}")
            if "env_create_seconds" in r.extra:
                lines.append(f"  (untimed) env create: {r.extra['env_create_seconds']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def extra(ap: Any) -> None:
        ap.add_argument("--requests", type=int, help="calls per latency rep (2,000; 10,000 full)")

    args = parse_bench_args(argv, __doc__ or "", SCENARIOS, extra)
    if not args.quick and args.files == workspace.DEFAULT_FILES:
        args.files, args.size_mb = 5000, 100.0  # the issue's workspace size
    args.requests = args.requests or (2000 if args.quick else 10000)
    started = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-chain-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    info: Any = None
    (root / "home").mkdir(exist_ok=True)
    env = isolated_env(root / "home")
    try:
        latency = [k for k in args.scenario_keys if k in ("proxied", "agent")]
        if latency:
            hub = HubSide(root, args.narrative, env)
            info = hub.info
            servers = gw.Servers(root, args.narrative)
            try:
                echo = servers.echo()
                for key in latency:
                    log(f"scenario {key}")
                    try:
                        rows.append(latency_row(key, hub, echo, args.reps, args.requests))
                    except SideError as exc:
                        rows.append(Row(key, *SCENARIOS[key], error=str(exc)))
            finally:
                servers.stop_all()
                hub.stop()
        dockers = [k for k in args.scenario_keys if k.startswith("docker")]
        if dockers:
            ws = root / "ws"
            log(f"generating {args.files:,} files / {args.size_mb:g} MiB in {ws}")
            info = workspace.generate(ws, args.files, args.size_mb, args.seed)
            check(run([args.narrative, "init"], env=env, cwd=ws))
            check(run([args.narrative, "snapshot", "-m", "first"], env=env, cwd=ws))
            side: DockerSide | None = None
            try:
                side = DockerSide(root, ws, env, args.narrative)
            except SideError as exc:
                rows += [Row(k, *SCENARIOS[k], error=str(exc)) for k in dockers]
            if side is not None:
                try:
                    for key in dockers:
                        log(f"scenario {key}")
                        try:
                            rows.append(docker_row(key, side, args.reps))
                        except SideError as exc:
                            rows.append(Row(key, *SCENARIOS[key], error=str(exc)))
                finally:
                    side.cleanup()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    header = (
        f"Hub benchmark — {args.reps} reps, medians; {args.requests:,} calls per latency rep; "
        f"{args.files:,} files / {args.size_mb:g} MiB for the Docker rows; "
        f"{os.cpu_count()} CPUs ({cpu_model()}); total run {total:.0f}s."
    )
    print(f"\n{header}\n\n{render(rows)}", flush=True)
    body = {
        "rows": [
            {**r.__dict__, "ratio": r.ratio, "status": r.status}
            for r in rows  # the dataclass fields plus the derived figures
        ]
    }
    with contextlib.suppress(AttributeError):
        import websockets

        body["websockets"] = websockets.__version__
    path = write_results("chain", args, info, total, {}, body)
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
