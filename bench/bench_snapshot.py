"""Core snapshot-engine benchmark: our ``narrative`` CLI against stock git (DESIGN.md §6).

Generates a deterministic workspace (see ``workspace.py``), then for each scenario runs OUR CLI
(the real user path, as subprocesses) and the ANCHOR (stock git in a shadow repo) on the same
workspace state, alternating which side goes first, several repetitions, and reports medians,
ratios ours/anchor and peak RSS as a markdown table on stdout (progress goes to stderr). A JSON
copy of all samples is written under ``bench/results/``.

Scenarios: first snapshot (fresh store each rep), no-op snapshot, 1-file change, 1,000-file
change, restore --to an empty directory; the no-op and 1-file rows again with ``narrative watch``
running (started, and one untimed snapshot taken, before the reps; the anchor is unchanged).

Anchor, per snapshot (timed as the sum of the four processes)::

    GIT_DIR=SHADOW GIT_WORK_TREE=WS git add -A
    git write-tree ; git commit-tree TREE [-p PARENT] -m MSG ; git update-ref refs/heads/main C

and for restore ``git --git-dir SHADOW --work-tree DIR checkout -f COMMIT -- .`` with a
throw-away ``GIT_INDEX_FILE``. Ours: ``narrative snapshot -m MSG --json`` (cwd = WS) and
``narrative restore ID --to DIR``. The tree id reported by ours must equal the anchor's
``write-tree`` output for the same state; restored directories are compared with the workspace.

Usage::

    python bench/bench_snapshot.py --quick            # 5,000 files / 100 MiB smoke run
    python bench/bench_snapshot.py                    # 50,000 files / ~1 GB, 3 reps
    python bench/bench_snapshot.py --quick --anchor-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import workspace
from common import (
    MIB,
    Sample,
    SideError,
    SideStats,
    compile_bytecode,
    drop_store,
    isolated_env,
    log,
    parse_bench_args,
    run,
    write_results,
)
from common import check as _check
from common import cpu_model as _cpu_model
from common import fmt as _fmt
from common import git_version as _git_version

RSS_TARGET_MB = 300.0
FIXED_DATE = "1704067200 +0000"  # 2024-01-01T00:00:00Z


# --------------------------------------------------------------------------- processes


@dataclass
class SnapResult:
    sample: Sample
    tree: str | None
    commit: str | None
    snapshot_id: str | None = None
    #: Extra fields ours reported (``created``, ``stats``), kept in the JSON results.
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the two sides


class Ours:
    """Our CLI, driven exactly as a user would."""

    name = "ours"

    def __init__(self, exe: Path, ws: Path, env: dict[str, str]) -> None:
        self.exe = exe
        self.ws = ws
        self.env = env
        self.last_id: str | None = None

    def reset(self) -> None:
        """Fresh store (untimed)."""
        drop_store(self.exe, self.ws, self.env)
        _check(run([str(self.exe), "init", str(self.ws)], env=self.env, cwd=self.ws.parent))
        self.last_id = None

    def snapshot(self, msg: str) -> SnapResult:
        p = _check(run([str(self.exe), "snapshot", "-m", msg, "--json"], env=self.env, cwd=self.ws))
        try:
            doc = json.loads(p.stdout)
        except json.JSONDecodeError as exc:
            raise SideError(f"snapshot --json printed no JSON ({exc}): {p.stdout[:300]!r}") from exc
        info = doc.get("snapshot", doc) if isinstance(doc, dict) else {}
        if not isinstance(info, dict):
            info = {}
        sid = info.get("id")
        self.last_id = str(sid) if sid is not None else self.last_id
        tree, commit = info.get("tree"), info.get("commit")
        return SnapResult(
            Sample(p.seconds, p.maxrss_kib),
            str(tree) if tree is not None else None,
            str(commit) if commit is not None else None,
            str(sid) if sid is not None else None,
            {k: info[k] for k in ("created", "stats") if k in info},
        )

    def watch(self, on: bool) -> None:
        """Start (``narrative watch --background``) or stop the workspace's watcher (untimed)."""
        args = ["watch", "--background"] if on else ["watch", "--stop"]
        _check(run([str(self.exe), *args], env=self.env, cwd=self.ws))
        if not on:
            time.sleep(0.5)  # it notices SIGTERM within 0.2 s

    def restore(self, dest: Path) -> Sample:
        if self.last_id is None:
            raise SideError("no snapshot id to restore (earlier snapshots failed)")
        p = _check(
            run(
                [str(self.exe), "restore", self.last_id, "--to", str(dest)],
                env=self.env,
                cwd=self.ws,
            )
        )
        return Sample(p.seconds, p.maxrss_kib)


class Anchor:
    """Stock git in a shadow repository beside the workspace."""

    name = "anchor"

    def __init__(self, shadow: Path, ws: Path, env: dict[str, str], tmp: Path) -> None:
        self.shadow = shadow
        self.ws = ws
        self.tmp = tmp
        self.env = env | {
            "GIT_AUTHOR_NAME": "Bench",
            "GIT_AUTHOR_EMAIL": "bench@example.invalid",
            "GIT_AUTHOR_DATE": FIXED_DATE,
            "GIT_COMMITTER_NAME": "Bench",
            "GIT_COMMITTER_EMAIL": "bench@example.invalid",
            "GIT_COMMITTER_DATE": FIXED_DATE,
        }
        self.snap_env = self.env | {"GIT_DIR": str(shadow), "GIT_WORK_TREE": str(ws)}
        self.head: str | None = None

    def reset(self) -> None:
        """Fresh bare shadow repo (untimed); the store dir is excluded like ours excludes it."""
        shutil.rmtree(self.shadow, ignore_errors=True)
        _check(run(["git", "init", "-q", "--bare", str(self.shadow)], env=self.env, cwd=self.tmp))
        info = self.shadow / "info"
        info.mkdir(exist_ok=True)
        with open(info / "exclude", "a", encoding="utf-8") as f:
            f.write("/.narrative\n")
        self.head = None

    def snapshot(self, msg: str) -> SnapResult:
        procs = [_check(run(["git", "add", "-A"], env=self.snap_env, cwd=self.ws))]
        procs.append(_check(run(["git", "write-tree"], env=self.snap_env, cwd=self.ws)))
        tree = procs[-1].stdout.strip()
        argv = ["git", "commit-tree", tree, "-m", msg]
        if self.head:
            argv[3:3] = ["-p", self.head]
        procs.append(_check(run(argv, env=self.snap_env, cwd=self.ws)))
        commit = procs[-1].stdout.strip()
        procs.append(
            _check(
                run(
                    ["git", "update-ref", "refs/heads/main", commit], env=self.snap_env, cwd=self.ws
                )
            )
        )
        self.head = commit
        return SnapResult(
            Sample(sum(p.seconds for p in procs), max(p.maxrss_kib for p in procs)), tree, commit
        )

    def restore(self, dest: Path) -> Sample:
        if self.head is None:
            raise SideError("no anchor commit to restore")
        index = self.tmp / f"restore-index-{os.getpid()}-{time.monotonic_ns()}"
        try:
            p = _check(
                run(
                    [
                        "git",
                        "--git-dir",
                        str(self.shadow),
                        "--work-tree",
                        str(dest),
                        "checkout",
                        "-f",
                        self.head,
                        "--",
                        ".",
                    ],
                    env=self.env | {"GIT_INDEX_FILE": str(index)},
                    cwd=dest,
                )
            )
        finally:
            index.unlink(missing_ok=True)
        return Sample(p.seconds, p.maxrss_kib)


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    key: str
    label: str
    target: float
    ours: SideStats = field(default_factory=SideStats)
    anchor: SideStats = field(default_factory=SideStats)
    order: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ours_reported: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        o, a = self.ours.median, self.anchor.median
        return o / a if o is not None and a else None

    def status(self, anchor_only: bool) -> str:
        if self.mismatches:
            return "**MISMATCH**"
        if self.anchor.errors:
            return "ANCHOR ERROR"
        if anchor_only:
            return "anchor only"
        if self.ours.errors:
            return "**ERROR**"
        ratio, peak = self.ratio, self.ours.peak_mb
        if ratio is None or peak is None:
            return "n/a"
        why = []
        if ratio > self.target:
            why.append("time")
        if peak > RSS_TARGET_MB:
            why.append("RSS")
        return f"MISS ({', '.join(why)})" if why else "ok"


SCENARIOS: dict[str, tuple[str, float]] = {
    "first": ("first snapshot", 0.7),
    "noop": ("no-op snapshot", 1.0),
    "one": ("1-file change", 1.0),
    "noop-watch": ("no-op snapshot, watcher on", 0.5),
    "one-watch": ("1-file change, watcher on", 0.5),
    "thousand": ("1,000-file change", 1.0),
    "restore": ("restore --to (empty dir)", 1.0),
}


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.reps: int = args.reps
        self.workdir = workdir
        self.ws = workdir / "ws"
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = isolated_env(home)
        self.anchor = Anchor(workdir / "shadow.git", self.ws, env, workdir)
        self.ours: Ours | None = None if args.anchor_only else Ours(args.narrative, self.ws, env)
        self.results: dict[str, Scenario] = {}
        self.warmup_mismatch: str | None = None
        self.warmup_errors: list[str] = []

    def sides(self, rep: int) -> list[Ours | Anchor]:
        """Alternate who goes first between reps."""
        both: list[Ours | Anchor] = [self.anchor] if self.ours is None else [self.ours, self.anchor]
        return both if rep % 2 == 0 else both[::-1]

    def _snapshot_round(self, sc: Scenario | None, rep: int, prepare: Callable[[], None]) -> None:
        prepare()
        trees: dict[str, str | None] = {}
        for side in self.sides(rep):
            os.sync()  # flush writeback from earlier work so it does not land in this timing
            stats = getattr(sc, side.name) if sc else None
            try:
                res = side.snapshot(f"bench {sc.key if sc else 'warmup'} {rep}")
            except SideError as exc:
                log(f"  {side.name} FAILED: {exc}")
                if stats is not None:
                    stats.errors.append(str(exc))
                elif side.name == "anchor":
                    raise
                else:
                    self.warmup_errors.append(f"snapshot: {exc}")
                continue
            trees[side.name] = res.tree
            if sc is not None:
                getattr(sc, side.name).add(res.sample)
                if res.extra:
                    sc.ours_reported.append(res.extra)
            sample = res.sample
            log(f"  {side.name:6s} {sample.seconds:8.3f}s  rss {sample.maxrss_kib >> 10} MB")
        if sc is not None:
            sc.order.append(",".join(s.name for s in self.sides(rep)))
        if "ours" in trees and "anchor" in trees and trees["ours"] != trees["anchor"]:
            msg = (
                f"{sc.label if sc else 'warm-up'} rep {rep}: ours tree {trees['ours']} "
                f"!= anchor tree {trees['anchor']}"
            )
            log(f"  MISMATCH: {msg}")
            if sc is not None:
                sc.mismatches.append(msg)
            else:
                self.warmup_mismatch = msg

    def warmup(self) -> None:
        """Untimed: read every file once, then one full walk (first snapshot) of each side."""
        t0 = time.perf_counter()
        n = 0
        for rel in workspace.list_files(self.ws):
            with open(self.ws / rel, "rb") as f:
                while f.read(MIB):
                    pass
            n += 1
        log(f"warm-up: read {n} files in {time.perf_counter() - t0:.1f}s; initial snapshots")

        def reset() -> None:
            self.anchor.reset()
            if self.ours is not None:
                try:
                    self.ours.reset()
                except SideError as exc:
                    log(f"  ours init FAILED: {exc}")
                    self.warmup_errors.append(f"init: {exc}")

        self._snapshot_round(None, 0, reset)

    def scenario(self, key: str) -> Scenario:
        label, target = SCENARIOS[key]
        sc = self.results[key] = Scenario(key, label, target)
        log(f"scenario: {label} ({self.reps} reps)")
        watching = key.endswith("-watch") and self.ours is not None
        if watching:
            assert self.ours is not None
            self.ours.watch(True)
            self.ours.snapshot("bench watcher warm-up")  # full scan: records the journal mark
        try:
            self._scenario_reps(sc, key)
        finally:
            if watching:
                assert self.ours is not None
                self.ours.watch(False)
        return sc

    def _scenario_reps(self, sc: Scenario, key: str) -> None:
        for rep in range(self.reps):
            log(f" rep {rep + 1}/{self.reps}")
            if key == "restore":
                self._restore_round(sc, rep)
                continue

            def prepare(key: str = key, rep: int = rep) -> None:
                if key == "first":
                    self.anchor.reset()
                    if self.ours is not None:
                        try:
                            self.ours.reset()
                        except SideError as exc:
                            log(f"  ours init FAILED: {exc}")
                            sc.ours.errors.append(f"init: {exc}")
                elif key in ("one", "one-watch"):
                    workspace.touch_files(self.ws, 1, f"{key}-{rep}")
                elif key == "thousand":
                    workspace.touch_files(self.ws, 1000, f"thousand-{rep}")

            self._snapshot_round(sc, rep, prepare)

    def _restore_round(self, sc: Scenario, rep: int) -> None:
        dests: dict[str, Path] = {}
        for side in self.sides(rep):
            dest = dests[side.name] = self.workdir / f"restore-{side.name}-{rep}"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            os.sync()
            stats: SideStats = getattr(sc, side.name)
            try:
                s = side.restore(dest)
            except SideError as exc:
                log(f"  {side.name} FAILED: {exc}")
                stats.errors.append(str(exc))
                continue
            stats.add(s)
            log(f"  {side.name:6s} {s.seconds:8.3f}s  rss {s.maxrss_kib >> 10} MB")
        sc.order.append(",".join(s.name for s in self.sides(rep)))
        for name, dest in dests.items():
            stats = getattr(sc, name)
            if rep == 0 and len(stats.seconds) == 1:  # verify content once (untimed)
                diffs = workspace.compare_dirs(self.ws, dest)
                if diffs:
                    msg = f"{sc.label} rep {rep}: {name} restore differs from workspace: " + (
                        "; ".join(diffs[:5])
                    )
                    log(f"  MISMATCH: {msg}")
                    sc.mismatches.append(msg)
                else:
                    sc.notes.append(f"{name} restore verified identical to the workspace")
            shutil.rmtree(dest, ignore_errors=True)


# --------------------------------------------------------------------------- report


def render(bench: Bench, header: str) -> str:
    anchor_only = bench.ours is None
    lines = [
        header,
        "",
        "| scenario | ours median (s) | anchor median (s) | ratio ours/anchor | target "
        "| ours peak RSS (MB) | anchor peak RSS (MB) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in bench.results.values():
        lines.append(
            f"| {sc.label} | {_fmt(sc.ours.median, '.3f')} | {_fmt(sc.anchor.median, '.3f')} "
            f"| {_fmt(sc.ratio, '.2f')}{'x' if sc.ratio is not None else ''} "
            f"| ≤ {sc.target:.2f}x | {_fmt(sc.ours.peak_mb, '.0f')} "
            f"| {_fmt(sc.anchor.peak_mb, '.0f')} | {sc.status(anchor_only)} |"
        )
    lines.append("")
    lines.append(f"Peak RSS target for ours: ≤ {RSS_TARGET_MB:.0f} MB (max over reps).")
    if bench.warmup_mismatch:
        lines.append(f"**MISMATCH** (warm-up) {bench.warmup_mismatch}")
    lines.extend(f"**ERROR** warm-up: ours: {e}" for e in bench.warmup_errors[:2])
    for sc in bench.results.values():
        lines.extend(f"**MISMATCH** {m}" for m in sc.mismatches)
        lines.extend(f"**ERROR** {sc.label}: ours: {e}" for e in sc.ours.errors[:2])
        lines.extend(f"**ERROR** {sc.label}: anchor: {e}" for e in sc.anchor.errors[:2])
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _snapshot_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--anchor-only", action="store_true", help="run only the git anchor")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_bench_args(
        argv,
        "Snapshot engine benchmark: narrative CLI vs stock git (ratios, peak RSS).",
        SCENARIOS,
        _snapshot_options,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    workdir = (
        args.workdir.resolve()
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="narrative-bench-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(args, workdir)
        env = bench.anchor.env
        ours_version = None
        if bench.ours is not None:
            if not args.narrative.exists():
                log(f"error: our CLI {args.narrative} not found (use --anchor-only)")
                return 2
            p = run([str(args.narrative), "--help"], env=env, cwd=workdir)
            if p.rc != 0:
                log(f"error: `{args.narrative} --help` exited {p.rc} (use --anchor-only):")
                log(p.stderr.strip()[-2000:])
                return 2
            v = run([str(args.narrative), "--version"], env=env, cwd=workdir)
            ours_version = v.stdout.strip() if v.rc == 0 else None
            compile_bytecode(env, workdir)  # measured as installed, not compiling from source

        log(f"generating workspace: {args.files:,} files, {args.size_mb:g} MiB in {bench.ws}")
        info = workspace.generate(bench.ws, args.files, args.size_mb, args.seed, force=True)
        os.sync()
        log(
            f"  {info.files:,} files, {info.dirs:,} dirs, {info.symlinks} symlinks, "
            f"{info.total_bytes / MIB:.0f} MiB in {info.seconds:.1f}s"
        )
        bench.warmup()
        for key in args.scenario_keys:
            bench.scenario(key)
        total = time.perf_counter() - t_start

        git_version = _git_version(env)
        header = (
            f"Snapshot benchmark — workspace {info.files:,} files / "
            f"{info.total_bytes / MIB:,.0f} MiB / {info.dirs:,} dirs (seed {args.seed}), "
            f"{args.reps} reps, medians; anchor {git_version}; {os.cpu_count()} CPUs "
            f"({_cpu_model()}); total run {total:.0f}s."
        )
        report = render(bench, header)
        print(report, flush=True)

        out = write_results(
            "snapshot",
            args,
            info,
            total,
            {"git": git_version, "ours": ours_version},
            {
                "warmup_mismatch": bench.warmup_mismatch,
                "warmup_errors": bench.warmup_errors,
                "scenarios": {
                    key: {
                        "label": sc.label,
                        "target_ratio": sc.target,
                        "ratio": sc.ratio,
                        "status": sc.status(bench.ours is None),
                        "order": sc.order,
                        "mismatches": sc.mismatches,
                        "notes": sc.notes,
                        "ours_reported": sc.ours_reported,
                        "ours": asdict(sc.ours)
                        | {"median": sc.ours.median, "peak_mb": sc.ours.peak_mb},
                        "anchor": asdict(sc.anchor)
                        | {"median": sc.anchor.median, "peak_mb": sc.anchor.peak_mb},
                    }
                    for key, sc in bench.results.items()
                },
                "rss_target_mb": RSS_TARGET_MB,
            },
        )
        log(f"results: {out}  (total {total:.0f}s)")
        bad = (
            bench.warmup_mismatch
            or bench.warmup_errors
            or any(
                sc.mismatches or sc.ours.errors or sc.anchor.errors for sc in bench.results.values()
            )
        )
        return 1 if bad else 0
    finally:
        if args.keep:
            log(f"kept work directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
