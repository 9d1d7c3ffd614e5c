"""Scale benchmark of the ``daytona`` provider (issue 17): N environments (default 20) on the
Daytona stand-in of the test suite (``tests/providers/daytona_standin.py``: the real SDK, each
sandbox a container on the engine at ``DOCKER_HOST``), one trivial command in each through ONE
``narrative run start --env d1 ... --env dN -- sh -c 'echo hi'`` (the hub fans out).

Reported: the time to create the N environments (one ``env create d1 ... dN``, side by side),
the fan-out's wall time, the time to delete them (one ``env delete``), their total, the time
to the first run's result (its ``finished_at``), the hub's peak resident memory (the ``run
start`` process: the hub runs in it; the runtimes run in the containers), and the ANCHOR:
the same N sandboxes created, commanded and deleted directly through the SDK from N threads,
with no hub. Nothing leaves the machine: the stand-in listens on 127.0.0.1 and its key is a
test value.

Measured on this project's 2-core machine shared with other work (load average about 5), 20
environments, 2026-12-06: every run succeeded; fan-out 32.2 s (33.8 s in an earlier run), first
result after 16.8 s (14.6 s), hub peak RSS 123 MB (target 200 MB); creating the 20 one CLI
process each 107 s, deleting them 64 s, total 203 s; the SDK anchor (20 threads, create + exec
+ delete, no hub) 4.7 s: fan-out 6.9x the anchor, total 43x. One environment alone: create
2.1 s, run 3.5 s (19 stand-in requests), delete 2.9 s. Not tuned: the creates and deletes are
sequential CLI calls, and the hub's blocking calls share its thread pool.

Usage::

    DOCKER_HOST=unix:///tmp/nd-docker/docker.sock python bench/bench_daytona.py [--envs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import RESULTS_DIR, isolated_env, log, report_phases  # noqa: E402


def _narrative(env: dict[str, str], cwd: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "cli", *args]
    done = subprocess.run(argv, check=False, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"narrative {' '.join(args[:3])} failed: {done.stderr[-1500:]}")
    return done.stdout


def _fan_out(env: dict[str, str], cwd: Path, names: list[str]) -> tuple[float, int, list[Any]]:
    """Wall seconds, peak RSS (KiB) and the runs of one ``run start`` over ``names``."""
    argv = [sys.executable, "-m", "cli", "run", "start", "--json"]
    for name in names:
        argv += ["--env", name]
    argv += ["--", "sh", "-c", "echo hi"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"run start failed: {err.read().decode()[-2000:]}")
        runs = json.loads(out.read())["items"]
    return seconds, usage.ru_maxrss, runs


def _anchor(stand_in: Any, count: int) -> float:
    """N sandboxes created, commanded and deleted straight through the SDK, N threads."""
    from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaConfig

    client = Daytona(
        DaytonaConfig(api_key=stand_in_key(), api_url=stand_in.api_url, target="local")
    )

    def one(_: int) -> str:
        sandbox = client.create(CreateSandboxFromSnapshotParams(auto_stop_interval=0))
        out = sandbox.process.exec("echo hi").result
        sandbox.delete()
        return str(out)

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    seconds = time.perf_counter() - started
    assert all(r.strip() == "hi" for r in results), results
    return seconds


def stand_in_key() -> str:
    from tests.providers.daytona_standin import API_KEY

    return API_KEY


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", type=int, default=20)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)

    from tests.providers.daytona_standin import DaytonaStandIn

    stand_in = DaytonaStandIn().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            ws = root / "ws"
            ws.mkdir()
            (ws / "README.md").write_text("# bench\n")
            env = isolated_env(root / "home")
            env.update(
                PYTHONPATH=str(REPO),
                DAYTONA_API_KEY=stand_in_key(),
                DAYTONA_API_URL=stand_in.api_url,
            )
            _narrative(env, ws, "init")
            config = {
                "api_url": stand_in.api_url,
                "target": "local",
                "runtime": json.dumps(stand_in.runtime),
                "auto_stop_interval": "0",
            }
            pairs = [a for k, v in config.items() for a in ("--config", f"{k}={v}")]
            names = [f"d{i + 1}" for i in range(args.envs)]
            log(f"creating {len(names)} daytona environments on the stand-in ...")
            started = time.perf_counter()
            _narrative(env, ws, "env", "create", *names, "--provider", "daytona", *pairs)
            create_seconds = time.perf_counter() - started
            log("fan-out: one run start over all of them ...")
            wall_clock = datetime.now().astimezone()
            seconds, rss_kib, runs = _fan_out(env, ws, names)
            statuses = sorted({r["status"] for r in runs})
            finished = sorted(
                datetime.fromisoformat(r["finished_at"]) for r in runs if r.get("finished_at")
            )
            first = (finished[0] - wall_clock).total_seconds() if finished else None
            log(f"fan-out {seconds:.1f}s, first result {first}s, peak RSS {rss_kib / 1024:.0f} MB")
            report_phases([sys.executable, "-m", "cli"], env, ws, [r["id"] for r in runs])
            started = time.perf_counter()
            _narrative(env, ws, "env", "delete", *names)
            delete_seconds = time.perf_counter() - started
        log("anchor: the same sandboxes straight through the SDK ...")
        anchor = _anchor(stand_in, args.envs)
    finally:
        stand_in.stop()

    body = {
        "environments": args.envs,
        "create_seconds": round(create_seconds, 2),
        "fan_out_seconds": round(seconds, 2),
        "delete_seconds": round(delete_seconds, 2),
        "total_seconds": round(create_seconds + seconds + delete_seconds, 2),
        "first_result_seconds": None if first is None else round(first, 2),
        "hub_peak_rss_mb": round(rss_kib / 1024, 1),
        "run_statuses": statuses,
        "anchor_sdk_seconds": round(anchor, 2),
        "ratio_total_vs_anchor": round((create_seconds + seconds + delete_seconds) / anchor, 2),
        "ratio_fan_out_vs_anchor": round(seconds / anchor, 2),
    }
    print(json.dumps(body, indent=2))
    out = args.json_out or RESULTS_DIR / time.strftime("daytona-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # samples in the shape bench/run_all.py reads (one run: one sample per side)
    rows = [
        {"key": "total", "ours": [body["total_seconds"]], "anchor": [anchor],
         "ours_rss_kib": [int(rss_kib)]},
        {"key": "fan-out", "ours": [seconds], "anchor": [anchor], "ours_rss_kib": [int(rss_kib)]},
    ]  # fmt: skip
    doc = {"benchmark": "daytona", "cpus": os.cpu_count(), **body, "rows": rows}
    out.write_text(json.dumps(doc) + "\n")
    log(f"results: {out}")
    return 0 if statuses == ["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
