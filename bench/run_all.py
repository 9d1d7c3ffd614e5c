"""Every benchmark against its anchor in one run, one table of ratios (issue 18, "Benchmarks as
a product"): ``make bench`` (full sizes) and ``make bench-quick`` (small sizes, a few minutes on
two cores; CI runs it with ``--gate``).

Each ``bench_*.py`` script runs as a child process with ``--json-out`` into
``bench/results/run-<time>/`` (its own markdown table and progress go to a log beside it); each
script alternates ours and the anchor and repeats several times itself. This driver reads the
samples back and prints one row per goal of :data:`GOALS` (issue 18's table, plus the goals of
issues 5, 13 and 17 that have a benchmark here):

* ``ours`` / ``anchor``: medians of the samples (seconds unless the goal says otherwise);
* ``min ratio``: fastest ours / fastest anchor (noise on a shared machine only adds time, so
  this is the least noisy figure; the gate uses it);
* ``median ratio``: median ours / median anchor: what ``met``/``MISS`` is decided on;
* ``peak MB``: the highest resident memory of ours in any sample (``wait4``'s ``ru_maxrss``).

Rows that need Docker print ``skipped: no DOCKER_HOST`` when it is unset, never silently.
``--gate`` (CI) exits 1 when a row of :data:`GATED` is worse than :data:`GATE_FACTOR` times its
goal (on the min ratio, or the fastest absolute value) or failed to run; the other rows are
printed as ``not gated (known miss)``. ``--record`` appends the table and a description of the
machine to ``bench/RESULTS.md``.

Usage::

    python bench/run_all.py                   # full profile (takes a long while)
    python bench/run_all.py --quick --gate    # what CI runs
    python bench/run_all.py --quick --only snapshot,history --record
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_model

HERE = Path(__file__).resolve().parent
RECORD = HERE / "RESULTS.md"
#: a gated row fails CI when it is worse than this many times its goal
GATE_FACTOR = 1.5
#: issue 18: no transfer of a 1 GB workspace may use more memory than this
TRANSFER_MAX_MB = 256.0


@dataclass(frozen=True)
class Goal:
    """One row of the table: where its samples come from and what it must meet."""

    row: str  # a stable name (used by --gated)
    label: str
    bench: str  # the script: bench/bench_<bench>.py
    key: str  # the row (scenario) key in that script's JSON
    goal: float | None  # None: reported, no goal
    #: "x": median ours/anchor ≤ goal; "s": ours seconds ≤ goal; "KiB": ours output size;
    #: "MB": ours peak memory over the rows named by ``key`` (comma-separated)
    unit: str = "x"
    docker: bool = False
    quick: bool = True  # part of the quick profile
    max_mb: float | None = None  # a memory goal for ours' peak
    #: the anchor's samples are ours of this other key of the same script (S3 pull vs push)
    anchor_key: str | None = None
    #: the script's scenario to run when it differs from ``key``
    scenario: str | None = None


# Issue 18's table, in its order, then the other issues' goals measured by a bench here.
GOALS: tuple[Goal, ...] = (
    Goal("snap-noop", "no-op snapshot vs git add -A + commit", "snapshot", "noop", 1.0),
    Goal("snap-noop-watch", "no-op snapshot, watcher on", "snapshot", "noop-watch", 0.5),
    Goal("snap-one", "1-file change snapshot", "snapshot", "one", 1.0),
    Goal("snap-one-watch", "1-file change snapshot, watcher on", "snapshot", "one-watch", 0.5),
    Goal("snap-thousand", "1,000-file change snapshot", "snapshot", "thousand", 0.7),
    Goal("snap-first", "first snapshot", "snapshot", "first", 0.35),
    Goal(
        "bundle",
        "full bundle export vs git bundle create --all",
        "transfer",
        "bundle",
        1.0,
        max_mb=TRANSFER_MAX_MB,
    ),
    Goal(
        "tar-zst",
        "tar.zst export vs tar \\| zstd -T2",
        "transfer",
        "zst",
        1.2,
        max_mb=TRANSFER_MAX_MB,
    ),
    Goal(
        "tar-zst-cold",
        "tar.zst export, no digest of the contents kept yet",
        "transfer",
        "zst-cold",
        None,
        quick=False,
    ),
    Goal(
        "incr-time",
        "incremental bundle after a 1-file change (time)",
        "transfer",
        "incr",
        0.2,
        unit="s",
    ),
    Goal(
        "incr-size",
        "incremental bundle after a 1-file change (size)",
        "transfer",
        "incr",
        4.0,
        unit="KiB",
    ),
    Goal(
        "import",
        "import + restore vs git clone + checkout",
        "transfer",
        "import",
        0.8,
        max_mb=TRANSFER_MAX_MB,
    ),
    Goal(
        "s3-pull",
        "S3 pull vs S3 push of the same data (time)",
        "transfer",
        "s3pull",
        1.0,
        quick=False,
        anchor_key="s3push",
        scenario="s3",
        max_mb=TRANSFER_MAX_MB,
    ),
    Goal(
        "transfer-memory",
        "peak memory of exports and imports (bundle, tar.zst, import)",
        "transfer",
        "bundle,zst,import",
        TRANSFER_MAX_MB,
        unit="MB",
    ),
    Goal("merge", "3-way merge of 1k files vs git merge-tree", "merge", "merge", 1.0),
    Goal("gw-hop", "gateway one-hop round trip p50 vs raw websockets", "gateway", "latency", 1.5),
    Goal("gw-chain", "gateway three-hop chain vs raw one hop", "gateway", "chain", 4.0),
    Goal("hub-proxied", "proxied call through the hub vs raw", "chain", "proxied", 2.0),
    Goal("run-worktree", "env create + run, new worktree vs git worktree", "run", "worktree", 1.0),
    Goal(
        "run-docker",
        "env create + run, new container vs docker run + cp",
        "run",
        "docker",
        1.1,
        docker=True,
        quick=False,
    ),
    Goal("history", "history of 10,000 snapshots: log, resolve, restore", "history", "total", 2.0),
    Goal("history-log", "  of which log -n 20", "history", "log", None),
    Goal("history-resolve", "  of which resolve an id", "history", "resolve", None),
    Goal("history-restore", "  of which restore the oldest", "history", "restore", None),
    Goal("startup", "CLI start-up (narrative info) vs python -c pass", "startup", "startup", 3.0),
    # issue 5 (hub runs), 13 (web view), 17 (k8s, Daytona)
    Goal(
        "hub-docker-reused",
        "hub run round trip, reused container",
        "chain",
        "docker-reused",
        2.0,
        docker=True,
        quick=False,
    ),
    Goal(
        "hub-docker-first",
        "hub run round trip, fresh container",
        "chain",
        "docker-first",
        2.0,
        docker=True,
        quick=False,
    ),
    Goal(
        "web-page",
        "web view page of 1,000 runs vs run list --json",
        "web",
        "page",
        2.0,
        quick=False,
    ),
    Goal(
        "k8s-scale",
        "k8s: 50 environments vs the client alone",
        "k8s_scale",
        "scale",
        1.5,
        docker=True,
        quick=False,
    ),
    Goal(
        "daytona-scale",
        "Daytona: 20 environments vs the SDK alone",
        "daytona",
        "total",
        None,
        docker=True,
        quick=False,
    ),
)

#: Rows CI gates (``--gate``): those within 1.5x their goal in both runs of
#: ``make bench-quick`` on the development machine (2 vCPUs shared with four other agents'
#: builds, load average 6-9) on 2026-12-06, with a margin against that noise. Every other row
#: with a goal missed by more than 1.5x in at least one of the runs, or was within a few percent
#: of the limit (hub-proxied 2.75x/2.92x against 3.0x, import 1.13x against 1.2x): the table
#: prints them and the gate lists them as "not gated (known miss)" until they join this set.
#: Joined later: the incremental bundle's size (a byte count: 1.5 KiB against 4 KiB, no noise)
#: and the history row (1.61x quiet, 2.04x at load 7, against a limit of 3x). Rows met only on
#: a quiet machine (import + restore 0.65x quiet but 1.13-1.72x loaded, the worktree run 0.76x
#: quiet but 2.7-3.7x loaded) stay out: a loaded CI machine would fail them.
GATED: frozenset[str] = frozenset({"snap-thousand", "transfer-memory", "incr-size", "history"})


# --------------------------------------------------------------------------- scripts


def script_argv(bench: str, quick: bool, scenarios: Sequence[str]) -> list[str]:
    """The command line of one benchmark script for a profile and a set of its scenarios."""
    argv = [sys.executable, str(HERE / f"bench_{bench}.py")]
    chosen = ["--scenarios", ",".join(scenarios)]
    if bench in ("snapshot", "run") and quick:
        # smaller than the scripts' own --quick (5,000 files): the whole profile must take a
        # few minutes on two cores
        return [*argv, "--quick", "--files", "2000", "--size-mb", "40", *chosen]
    if bench in ("snapshot", "transfer", "merge", "gateway", "chain", "run"):
        return argv + (["--quick"] if quick else []) + chosen
    if bench == "history":
        return argv + chosen + ["--reps", "3" if quick else "5"]
    if bench == "startup":
        return [*argv, "--reps", "7" if quick else "21"]
    if bench == "web":
        return argv
    if bench == "k8s_scale":
        return [*argv, "--count", "10" if quick else "50"]
    return argv  # daytona


@dataclass
class Outcome:
    """What one script left: its JSON document (None if it failed) and why it failed."""

    doc: dict[str, Any] | None
    error: str | None = None
    seconds: float = 0.0


def run_script(bench: str, argv: list[str], out_dir: Path) -> Outcome:
    json_out = out_dir / f"{bench}.json"
    log_path = out_dir / f"{bench}.log"
    print(f"running bench_{bench}.py ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log_file:
        rc = subprocess.call(
            [*argv, "--json-out", str(json_out)],
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - started
    print(f"  done in {seconds:.0f} s (exit {rc}; log {log_path})", file=sys.stderr, flush=True)
    doc = json.loads(json_out.read_text()) if json_out.exists() else None
    if doc is None:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return Outcome(None, f"bench_{bench}.py exited {rc}: {tail[0][:160]}", seconds)
    # a script that wrote its results but exited non-zero found a mismatch or a failed side:
    # the rows say which
    return Outcome(doc, None, seconds)


# --------------------------------------------------------------------------- samples


@dataclass
class Side:
    values: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


def _entry(doc: dict[str, Any], key: str) -> dict[str, Any] | None:
    rows = doc.get("rows", doc.get("scenarios"))
    if isinstance(rows, dict):
        found = rows.get(key)
        return found if isinstance(found, dict) else None
    if isinstance(rows, list):
        return next((r for r in rows if isinstance(r, dict) and r.get("key") == key), None)
    if key == "merge" and "ours_seconds" in doc:  # bench_merge's flat layout
        return {"ours": doc["ours_seconds"], "anchor": doc["anchor_seconds"]}
    return None


def _side(entry: dict[str, Any], name: str) -> Side:
    raw = entry.get(name)
    if isinstance(raw, dict):  # common.SideStats
        return Side(list(raw.get("seconds", [])), list(raw.get("maxrss_kib", [])))
    if isinstance(raw, list):
        return Side([float(v) for v in raw], list(entry.get(f"{name}_rss_kib", [])))
    return Side()


def _errors(entry: dict[str, Any]) -> list[str]:
    found = [str(entry["error"])] if entry.get("error") else []
    for name in ("ours", "anchor"):
        side = entry.get(name)
        if isinstance(side, dict):
            found += [f"{name}: {e}" for e in side.get("errors", [])]
    return found


@dataclass
class Row:
    goal: Goal
    ours: Side = field(default_factory=Side)
    anchor: Side = field(default_factory=Side)
    status: str = ""  # "met", "MISS", "MISMATCH", "skipped: ...", "error: ..."
    notes: list[str] = field(default_factory=list)

    @property
    def min_ratio(self) -> float | None:
        """Fastest ours over fastest anchor: noise on a shared machine only ever adds time."""
        if not self.ours.values or not self.anchor.values or min(self.anchor.values) <= 0:
            return None
        return min(self.ours.values) / min(self.anchor.values)

    @property
    def median_ratio(self) -> float | None:
        if not self.ours.values or not self.anchor.values:
            return None
        anchor = statistics.median(self.anchor.values)
        return statistics.median(self.ours.values) / anchor if anchor > 0 else None

    @property
    def peak_mb(self) -> float | None:
        return max(self.ours.rss_kib) / 1024 if self.ours.rss_kib else None

    def measure(self, best: bool) -> float | None:
        """The figure the goal applies to: the ratio, or ours' value for absolute goals."""
        if self.goal.unit == "x":
            return self.min_ratio if best else self.median_ratio
        if not self.ours.values:
            return None
        if self.goal.unit == "MB":  # memory: the highest peak, however fast
            return max(self.ours.values)
        return min(self.ours.values) if best else statistics.median(self.ours.values)


def build_row(goal: Goal, outcome: Outcome | None) -> Row:
    row = Row(goal)
    if outcome is None:
        row.status = "skipped: no DOCKER_HOST" if goal.docker else "skipped"
        return row
    if outcome.doc is None:
        row.status = f"error: {outcome.error}"
        return row
    if goal.unit == "MB":
        return _memory_row(row, outcome.doc)
    entry = _entry(outcome.doc, goal.key)
    if entry is None:
        row.status = f"error: bench_{goal.bench}.py reported no row {goal.key!r}"
        return row
    errors = _errors(entry)
    if goal.unit == "KiB":
        row.ours = Side([b / 1024 for b in entry.get("ours_bytes", [])])
        row.anchor = Side([b / 1024 for b in entry.get("anchor_bytes", [])])
    else:
        row.ours = _side(entry, "ours")
        row.anchor = _side(entry, "anchor")
    if goal.anchor_key is not None:
        other = _entry(outcome.doc, goal.anchor_key)
        row.anchor = _side(other, "ours") if other is not None else Side()
    mismatches = list(entry.get("mismatches", []))
    if goal.bench == "merge":
        trees = outcome.doc.get("trees", {})
        if trees.get("ours") != trees.get("anchor"):
            mismatches.append(f"merged tree ids differ: {trees}")
    if goal.bench == "history":
        mismatches += outcome.doc.get("mismatches", [])
    row.notes = list(dict.fromkeys(n[:300] for n in mismatches + errors))
    value = row.measure(best=False)
    if mismatches:
        row.status = "MISMATCH"
    elif value is None:
        row.status = "error (below)" if errors else "error: no samples"
    elif goal.goal is None:
        row.status = "reported"
    else:
        over_memory = goal.max_mb is not None and (row.peak_mb or 0.0) > goal.max_mb
        row.status = "met" if value <= goal.goal and not over_memory else "MISS"
        if over_memory:
            row.notes.append(f"peak {row.peak_mb:.0f} MB > {goal.max_mb:.0f} MB")
    return row


def _memory_row(row: Row, doc: dict[str, Any]) -> Row:
    """Ours' peak memory in every sample of the rows named by the goal's key, in MB."""
    peaks: list[float] = []
    for key in row.goal.key.split(","):
        entry = _entry(doc, key)
        if entry is not None:
            peaks += [kib / 1024 for kib in _side(entry, "ours").rss_kib]
    row.ours = Side(peaks, [int(p * 1024) for p in peaks])
    if not peaks:
        row.status = "error: no samples"
    else:
        row.status = "met" if max(peaks) <= (row.goal.goal or 0.0) else "MISS"
    return row


def gate_failure(row: Row) -> str | None:
    """Why a gated row fails CI, or None."""
    goal = row.goal.goal
    if goal is None or row.status.startswith("skipped"):
        return None
    if row.status.startswith("error") or row.status == "MISMATCH":
        return row.status
    best = row.measure(best=True)
    if best is None:
        return "no samples"
    if best > GATE_FACTOR * goal:
        return f"{_value(best, row.goal.unit)} is worse than {GATE_FACTOR}x the goal {goal:g}"
    return None


# --------------------------------------------------------------------------- report


def _seconds(v: float) -> str:
    if v < 0.01:
        return f"{v * 1e3:.3f} ms"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "x":
        return f"{v:.2f}x"
    if unit in ("KiB", "MB"):
        return f"{v:.1f} {unit}"
    return _seconds(v)


def _median(side: Side, unit: str) -> str:
    if not side.values:
        return "—"
    if unit == "MB":
        return f"{max(side.values):.0f} MB"
    m = statistics.median(side.values)
    return f"{m:.1f} KiB" if unit == "KiB" else _seconds(m)


def render(rows: list[Row], gated: frozenset[str] | None) -> str:
    lines = [
        "| row | ours | anchor | min ratio | median ratio | goal | peak MB | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r.goal
        if g.goal is None:
            goal = "—"
        elif g.unit == "x":
            goal = f"≤ {g.goal:g}x"
        else:
            goal = f"≤ {g.goal:g} {g.unit}"
        if g.max_mb is not None:
            goal += f", ≤ {g.max_mb:.0f} MB"
        peak = "—" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        status = r.status
        if gated is not None and g.goal is not None and g.row not in gated:
            status += " (not gated)"
        lines.append(
            f"| {g.label} | {_median(r.ours, g.unit)} | {_median(r.anchor, g.unit)} | "
            f"{_value(r.min_ratio, 'x')} | {_value(r.median_ratio, 'x')} | {goal} | {peak} | "
            f"{status} |"
        )
    peaks = [r.peak_mb for r in rows if r.peak_mb is not None]
    if peaks:
        lines.append(f"\npeak memory of ours over all rows: {max(peaks):.0f} MB")
    return "\n".join(lines)


def machine_description() -> str:
    def output(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    commit = output("git", "-C", str(HERE), "rev-parse", "--short", "HEAD")
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_model()}, "
        f"{os.cpu_count()} cores, {mem} memory; {platform.platform()}; Python "
        f"{platform.python_version()}; {output('git', '--version')}; load average {load} at "
        f"the start; commit {commit}"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small profile (CI)")
    ap.add_argument("--only", help="comma-separated scripts (snapshot,transfer,...) or rows")
    ap.add_argument("--gate", action="store_true", help=f"exit 1 when a gated row is worse "
                    f"than {GATE_FACTOR}x its goal")  # fmt: skip
    ap.add_argument("--gated", help="comma-separated rows to gate instead of GATED ('all': every "
                    "row with a goal)")  # fmt: skip
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a line recorded with the table")
    ap.add_argument("--from-dir", type=Path, help="re-render the results of an earlier run")
    return ap.parse_args(argv)


def selected_goals(args: argparse.Namespace) -> list[Goal]:
    goals = [g for g in GOALS if g.quick or not args.quick]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        known = {g.bench for g in GOALS} | {g.row for g in GOALS}
        if wanted - known:
            raise SystemExit(f"--only: unknown {sorted(wanted - known)}; known {sorted(known)}")
        goals = [g for g in goals if g.bench in wanted or g.row in wanted]
    return goals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    goals = selected_goals(args)
    if args.gated == "all":
        gated = frozenset(g.row for g in GOALS if g.goal is not None)
    elif args.gated:
        gated = frozenset(r.strip() for r in args.gated.split(",") if r.strip())
        unknown = gated - {g.row for g in GOALS}
        if unknown:
            raise SystemExit(f"--gated: unknown rows {sorted(unknown)}")
    else:
        gated = GATED
    description = machine_description()
    started = time.perf_counter()
    out_dir = args.from_dir or RESULTS_DIR / time.strftime("run-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    docker = bool(os.environ.get("DOCKER_HOST"))
    outcomes: dict[str, Outcome | None] = {}
    for bench in dict.fromkeys(g.bench for g in goals):
        mine = [g for g in goals if g.bench == bench and (docker or not g.docker)]
        if not mine:
            outcomes[bench] = None  # only Docker rows, and no Docker
            continue
        if args.from_dir is not None:
            path = out_dir / f"{bench}.json"
            doc = json.loads(path.read_text()) if path.exists() else None
            outcomes[bench] = Outcome(doc, None if doc else f"no {path.name}")
            continue
        keys = [k for g in mine for k in (g.scenario or g.key).split(",")]
        scenarios = list(dict.fromkeys(keys))
        outcomes[bench] = run_script(bench, script_argv(bench, args.quick, scenarios), out_dir)
    rows = []
    for g in goals:
        outcome = outcomes.get(g.bench) if (docker or not g.docker) else None
        rows.append(build_row(g, outcome))
    profile = "quick" if args.quick else "full"
    minutes = (time.perf_counter() - started) / 60
    table = render(rows, gated if args.gate else None)
    target = "bench-quick" if args.quick else "bench"
    print(f"\n## make {target}: {profile} profile, {minutes:.0f} min\n")
    print(f"{description}\n")
    print(table)
    for r in rows:
        for note in r.notes:
            print(f"  {r.goal.row}: {note}")
        if r.status.startswith("skipped"):
            print(f"{r.goal.label}: {r.status}")
    failures = []
    if args.gate:
        print(f"\ngate: rows worse than {GATE_FACTOR}x their goal fail")
        for r in rows:
            if r.goal.goal is None:
                continue
            if r.goal.row not in gated:
                print(f"  {r.goal.row}: not gated (known miss), {r.status}")
                continue
            why = gate_failure(r)
            print(f"  {r.goal.row}: {'FAIL: ' + why if why else 'ok'}")
            if why:
                failures.append(r.goal.row)
    if args.record:
        with RECORD.open("a") as f:
            f.write(f"\n## {profile} profile, {time.strftime('%Y-%m-%d', time.gmtime())}\n\n")
            f.write(f"Machine: {description}.\n")
            if args.note:
                f.write(f"\n{args.note}\n")
            f.write(f"\n{render(rows, None)}\n")
        print(f"\nrecorded in {RECORD}", file=sys.stderr)
    if failures:
        print(f"\nbench gate FAILED: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
