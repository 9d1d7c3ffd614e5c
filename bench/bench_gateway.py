"""Gateway benchmark: our gateway against a raw ``websockets`` echo on loopback (DESIGN.md §6).

Both sides run their server in a child process and their client here, with the same
``websockets`` settings (no compression, loopback, same payload), alternating who goes first
between reps; medians of reps are compared. Our servers are the real CLI
(``narrative gateway serve``); the call is the built-in ``gateway:echo`` handler, so the
figures are the gateway's own cost: envelope, validation, routing, handler task, reply.

Scenarios (targets from issue 5):

* ``latency``: sequential request/reply, one hop; p50 ≤ 1.5x raw echo p50 (p99 reported, and
  the CPU time per call of all the side's processes, client and servers: on a loaded machine
  the p50 is mostly waiting for a core, the CPU time is not).
* ``throughput``: 64 requests in flight; rate ≥ 0.4x the raw echo's pipelined rate.
* ``chain``: a 3-hop linear chain (client → A → B → C, handler at C); p50 ≤ 4x raw one-hop
  echo p50.
* ``memory``: 100,000 requests (64 in flight) through one hop; the server's RSS growth after a
  warm-up must stay ≤ 64 MB (the raw echo server's growth is shown for reference).

Usage::

    python bench/bench_gateway.py --quick     # smoke run: fewer requests, 20,000 for memory
    python bench/bench_gateway.py             # full: 5 reps, 100,000 requests for memory
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_model, isolated_env, log, start_announcing
from websockets.asyncio.client import ClientConnection, connect

from gateway.client import GatewayClient
from gateway.limits import Limits
from gateway.tokens import TokenSigner, load_or_create_key

SCENARIOS = {
    "latency": "one-hop request/reply",
    "throughput": "64 in flight",
    "chain": "3-hop linear chain",
    "memory": "RSS growth over 100,000 requests",
}
PAYLOAD = {"n": 0, "data": "x" * 64}
WINDOW = 64
MEMORY_BUDGET_MB = 64.0

_ECHO_SERVER = r"""
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, compression=None, max_queue=64) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Servers:
    """Starts the children of both sides in a private directory and environment."""

    def __init__(self, work: Path, narrative: Path) -> None:
        self.work = work
        self.narrative = narrative
        self.env = isolated_env(work / "home")
        self.key = work / "gateway.key"
        self.signer = TokenSigner(load_or_create_key(self.key))
        self.started: list[Server] = []

    def _start(self, argv: list[str], parse: Callable[[str], str]) -> Server:
        proc, line = start_announcing(argv, env=self.env, cwd=self.work)
        server = Server(proc, parse(line))
        self.started.append(server)
        return server

    def echo(self) -> Server:
        return self._start(
            [sys.executable, "-c", _ECHO_SERVER], lambda line: f"ws://127.0.0.1:{int(line)}"
        )

    def gateway(self, env_id: str, connect: str | None = None, config: Any = None) -> Server:
        argv = [str(self.narrative), "gateway", "serve", "--port", "0", "--json"]
        argv += ["--env", env_id, "--key-file", str(self.key), "--root", str(self.work)]
        if connect:
            argv += ["--connect", connect]
        if config is not None:
            path = self.work / f"{env_id}.json"
            path.write_text(json.dumps(config))
            argv += ["--config", str(path)]
        return self._start(argv, lambda line: str(json.loads(line)["url"]))

    def chain(self) -> Server:
        """A -> B -> C; returns A (every call proxied onwards, handled at C)."""
        c = self.gateway("c")
        b = self.gateway("b", c.url, {"rules": {"*": {"mode": "proxy", "environment": "c"}}})
        return self.gateway("a", b.url, {"rules": {"*": {"mode": "proxy", "environment": "b"}}})

    def token(self) -> str:
        return self.signer.issue("bench", "client", 3600)

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.started.clear()


# --------------------------------------------------------------------------- clients


async def raw_latency(url: str, n: int) -> list[float]:
    frame = json.dumps(PAYLOAD)
    async with connect(url, compression=None, proxy=None) as ws:
        return await timed(n, lambda: _raw_roundtrip(ws, frame))


async def _raw_roundtrip(ws: ClientConnection, frame: str) -> None:
    await ws.send(frame)
    await ws.recv()


async def ours_latency(url: str, token: str, n: int) -> list[float]:
    async with GatewayClient(url, token, limits=Limits(transport_timeout=10)) as client:
        return await timed(n, lambda: client.call("gateway", "echo", PAYLOAD))


async def timed(n: int, once: Callable[[], Awaitable[Any]]) -> list[float]:
    for _ in range(min(200, n)):  # warm-up: connection, caches, allocator
        await once()
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await once()
        samples.append(clock() - t0)
    return samples


async def raw_rate(url: str, n: int) -> float:
    """Pipelined: a sender keeps WINDOW frames outstanding, a receiver drains; messages/s."""
    frame = json.dumps(PAYLOAD)
    async with connect(url, compression=None, proxy=None, max_queue=WINDOW * 2) as ws:
        window = asyncio.Semaphore(WINDOW)

        async def sender() -> None:
            for _ in range(n):
                await window.acquire()
                await ws.send(frame)

        t0 = time.perf_counter()
        task = asyncio.create_task(sender())
        for _ in range(n):
            await ws.recv()
            window.release()
        await task
        return n / (time.perf_counter() - t0)


async def ours_rate(url: str, token: str, n: int) -> float:
    async with GatewayClient(url, token, limits=Limits(transport_timeout=10)) as client:
        return await _ours_rate(client, n)


async def _ours_rate(client: GatewayClient, n: int) -> float:
    per = n // WINDOW

    async def worker() -> None:
        for _ in range(per):
            await client.call("gateway", "echo", PAYLOAD)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WINDOW)))
    return per * WINDOW / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- scenarios


@dataclass
class Row:
    key: str
    label: str
    target: str
    ours: list[float] = field(default_factory=list)
    anchor: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    ok: bool | None = None


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_latency(servers: Servers, reps: int, n: int, chain: bool) -> Row:
    key = "chain" if chain else "latency"
    row = Row(key, SCENARIOS[key], "p50 ≤ 4x" if chain else "p50 ≤ 1.5x")
    echo = servers.echo()
    ours = servers.chain() if chain else servers.gateway("hub")
    ours_procs = [s for s in servers.started if s is not echo]
    token = servers.token()
    p50o, p50a, p99o, p99a = [], [], [], []
    # CPU time per call of every process of a side (this client + its servers): steadier than
    # wall-clock latency on a shared machine, where waiting for a core dominates the p50
    cpu_o: list[float] = []
    cpu_a: list[float] = []

    def cpu_of(procs: list[Server]) -> float:
        return time.process_time() + sum(p.cpu_seconds() for p in procs)

    calls = n + min(200, n)  # timed() warms up with 200 calls first
    for rep in range(reps):
        order = ["ours", "anchor"] if rep % 2 == 0 else ["anchor", "ours"]
        for side in order:
            if side == "ours":
                c0 = cpu_of(ours_procs)
                s = asyncio.run(ours_latency(ours.url, token, n))
                cpu_o.append((cpu_of(ours_procs) - c0) / calls)
                p50o.append(pct(s, 0.5))
                p99o.append(pct(s, 0.99))
            else:
                c0 = cpu_of([echo])
                s = asyncio.run(raw_latency(echo.url, n))
                cpu_a.append((cpu_of([echo]) - c0) / calls)
                p50a.append(pct(s, 0.5))
                p99a.append(pct(s, 0.99))
        log(f"  rep {rep + 1}: ours p50 {p50o[-1] * 1e3:.3f} ms, raw p50 {p50a[-1] * 1e3:.3f} ms")
    servers.stop_all()
    row.ours, row.anchor = p50o, p50a
    row.extra = {
        "ours_p99_ms": statistics.median(p99o) * 1e3,
        "anchor_p99_ms": statistics.median(p99a) * 1e3,
        "ours_cpu_us_per_call": statistics.median(cpu_o) * 1e6,
        "anchor_cpu_us_per_call": statistics.median(cpu_a) * 1e6,
    }
    row.ratio = statistics.median(p50o) / statistics.median(p50a)
    row.ok = row.ratio <= (4.0 if chain else 1.5)
    return row


def run_throughput(servers: Servers, reps: int, n: int) -> Row:
    row = Row("throughput", SCENARIOS["throughput"], "≥ 0.4x")
    echo = servers.echo()
    ours = servers.gateway("hub")
    token = servers.token()
    cpu_o: list[float] = []
    cpu_a: list[float] = []
    for rep in range(reps):
        order = ["ours", "anchor"] if rep % 2 == 0 else ["anchor", "ours"]
        for side in order:
            if side == "ours":
                c0 = ours.cpu_seconds()
                row.ours.append(asyncio.run(ours_rate(ours.url, token, n)))
                cpu_o.append((ours.cpu_seconds() - c0) / n)
            else:
                c0 = echo.cpu_seconds()
                row.anchor.append(asyncio.run(raw_rate(echo.url, n)))
                cpu_a.append((echo.cpu_seconds() - c0) / n)
        log(f"  rep {rep + 1}: ours {row.ours[-1]:,.0f}/s, raw {row.anchor[-1]:,.0f}/s")
    servers.stop_all()
    # CPU per request is steadier than wall-clock rates on a shared machine: report it too.
    row.extra = {
        "ours_server_cpu_us": statistics.median(cpu_o) * 1e6,
        "anchor_server_cpu_us": statistics.median(cpu_a) * 1e6,
    }
    row.ratio = statistics.median(row.ours) / statistics.median(row.anchor)
    row.ok = row.ratio >= 0.4
    return row


def run_memory(servers: Servers, n: int) -> Row:
    row = Row(
        "memory", SCENARIOS["memory"].replace("100,000", f"{n:,}"), f"≤ {MEMORY_BUDGET_MB:.0f} MB"
    )
    echo = servers.echo()
    ours = servers.gateway("hub")
    token = servers.token()

    async def ours_run() -> tuple[float, float]:
        async with GatewayClient(ours.url, token) as client:
            await _ours_rate(client, 5000)
            before = ours.rss_mb()
            await _ours_rate(client, n)
            return before, ours.rss_mb()

    async def raw_run() -> tuple[float, float]:
        await raw_rate(echo.url, 5000)
        before = echo.rss_mb()
        await raw_rate(echo.url, n)
        return before, echo.rss_mb()

    ob, oa = asyncio.run(ours_run())
    ab, aa = asyncio.run(raw_run())
    servers.stop_all()
    row.ours, row.anchor = [oa - ob], [aa - ab]
    row.extra = {
        "ours_rss_before_mb": ob,
        "ours_rss_after_mb": oa,
        "anchor_rss_before_mb": ab,
        "anchor_rss_after_mb": aa,
    }
    row.ok = (oa - ob) <= MEMORY_BUDGET_MB
    log(f"  ours {ob:.1f} -> {oa:.1f} MB, raw {ab:.1f} -> {aa:.1f} MB")
    return row


# --------------------------------------------------------------------------- report


def render(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| scenario | ours | raw websockets | ratio | target | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.key in ("latency", "chain"):
            o50, a50 = statistics.median(r.ours) * 1e3, statistics.median(r.anchor) * 1e3
            o = f"p50 {o50:.3f} ms, p99 {r.extra['ours_p99_ms']:.3f} ms"
            a = f"p50 {a50:.3f} ms, p99 {r.extra['anchor_p99_ms']:.3f} ms"
            if "ours_cpu_us_per_call" in r.extra:  # all processes of the side, per call
                o += f", CPU {r.extra['ours_cpu_us_per_call']:.0f} µs/call"
                a += f", CPU {r.extra['anchor_cpu_us_per_call']:.0f} µs/call"
            if r.key == "chain":
                a += " (one hop)"
        elif r.key == "throughput":
            cpu_o, cpu_a = r.extra["ours_server_cpu_us"], r.extra["anchor_server_cpu_us"]
            o = f"{statistics.median(r.ours):,.0f} req/s ({cpu_o:.0f} µs server CPU/req)"
            a = f"{statistics.median(r.anchor):,.0f} msg/s ({cpu_a:.0f} µs)"
        else:
            o = f"+{r.ours[0]:.1f} MB"
            a = f"+{r.anchor[0]:.1f} MB"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        status = "ok" if r.ok else "MISS"
        lines.append(f"| {r.label} | {o} | {a} | {ratio} | {r.target} | {status} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Gateway benchmark: ours vs a raw websockets echo.")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer requests and reps")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; 3 with --quick)")
    ap.add_argument("--requests", type=int, help="requests per latency/throughput rep")
    ap.add_argument("--memory-requests", type=int, help="requests for the memory scenario")
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}"
    )
    ap.add_argument(
        "--narrative",
        type=Path,
        default=Path(sys.executable).parent / "narrative",
        help="our CLI (default: next to this Python)",
    )
    ap.add_argument("--json-out", type=Path, help="results file (default bench/results/...)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 5)
    args.requests = args.requests or (2000 if args.quick else 10000)
    args.memory_requests = args.memory_requests or (20000 if args.quick else 100_000)
    args.scenario_keys = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_keys if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if args.reps < 1 or args.requests < WINDOW:
        ap.error(f"--reps must be >= 1 and --requests >= {WINDOW}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.narrative.exists():
        log(f"error: our CLI {args.narrative} not found")
        return 2
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="narrative-bench-gateway-"))
    servers = Servers(work, args.narrative)
    rows: list[Row] = []
    try:
        for key in args.scenario_keys:
            log(f"scenario: {SCENARIOS[key]}")
            if key in ("latency", "chain"):
                rows.append(run_latency(servers, args.reps, args.requests, key == "chain"))
            elif key == "throughput":
                rows.append(run_throughput(servers, args.reps, args.requests))
            else:
                rows.append(run_memory(servers, args.memory_requests))
    finally:
        servers.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    import websockets

    header = (
        f"Gateway benchmark — loopback, websockets {websockets.__version__}, {args.reps} reps, "
        f"{args.requests:,} requests per rep, medians; {os.cpu_count()} CPUs ({cpu_model()}); "
        f"total run {total:.0f}s."
    )
    print(render(rows, header), flush=True)
    out: Path = args.json_out or RESULTS_DIR / time.strftime("gateway-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "gateway",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": sys.version.split()[0]},
        "total_seconds": total,
        "rows": [r.__dict__ for r in rows],
    }
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    log(f"results: {out}  (total {total:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
