"""Helpers shared by the benchmarks (DESIGN.md §6): child processes timed with peak RSS via
``wait4`` through a tiny launcher, an isolated environment for both sides, per-side sample
statistics, and small reporting utilities.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """One finished child process."""

    argv: list[str]
    rc: int
    seconds: float
    maxrss_kib: int
    stdout: str
    stderr: str


class SideError(RuntimeError):
    """A command of one side failed; carries a short description."""


# Peak RSS needs a small parent: on Linux a child's ru_maxrss starts at the RSS of the process
# it was forked from (exec records the old mm's high-water mark), so forking straight from this
# process (hundreds of MB after generating the workspace) would inflate every figure. This tiny
# launcher (~7 MB) forks/execs the command, times it and reports wait4's rusage; the timing thus
# excludes the launcher's own start-up and covers fork, exec and wait only.
_LAUNCHER = r"""
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"launcher: cannot run {argv[0]}: {exc}\n".encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
dt = time.perf_counter() - t0
with open(out, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {dt!r} {ru.ru_maxrss}\n")
"""


def run(argv: list[str], *, env: dict[str, str], cwd: Path) -> Proc:
    """Run ``argv``; wall time and peak RSS (``ru_maxrss`` from ``wait4``, KiB on Linux).

    The peak covers the process and every descendant it waited for. Output goes to temp files
    (not pipes) so a chatty child can never block.
    """
    argv = [str(a) for a in argv]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".rusage") as res,
    ):
        p = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, res.name, *argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        p.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        fields = res.read().split()
        if p.returncode != 0 or len(fields) != 3:
            raise SideError(f"launcher failed ({p.returncode}) for {argv}: {stderr[-500:]}")
        return Proc(
            argv=argv,
            rc=int(fields[0]),
            seconds=float(fields[1]),
            maxrss_kib=int(fields[2]),
            stdout=stdout,
            stderr=stderr,
        )


def start_announcing(
    argv: list[str], *, env: dict[str, str], cwd: Path
) -> tuple[subprocess.Popen[str], str]:
    """Start a server that prints one line when it is ready; the process and that line."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SideError(f"{' '.join(argv[:3])} exited before it was ready ({proc.wait()})")
    return proc, line


def check(p: Proc) -> Proc:
    if p.rc != 0:
        tail = (p.stderr.strip() or p.stdout.strip())[-1500:]
        raise SideError(f"`{' '.join(p.argv)}` exited {p.rc}: {tail}")
    return p


@dataclass
class Sample:
    """One timed measurement."""

    seconds: float
    maxrss_kib: int


def store_of(exe: str | Path, ws: Path, env: dict[str, str]) -> Path:
    """The store directory of the workspace ``ws`` (stores live in the per-user data directory
    of ``env``, not in the workspace)."""
    p = check(run([str(exe), "info", "--json"], env=env, cwd=ws))
    return Path(json.loads(p.stdout)["store"])


def drop_store(exe: str | Path, ws: Path, env: dict[str, str]) -> None:
    """Remove the store of ``ws`` and its marker, if it has one (an untimed reset: a store
    outlives its workspace directory, and a new ``init`` at the same path would find it)."""
    import shutil

    ws.mkdir(parents=True, exist_ok=True)  # a store is found by its workspace's path too
    try:
        store = store_of(exe, ws, env)
    except SideError:
        return
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(ws / ".narrative", ignore_errors=True)


def compile_bytecode(env: dict[str, str], cwd: Path) -> None:
    """Write ``__pycache__`` for narrative's packages, as installing a wheel does: a checkout run
    under ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module from source at
    every start (and a runtime in a sandbox cannot write its bytecode at all)."""
    import narrative

    root = Path(narrative.__file__).parent.parent
    packages = [str(root / p) for p in ("narrative", "transfer", "providers", "gateway", "cli")]
    check(run([sys.executable, "-m", "compileall", "-q", *packages], env=env, cwd=cwd))


def isolated_env(home: Path) -> dict[str, str]:
    """Inherited env minus GIT_* and NARRATIVE_* variables; private HOME, no git config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "NARRATIVE_"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        NO_COLOR="1",
        LC_ALL="C",
    )
    return env


@dataclass
class SideStats:
    seconds: list[float] = field(default_factory=list)
    maxrss_kib: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, s: Sample) -> None:
        self.seconds.append(s.seconds)
        self.maxrss_kib.append(s.maxrss_kib)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def peak_mb(self) -> float | None:
        return max(self.maxrss_kib) / 1024 if self.maxrss_kib else None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def git_version(env: dict[str, str]) -> str:
    try:
        return run(["git", "--version"], env=env, cwd=Path.cwd()).stdout.strip()
    except OSError:
        return "git not found"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_bench_args(
    argv: list[str] | None,
    description: str,
    scenarios: Iterable[str],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every benchmark takes (size, reps, scenarios, work dir), validated."""
    import workspace

    names = list(scenarios)
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--files", type=int, help=f"files (default {workspace.DEFAULT_FILES:,})")
    ap.add_argument("--size-mb", type=float, help=f"MiB (default {workspace.DEFAULT_SIZE_MB})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5,000 files / 100 MiB")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per scenario (default 3)")
    ap.add_argument("--seed", type=int, default=workspace.DEFAULT_SEED)
    ap.add_argument(
        "--scenarios", default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )
    if extra is not None:
        extra(ap)
    ap.add_argument(
        "--narrative",
        type=Path,
        default=Path(sys.executable).parent / "narrative",
        help="our CLI (default: next to this Python)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        help="empty or absent dir to build in, kept afterwards (default: a temp dir, removed)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json-out", type=Path, help="results file (default bench/results/...)")
    args = ap.parse_args(argv)
    if args.files is None:
        args.files = 5000 if args.quick else workspace.DEFAULT_FILES
    if args.size_mb is None:
        args.size_mb = 100.0 if args.quick else float(workspace.DEFAULT_SIZE_MB)
    args.scenario_keys = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_keys if s not in names]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {names}")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            ap.error(f"--workdir {args.workdir} is not empty")
        args.keep = True  # never delete a directory the user named
    return args


def write_results(
    kind: str,
    args: argparse.Namespace,
    info: Any,
    total: float,
    machine: dict[str, Any],
    body: dict[str, Any],
) -> Path:
    """Write a benchmark's JSON results (common header + ``body``); returns the path."""
    import json
    import time
    from dataclasses import asdict

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    out: Path = args.json_out or RESULTS_DIR / time.strftime(f"{kind}-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: plain(v) for k, v in vars(args).items() if k != "scenario_keys"},
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            **machine,
        },
        "workspace": {k: plain(v) for k, v in asdict(info).items()},
        "total_seconds": total,
        **body,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out


def best_of(reps: int, fn: Callable[[], object]) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` (seconds)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report_phases(exe: list[str], env: dict[str, str], ws: Path, run_ids: list[str]) -> None:
    """Log the median of each phase of runs ``run_ids`` by the hub's clock (``run show``
    through ``exe``; not timed): where a fan-out's run spends its time."""
    phases: dict[str, list[float]] = {}
    for run_id in run_ids:
        shown = run([*exe, "run", "show", run_id, "--json"], env=env, cwd=ws)
        usage = json.loads(shown.stdout).get("usage") or {} if shown.rc == 0 else {}
        for name, seconds in (usage.get("phases") or {}).items():
            phases.setdefault(name, []).append(seconds)
    medians = ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in phases.items())
    log(f"  phases of a fan-out run (median over {len(run_ids)}): {medians}")
