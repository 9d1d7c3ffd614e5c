"""Isolated-run benchmark: the overhead of ``narrative run`` around a trivial command
(DESIGN.md §6; issue 4 targets).

On a generated 5,000-file workspace (``workspace.py``), for each provider OUR CLI as a user runs
it (``narrative run start --direct --env E -- true``: fresh base snapshot, restore into the
environment, exec, collect the result as a snapshot, bookkeeping) and the ANCHOR alternate,
several reps, medians, ratio ours/anchor.

``--direct`` is the path without hub or runtime (the provider restores, execs and collects
itself); these rows measured it before runs went through the hub by default and keep measuring
it. The hub path (runtime in the environment, bundles both ways) is ``bench_chain.py``'s.

* ``worktree`` (target ≤ 1.5x): ``git worktree add --detach DIR HEAD`` + ``git -C DIR add -A``
  + ``git -C DIR commit --allow-empty -q -m run`` in a plain git repository holding the same
  tree (``git worktree remove --force`` afterwards, untimed).
* ``docker`` (target ≤ 1.5x): ``docker run`` of the same image + ``docker cp`` of the workspace
  in and out (``bench_docker_anchor.py``); needs a reachable engine (``DOCKER_HOST``) and the
  offline test image, else the row says why it was skipped.

Usage::

    python bench/bench_run.py --quick          # 5,000 files / 100 MiB, 3 reps
    python bench/bench_run.py --reps 5 --scenarios worktree
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import workspace
from common import (
    SideError,
    check,
    compile_bytecode,
    cpu_model,
    fmt,
    git_version,
    isolated_env,
    log,
    parse_bench_args,
    run,
    write_results,
)

SCENARIOS = {
    "worktree": ("run in a worktree (reused environment)", 1.5),
    "worktree-cold": ("run in a new worktree (env create + run)", 1.5),
    "docker": ("run in a new Docker container (env create + run)", 1.5),
}


def _git(env: dict[str, str], cwd: Path, *args: str) -> None:
    check(run(["git", *args], env=env, cwd=cwd))


def _alternate(
    reps: int, ours: Callable[[], float], anchor: Callable[[], float]
) -> tuple[list[float], list[float]]:
    o: list[float] = []
    a: list[float] = []
    for rep in range(reps):
        pair = [(o, ours), (a, anchor)]
        for sink, fn in pair if rep % 2 == 0 else reversed(pair):
            sink.append(fn())
    return o, a


def bench_worktree(
    root: Path, ws: Path, env: dict[str, str], narrative: Path, reps: int, cold: bool = False
):
    """Samples (ours, anchor) for the worktree scenarios. Reused: one environment serves every
    run (restores are incremental); cold: each run creates its environment first."""
    if not cold:
        check(run([narrative, "env", "create", "wt", "--provider", "worktree"], env=env, cwd=ws))
    repo = root / "anchor-repo"
    if not repo.exists():
        shutil.copytree(ws, repo, ignore=shutil.ignore_patterns(".narrative"), symlinks=True)
        _git(env, repo, "init", "-q")
        _git(env, repo, "add", "-A")
        _git(env, repo, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "b")
    counter = iter(range(1_000_000))

    def ours() -> float:
        name, total = "wt", 0.0
        if cold:
            name = f"cold{next(counter)}"
            total += check(run([narrative, "env", "create", name], env=env, cwd=ws)).seconds
        start = [narrative, "run", "start", "--direct", "--env", name, "--", "true"]
        p = check(run(start, env=env, cwd=ws))
        if cold:
            check(run([narrative, "env", "delete", name], env=env, cwd=ws))
        return total + p.seconds

    def anchor() -> float:
        dest = root / f"anchor-wt-{'cold' if cold else 'warm'}-{next(counter)}"
        total = 0.0
        total += check(run(["git", "worktree", "add", "-q", "--detach", str(dest), "HEAD"],
                           env=env, cwd=repo)).seconds  # fmt: skip
        total += check(run(["git", "add", "-A"], env=env, cwd=dest)).seconds
        commit = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "--allow-empty"]
        total += check(run([*commit, "-q", "-m", "run"], env=env, cwd=dest)).seconds
        _git(env, repo, "worktree", "remove", "--force", str(dest))
        return total

    return _alternate(reps, ours, anchor)


def bench_docker(root: Path, ws: Path, env: dict[str, str], narrative: Path, reps: int):
    """Samples (ours, anchor): ours creates an environment (a new container), runs ``true``
    from a fresh base snapshot (restore in, exec, collect out); the anchor is ``docker run``
    + ``docker cp`` in and out of the same files with the same image and mounts."""
    import json

    import bench_docker_anchor as dock

    if not env.get("DOCKER_HOST"):
        raise SideError("DOCKER_HOST is not set (start one with scripts/docker-engine.sh)")
    image = dock.ensure_image(env)
    src = root / "docker-src"
    if not src.exists():
        shutil.copytree(ws, src, ignore=shutil.ignore_patterns(".narrative"), symlinks=True)
    mounts = [{"source": "/usr", "target": "/usr"}]
    counter = iter(range(1_000_000))

    def ours() -> float:
        name = f"dk{next(counter)}"
        config = ["--config", f"image={image}", "--config", f"mounts={json.dumps(mounts)}"]
        create = [narrative, "env", "create", name, "--provider", "docker", *config]
        total = check(run(create, env=env, cwd=ws)).seconds
        started = [narrative, "run", "start", "--direct", "--env", name, "--", "true"]
        total += check(run(started, env=env, cwd=ws)).seconds
        check(run([narrative, "env", "delete", name], env=env, cwd=ws))
        return total

    def anchor() -> float:
        return dock.time_docker_anchor(
            src, root / f"docker-out-{next(counter)}", env, image
        ).seconds

    return _alternate(reps, ours, anchor)


def main(argv: list[str] | None = None) -> int:
    args = parse_bench_args(argv, __doc__ or "", SCENARIOS)
    if not args.quick and args.files == workspace.DEFAULT_FILES:
        args.files, args.size_mb = 5000, 100.0  # the issue's workspace size
    started = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-run-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        env = isolated_env(root / "home")
        (root / "home").mkdir(exist_ok=True)
        ws = root / "ws"
        log(f"generating {args.files:,} files / {args.size_mb:g} MiB in {ws}")
        info = workspace.generate(ws, args.files, args.size_mb, args.seed)
        compile_bytecode(env, ws)  # our CLI measured as installed, not compiling from source
        check(run([args.narrative, "init"], env=env, cwd=ws))
        check(run([args.narrative, "snapshot", "-m", "first"], env=env, cwd=ws))
        for key in args.scenario_keys:
            label, target = SCENARIOS[key]
            log(f"scenario {key}")
            try:
                if key == "docker":
                    ours, anchor = bench_docker(root, ws, env, args.narrative, args.reps)
                else:
                    cold = key == "worktree-cold"
                    ours, anchor = bench_worktree(root, ws, env, args.narrative, args.reps, cold)
            except SideError as exc:
                rows.append({"key": key, "label": label, "target": target, "error": str(exc)})
                continue
            o, a = statistics.median(ours), statistics.median(anchor)
            rows.append({"key": key, "label": label, "target": target, "ours": ours,
                         "anchor": anchor, "ratio": o / a})  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.files:,} files, {args.reps} reps, git {git_version(env)}, {cpu_model()}\n")
    print("| operation | ours (s) | anchor (s) | ratio | target | status |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | - | - | - | ≤ {r['target']:.1f}x | skipped: {r['error']} |")
            continue
        ok = "ok" if r["ratio"] <= r["target"] else "**MISS**"
        print(f"| {r['label']} | {fmt(statistics.median(r['ours']), '.3f')} | "
              f"{fmt(statistics.median(r['anchor']), '.3f')} | {r['ratio']:.2f}x | "
              f"≤ {r['target']:.1f}x | {ok} |")  # fmt: skip
    machine = {"cpu": cpu_model(), "python": sys.version.split()[0]}
    path = write_results("run", args, info, time.perf_counter() - started, machine, {"rows": rows})
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
