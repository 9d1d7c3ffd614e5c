"""CLI start-up: ``narrative info`` in an initialised workspace against ``python -c pass`` on the
same interpreter (issue 18; target ≤ 3x). Cold processes, alternating who goes first, medians.

Usage::

    python bench/bench_startup.py --reps 11
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, check, compile_bytecode, cpu_model, isolated_env, log, run

TARGET = 3.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--narrative", type=Path, default=Path(sys.executable).parent / "narrative")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        (root / "home").mkdir()
        ws = root / "ws"
        ws.mkdir()
        env = isolated_env(root / "home")
        compile_bytecode(env, ws)  # measured as installed, not compiling from source each time
        check(run([args.narrative, "init"], env=env, cwd=ws))
        sides = {
            "ours": [str(args.narrative), "info"],
            "anchor": [sys.executable, "-c", "pass"],
        }
        for argv_ in sides.values():  # warm-up: page cache, bytecode
            check(run(argv_, env=env, cwd=ws))
        samples: dict[str, list[float]] = {"ours": [], "anchor": []}
        rss: dict[str, list[int]] = {"ours": [], "anchor": []}
        for rep in range(args.reps):
            for side in ("ours", "anchor") if rep % 2 == 0 else ("anchor", "ours"):
                p = check(run(sides[side], env=env, cwd=ws))
                samples[side].append(p.seconds)
                rss[side].append(p.maxrss_kib)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    o, a = statistics.median(samples["ours"]), statistics.median(samples["anchor"])
    print(f"narrative info {o * 1e3:.0f} ms, python -c pass {a * 1e3:.0f} ms: {o / a:.2f}x "
          f"(target ≤ {TARGET:.0f}x; {cpu_model()})")  # fmt: skip
    out = args.json_out or RESULTS_DIR / time.strftime("startup-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    row = {"key": "startup", "ours": samples["ours"], "anchor": samples["anchor"],
           "ours_rss_kib": rss["ours"], "anchor_rss_kib": rss["anchor"]}  # fmt: skip
    out.write_text(json.dumps({"benchmark": "startup", "rows": [row]}, indent=2) + "\n")
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
