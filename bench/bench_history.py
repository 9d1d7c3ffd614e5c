"""History benchmark: a thread of 10,000 snapshots, our CLI against stock git on the very same
commits (issue 18: ``log -n 20``, resolve an id, restore the oldest; target ≤ 2x).

Set-up (untimed): a generated workspace (``workspace.py``; 1,000 files / 20 MiB unless
``--files``/``--size-mb`` say otherwise: the measure is the depth of the history, not the size
of the tree), ``narrative init`` and a first snapshot through the CLI, then ``--snapshots``-1
more snapshots written in-process through the store's own API (``PackWriter``, the snapshot
commit message of ``narrative.commitmsg``, one ref update): each changes one top-level file,
``history.txt``, so every snapshot has its own tree. Ten thousand CLI calls would take an hour
and measure nothing more. Our store is a bare git repository, so git reads the same commits.

Timed, alternating who goes first, several reps, per operation (cold processes):

* ``log``: ``narrative log -n 20`` vs ``git --git-dir STORE log -n 20 THREAD_REF``;
* ``resolve``: ``narrative show SNAPSHOT_ID`` (the middle snapshot of the thread) vs
  ``git show -s PREFIX`` (a 12-hex prefix of its commit);
* ``restore``: ``narrative restore OLDEST_ID --to DIR`` vs ``git --git-dir STORE --work-tree DIR
  checkout -f OLDEST_COMMIT -- .`` (throw-away index), both into an empty directory; the
  first rep checks both restored trees against the workspace;
* ``total``: the three together per rep (the issue's row).

Usage::

    python bench/bench_history.py                   # 10,000 snapshots, 3 reps
    python bench/bench_history.py --snapshots 2000 --reps 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import workspace
from common import (
    MIB,
    Sample,
    check,
    cpu_model,
    fmt,
    git_version,
    isolated_env,
    log,
    parse_bench_args,
    run,
    store_of,
    write_results,
)

#: key -> (label, target ratio or None)
SCENARIOS: dict[str, tuple[str, float | None]] = {
    "log": ("log -n 20", None),
    "resolve": ("resolve a snapshot id (show)", None),
    "restore": ("restore the oldest --to (empty dir)", None),
    "total": ("log + resolve + restore", 2.0),
}
#: the time operations (``total`` is their sum)
OPERATIONS = ("log", "resolve", "restore")
HISTORY_FILE = "history.txt"


def build_history(store_dir: Path, count: int) -> list[tuple[str, str]]:
    """Extend the thread of the store's only snapshot to ``count`` snapshots; returns
    ``(snapshot id, commit hex)`` oldest first."""
    from narrative.commitmsg import encode_message, snapshot_from_commit
    from narrative.commits import read_commit, thread_snapshots
    from narrative.head import set_head
    from narrative.ids import new_id
    from narrative.objects import Commit, Signature, encode_commit, encode_tree, parse_tree
    from narrative.odb import PackWriter
    from narrative.store import Store

    store = Store.open(str(store_dir))
    ((thread_id, head),) = store.thread_heads().items()
    first = next(thread_snapshots(store, thread_id, head))
    commit = read_commit(store, head)
    _, tree_data = store.odb.read(commit.tree)
    entries = [e for e in parse_tree(tree_data) if e[0] != HISTORY_FILE.encode()]
    stats = {"bytes": 0, "files": 0, "hashed": 1, "skipped": 0}
    made = [(first.id, first.commit)]
    parent, stamp = head, commit.committer.time
    writer = PackWriter(store.odb)
    try:
        for i in range(1, count):
            blob = writer.add_raw("blob", f"snapshot {i}\n".encode())
            root = writer.add_raw(
                "tree", encode_tree([*entries, (HISTORY_FILE.encode(), 0o100644, blob)])
            )
            sig = Signature("narrative", "narrative@localhost", stamp + i)
            message = encode_message(f"step {i}", new_id("snapshot"), thread_id, None, stats, [])
            new = Commit(root, (parent,), sig, sig, message)
            parent = writer.add_raw("commit", encode_commit(new))
            made.append((snapshot_from_commit(parent, new, None).id, parent.hex()))
        writer.publish()
    except BaseException:
        writer.abort()
        raise
    store.refs.update(store.thread_ref(thread_id), parent, expected=head, reason="snapshot")
    set_head(store, parent, thread_id)
    return made


class History:
    """The two sides' commands on one store."""

    def __init__(self, exe: Path, ws: Path, store: Path, env: dict[str, str], root: Path) -> None:
        self.exe, self.ws, self.store, self.env, self.root = exe, ws, store, env, root
        self.ref = ""
        self.middle: tuple[str, str] = ("", "")
        self.oldest: tuple[str, str] = ("", "")
        self.counter = 0

    def ours(self, *argv: str | Path) -> Sample:
        p = check(run([str(self.exe), *map(str, argv)], env=self.env, cwd=self.ws))
        return Sample(p.seconds, p.maxrss_kib)

    def git(self, *argv: str | Path, env: dict[str, str] | None = None) -> Sample:
        p = check(run(["git", "--git-dir", str(self.store), *map(str, argv)], env=env or self.env,
                      cwd=self.root))  # fmt: skip
        return Sample(p.seconds, p.maxrss_kib)

    def fresh_dir(self, side: str) -> Path:
        self.counter += 1
        return self.root / f"restore-{side}-{self.counter}"

    def operation(self, key: str, side: str) -> tuple[Sample, Path | None]:
        """One timed operation of one side; the restored directory for ``restore``."""
        if key == "log":
            if side == "ours":
                return self.ours("log", "-n", "20"), None
            return self.git("log", "-n", "20", self.ref), None
        if key == "resolve":
            if side == "ours":
                return self.ours("show", self.middle[0]), None
            return self.git("show", "-s", self.middle[1][:12]), None
        dest = self.fresh_dir(side)
        if side == "ours":
            return self.ours("restore", self.oldest[0], "--to", dest), dest
        dest.mkdir()
        index = self.root / f"index-{self.counter}"
        try:
            sample = self.git(
                "--work-tree", dest, "checkout", "-f", self.oldest[1], "--", ".",
                env=self.env | {"GIT_INDEX_FILE": str(index)},
            )  # fmt: skip
        finally:
            index.unlink(missing_ok=True)
        return sample, dest


def measure(
    hist: History, reps: int, keys: list[str], checked: Callable[[str, Path], None]
) -> dict[str, dict[str, list[Any]]]:
    """Samples per operation and side; who goes first alternates between reps."""
    samples: dict[str, dict[str, list[Any]]] = {
        k: {"ours": [], "anchor": [], "ours_rss_kib": [], "anchor_rss_kib": []} for k in keys
    }
    ops = [k for k in OPERATIONS if k in keys or "total" in keys]
    for rep in range(reps):
        sides = ["ours", "anchor"] if rep % 2 == 0 else ["anchor", "ours"]
        totals = {"ours": 0.0, "anchor": 0.0}
        peaks = {"ours": 0, "anchor": 0}
        for key in ops:
            for side in sides:
                sample, dest = hist.operation(key, side)
                totals[side] += sample.seconds
                peaks[side] = max(peaks[side], sample.maxrss_kib)
                if key in samples:
                    samples[key][side].append(sample.seconds)
                    samples[key][f"{side}_rss_kib"].append(sample.maxrss_kib)
                if dest is not None:
                    if rep == 0:
                        checked(side, dest)
                    shutil.rmtree(dest, ignore_errors=True)
        if "total" in samples:
            for side in sides:
                samples["total"][side].append(totals[side])
                samples["total"][f"{side}_rss_kib"].append(peaks[side])
        log(f" rep {rep + 1}/{reps}: ours {totals['ours']:.3f}s, git {totals['anchor']:.3f}s")
    return samples


def main(argv: list[str] | None = None) -> int:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--snapshots", type=int, default=10_000, help="history depth")

    args = parse_bench_args(argv, __doc__ or "", SCENARIOS, extra)
    if "--files" not in (argv or sys.argv):
        args.files, args.size_mb = 1000, 20.0
    if args.snapshots < 2:
        log("error: --snapshots must be >= 2")
        return 2
    started = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-history-"))
    root.mkdir(parents=True, exist_ok=True)
    mismatches: list[str] = []
    try:
        (root / "home").mkdir(exist_ok=True)
        env = isolated_env(root / "home")
        ws = root / "ws"
        log(f"generating {args.files:,} files / {args.size_mb:g} MiB in {ws}")
        info = workspace.generate(ws, args.files, args.size_mb, args.seed)
        check(run([args.narrative, "init"], env=env, cwd=ws))
        check(run([args.narrative, "snapshot", "-m", "first"], env=env, cwd=ws))
        store = store_of(args.narrative, ws, env)
        t0 = time.perf_counter()
        made = build_history(store, args.snapshots)
        build_seconds = time.perf_counter() - t0
        log(f"{len(made):,} snapshots in {build_seconds:.1f}s")
        hist = History(args.narrative, ws, store, env, root)
        thread = json.loads(check(run([args.narrative, "log", "-n", "1", "--json"], env=env,
                                      cwd=ws)).stdout)["items"][0]["thread"]  # fmt: skip
        hist.ref = f"refs/narrative/threads/{thread}"
        hist.middle, hist.oldest = made[len(made) // 2], made[0]

        def checked(side: str, dest: Path) -> None:
            diffs = workspace.compare_dirs(ws, dest)
            if diffs:
                mismatches.append(f"{side} restore differs: {'; '.join(diffs[:5])}")

        samples = measure(hist, args.reps, args.scenario_keys, checked)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    rows = []
    for key, s in samples.items():
        label, target = SCENARIOS[key]
        o, a = statistics.median(s["ours"]), statistics.median(s["anchor"])
        rows.append({"key": key, "label": label, "target": target, **s, "ratio": o / a})
    print(
        f"\nhistory of {args.snapshots:,} snapshots, {args.files:,} files / {args.size_mb:g} MiB,"
        f" {args.reps} reps, {git_version(env)}, {cpu_model()}\n"
    )
    print("| operation | ours (s) | git (s) | ratio | target | status |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        goal = r["target"]
        status = "—" if goal is None else ("ok" if r["ratio"] <= goal else "**MISS**")
        print(f"| {r['label']} | {fmt(statistics.median(r['ours']), '.3f')} | "
              f"{fmt(statistics.median(r['anchor']), '.3f')} | {r['ratio']:.2f}x | "
              f"{'—' if goal is None else f'≤ {goal:.1f}x'} | {status} |")  # fmt: skip
    for m in mismatches:
        print(f"**MISMATCH** {m}")
    body = {
        "snapshots": args.snapshots,
        "build_seconds": build_seconds,
        "mismatches": mismatches,
        "rows": rows,
    }
    path = write_results("history", args, info, total, {"git": git_version(env)}, body)
    log(f"results: {path}  (workspace {info.total_bytes / MIB:.0f} MiB)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
