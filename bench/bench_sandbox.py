"""Sandbox benchmark: what bubblewrap costs a run in a ``worktree`` environment (issue 13:
a sandboxed run ≤ 1.1x an unsandboxed one).

Two environments of the same store on a small generated workspace: ``boxed`` (the default,
``bwrap``) and ``open`` (``--config sandbox=none``). The same trivial work runs in each,
alternating, several reps, medians; the ratio boxed/open and the absolute difference per run:

* ``run``: ``narrative run start --env E -- true`` (through the hub: runtime started in the
  environment, base shipped in, result shipped back);
* ``exec``: ``narrative env exec E -- true`` (one command, no runtime);
* ``spawn``: the provider's ``exec`` of ``true`` in-process (no CLI start-up: the sandbox's own
  cost per command, reported as an absolute time; its ratio to a no-op means nothing).

Usage::

    python bench/bench_sandbox.py               # 500 files, 11 reps
    python bench/bench_sandbox.py --reps 21
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import workspace
from common import check, cpu_model, isolated_env, log, run

TARGET = 1.1


def _alternate(reps: int, boxed: Callable[[], float], open_: Callable[[], float]):
    b: list[float] = []
    o: list[float] = []
    for rep in range(reps):
        pair = [(b, boxed), (o, open_)]
        for sink, fn in pair if rep % 2 == 0 else reversed(pair):
            sink.append(fn())
    return b, o


def _in_process_exec(ws: Path, env: dict[str, str], reps: int) -> tuple[list[float], list[float]]:
    """Provider.exec of ``true`` in this process, sandboxed and not (same store)."""
    os.environ.update(env)
    from narrative.store import Store
    from providers.manager import EnvironmentManager

    manager = EnvironmentManager(Store.open(workspace=str(ws)))

    def timed(name: str) -> Callable[[], float]:
        _record, provider, resource = manager.require_active(name)

        def once() -> float:
            t = time.perf_counter()
            result = provider.exec(resource, ["true"])
            assert result.exit_code == 0, result
            return time.perf_counter() - t

        return once

    return _alternate(reps, timed("boxed"), timed("open"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--size-mb", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--narrative", type=Path, default=Path(sys.executable).parent / "narrative")
    args = ap.parse_args(argv)
    if shutil.which("bwrap") is None:
        print("bwrap is not installed: nothing to measure (apt-get install bubblewrap)")
        return 1
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    rows = []
    try:
        (root / "home").mkdir()
        env = isolated_env(root / "home")
        ws = root / "ws"
        log(f"generating {args.files:,} files / {args.size_mb:g} MiB in {ws}")
        workspace.generate(ws, args.files, args.size_mb)
        nar = args.narrative
        check(run([nar, "init"], env=env, cwd=ws))
        check(run([nar, "env", "create", "boxed", "--provider", "worktree"], env=env, cwd=ws))
        create_open = [nar, "env", "create", "open", "--provider", "worktree"]
        check(run([*create_open, "--config", "sandbox=none"], env=env, cwd=ws))

        def cli(*words: str) -> Callable[[str], Callable[[], float]]:
            def for_env(name: str) -> Callable[[], float]:
                argv = [nar, *[name if w == "ENV" else w for w in words]]
                return lambda: check(run(argv, env=env, cwd=ws)).seconds

            return for_env

        run_true = cli("run", "start", "--env", "ENV", "--", "true")
        exec_true = cli("env", "exec", "ENV", "--", "true")
        scenarios = {
            "run": ("run through the hub (`run start`)", run_true),
            "exec": ("one command (`env exec`)", exec_true),
        }
        for key, (label, make) in scenarios.items():
            log(f"scenario {key}")
            make("boxed")()  # warm-up: first restores, caches
            make("open")()
            boxed, open_ = _alternate(args.reps, make("boxed"), make("open"))
            rows.append((label, boxed, open_))
        log("scenario spawn")
        boxed, open_ = _in_process_exec(ws, env, args.reps)
        rows.append(("provider exec of `true`, in-process (bwrap's own cost)", boxed, open_))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.files:,} files, {args.reps} reps (alternating, medians), {cpu_model()}\n")
    print("| operation | sandboxed (s) | sandbox=none (s) | ratio | overhead/run | target |")
    print("|---|---|---|---|---|---|")
    for label, boxed, open_ in rows:
        b, o = statistics.median(boxed), statistics.median(open_)
        # a no-op command in-process has nothing to compare the sandbox with: absolute only
        target = (
            "-"
            if "in-process" in label
            else f"≤ {TARGET}x " + ("ok" if b / o <= TARGET else "**MISS**")
        )
        print(f"| {label} | {b:.3f} | {o:.3f} | {b / o:.2f}x | {(b - o) * 1000:+.1f} ms | "
              f"{target} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
