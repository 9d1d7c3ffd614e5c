"""Web view benchmark: a page of 1,000 runs against ``narrative run list --json`` for the same
runs (target: ≤ 2x).

A store with N recorded runs (default 1,000: started and finished through the library, as the
hub records them; statuses mixed), a real ``narrative serve`` in a child process with its web
view, and a logged-in session (``narrative hub ui``, then the login URL). Timed, alternating,
REPS times each: ours is one HTTP GET of ``/runs?per=N`` (the whole page received, on a fresh
connection); the anchor is the CLI process ``narrative run list --json`` (fork to exit), which
a person or script would otherwise run. Medians; the ratio is ours/anchor. Most of the anchor is
the CLI's start-up, so the same listing done in-process (``list_runs`` and JSON, what ``run list``
does once started) is printed too, for information.

Usage: ``python bench/bench_web.py [--runs N] [--reps R]``
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from narrative.hierarchy import finish_run, list_runs, resolve_thread, start_run  # noqa: E402
from narrative.store import Store  # noqa: E402

NARRATIVE = str(Path(sys.executable).with_name("narrative"))
STATUSES = ("succeeded", "failed", "cancelled", "killed")


def make_runs(workspace: Path, count: int) -> Store:
    store = Store.init(str(workspace))
    thread = resolve_thread(store, None).id
    for i in range(count):
        run = start_run(store, thread, agent=f"agent-{i % 7}", environment=f"env-{i % 5}")
        finish_run(store, run.id, STATUSES[i % len(STATUSES)], i % 3)
    return store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json-out", type=Path, help="samples as JSON (for bench/run_all.py)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        # the store's data directory in the temp dir, for this process and the children alike
        os.environ["HOME"] = env["HOME"] = tmp
        os.environ["XDG_DATA_HOME"] = env["XDG_DATA_HOME"] = str(Path(tmp) / "data")
        store = make_runs(workspace, args.runs)
        hub = subprocess.Popen(
            [NARRATIVE, "serve", "--port", "0", "--json"],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert hub.stdout is not None
            ready = json.loads(hub.stdout.readline())
            login = subprocess.run(
                [NARRATIVE, "hub", "ui"],
                check=False,
                cwd=workspace,
                env=env,
                capture_output=True,
                text=True,
            )
            if login.returncode:
                raise SystemExit(f"narrative hub ui failed: {login.stderr}")
            login_url = login.stdout.strip()
            jar = http.cookiejar.CookieJar()
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
            opener.open(login_url).read()
            page_url = f"{ready['web']}runs?per={args.runs}"

            def ours() -> float:
                start = time.perf_counter()
                with opener.open(page_url) as response:
                    body = response.read()
                elapsed = time.perf_counter() - start
                assert body.count(b"<tr data-run=") == args.runs, "not every run on the page"
                return elapsed

            def anchor() -> float:
                start = time.perf_counter()
                out = subprocess.run(
                    [NARRATIVE, "run", "list", "--json"],
                    cwd=workspace,
                    env=env,
                    capture_output=True,
                    check=True,
                ).stdout
                elapsed = time.perf_counter() - start
                assert len(json.loads(out)["items"]) == args.runs
                return elapsed

            def in_process() -> float:
                start = time.perf_counter()
                json.dumps([r.to_dict() for r in list_runs(store)])
                return time.perf_counter() - start

            ours(), anchor()  # warm-up: page cache, templates compiled
            web, cli, library = [], [], []
            for _ in range(args.reps):
                web.append(ours())
                cli.append(anchor())
                library.append(in_process())
        finally:
            hub.send_signal(signal.SIGTERM)
            hub.wait(timeout=60)
    web_ms, cli_ms = statistics.median(web) * 1000, statistics.median(cli) * 1000
    print(f"runs: {args.runs}, reps: {args.reps}")
    print(f"web view page /runs?per={args.runs}: median {web_ms:.1f} ms")
    print(f"narrative run list --json:        median {cli_ms:.1f} ms")
    print(f"ratio web/cli: x{web_ms / cli_ms:.2f} (target <= 2)")
    lib_ms = statistics.median(library) * 1000
    print(f"(informational: the same list in-process, no CLI start-up: {lib_ms:.1f} ms)")
    if args.json_out is not None:
        row = {"key": "page", "ours": web, "anchor": cli, "in_process": library, "target": 2.0}
        args.json_out.write_text(json.dumps({"benchmark": "web", "rows": [row]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
