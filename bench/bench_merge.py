"""Merge benchmark: our tree merge against ``git merge-tree --write-tree`` (DESIGN.md §6).

Builds a deterministic workspace (``workspace.py``), snapshots it as BASE, then derives THEIRS
(a run result touching 1,000 files: edits, a few renames, deletions and additions) and OURS
(the workspace's own edits: files theirs never touched, files both edited in different places
— clean line merges — and a few both edited in the same place — text and binary conflicts).

Both sides merge the same three trees, as cold processes, alternating, several repetitions:

* ours: a Python process opening the store and calling :func:`narrative.merge.merge_trees`
  (merged blobs and trees written and published as a pack);
* anchor: ``git merge-tree --write-tree ours theirs`` in a plain bare repo holding the same
  trees as commits BASE ← OURS, BASE ← THEIRS (branches named ``ours``/``theirs``, so conflict
  markers carry the same labels as ours and the merged tree ids can be compared).

Both are compiled programs at timing: the ``narrative`` package's bytecode is compiled once
before the repetitions (``compileall``, as a wheel install does), because an editable install
run under ``PYTHONDONTWRITEBYTECODE=1`` would otherwise recompile every module from source in
every repetition — a cost no installed ``narrative`` pays. The timed process is unchanged: a
cold interpreter, imports, ``Store.open``, ``merge_trees`` and ``publish``.

Usage::

    python bench/bench_merge.py --quick      # 5,000 files (the issue's size), 3 reps
    python bench/bench_merge.py --reps 7
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import workspace
from common import (
    Sample,
    SideStats,
    check,
    compile_bytecode,
    fmt,
    git_version,
    isolated_env,
    log,
    parse_bench_args,
    run,
    write_results,
)

TARGET = 1.0
TOUCHED = 1000
_OURS_SCRIPT = """
import sys
from narrative.merge import merge_trees
from narrative.odb import PackWriter
from narrative.store import Store
store = Store.open(sys.argv[1])
writer = PackWriter(store.odb)
base, ours, theirs = (bytes.fromhex(x) for x in sys.argv[2:5])
result = merge_trees(store.odb, base, ours, theirs, writer)
writer.publish()
print(result.tree.hex(), len(result.conflicts))
"""


def _insert(path: Path, line_no: int, text: str) -> None:
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    lines.insert(min(line_no, len(lines)), text.encode() + b"\n")
    path.write_bytes(b"".join(lines))


def _plan(files: list[str], ws: Path, seed: int) -> dict[str, list[str]]:
    """Which files each side changes, and how (deterministic in ``seed``)."""
    rng = random.Random(f"merge:{seed}")
    text = sorted(f for f in files if not (ws / f).is_symlink() and b"\0" not in _head(ws / f))
    binary = sorted(f for f in files if not (ws / f).is_symlink() and f not in set(text))
    rng.shuffle(text)
    rng.shuffle(binary)
    n_bin = min(60, len(binary))
    theirs_text = text[: TOUCHED - n_bin - 60]
    plan = {
        "theirs_edit": theirs_text,
        "theirs_bin": binary[:n_bin],
        "theirs_rename": text[len(theirs_text) : len(theirs_text) + 20],
        "theirs_delete": text[len(theirs_text) + 20 : len(theirs_text) + 40],
        "theirs_add": [f"added/by_agent_{i:03d}.txt" for i in range(20)],
        "ours_clean_merge": theirs_text[:150],  # both edit, different places: line merge
        "ours_conflict": theirs_text[150:200],  # both edit the same place
        "ours_bin_conflict": binary[:10],
        "ours_only": text[TOUCHED : TOUCHED + 300],
    }
    return plan


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8000)


def _apply_theirs(ws: Path, plan: dict[str, list[str]]) -> None:
    for i, rel in enumerate(plan["theirs_edit"]):
        _insert(ws / rel, 0, f"# theirs edit {i}")
    for i, rel in enumerate(plan["theirs_bin"]):
        with open(ws / rel, "ab") as f:
            f.write(b"\0theirs %d" % i)
    for rel in plan["theirs_rename"]:
        (ws / rel).rename(ws / (rel + ".moved"))
    for rel in plan["theirs_delete"]:
        (ws / rel).unlink()
    (ws / "added").mkdir(exist_ok=True)
    for i, rel in enumerate(plan["theirs_add"]):
        (ws / rel).write_text(f"new file {i}\n" * 20)


def _apply_ours(ws: Path, plan: dict[str, list[str]]) -> None:
    for i, rel in enumerate(plan["ours_clean_merge"] + plan["ours_only"]):
        with open(ws / rel, "ab") as f:
            f.write(b"\n# ours tail %d\n" % i)
    for i, rel in enumerate(plan["ours_conflict"]):
        _insert(ws / rel, 0, f"# ours edit {i}")
    for i, rel in enumerate(plan["ours_bin_conflict"]):
        with open(ws / rel, "ab") as f:
            f.write(b"\0ours %d" % i)


def build(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Generate the workspace and the three snapshots; a plain git repo with the same trees."""
    from narrative.hierarchy import create_thread
    from narrative.restore import restore_workspace
    from narrative.snapshot import take_snapshot
    from narrative.store import Store

    ws = work / "ws"
    info = workspace.generate(ws, args.files, args.size_mb, args.seed)
    files = workspace.list_files(ws)
    store = Store.init(str(ws))
    base = take_snapshot(store, message="base").snapshot
    plan = _plan(files, ws, args.seed)
    thread = create_thread(store, store.config.default_objective, "run", forked_from=base.id)
    _apply_theirs(ws, plan)
    theirs = take_snapshot(store, thread.id, message="theirs").snapshot
    restore_workspace(store, base)
    _apply_ours(ws, plan)
    ours = take_snapshot(store, message="ours").snapshot

    anchor = work / "anchor.git"
    check(run(["git", "init", "-q", "--bare", str(anchor)], env=env, cwd=work))
    # Same objects in a plain repo: fetch the store's refs, then commit the three trees.
    check(
        run(
            ["git", "--git-dir", str(anchor), "fetch", "-q", store.git_dir,
             "refs/narrative/threads/*:refs/narrative/threads/*"],
            env=env, cwd=work,
        )
    )  # fmt: skip
    date = {**env, "GIT_AUTHOR_DATE": "1704067200 +0000", "GIT_COMMITTER_DATE": "1704067200 +0000"}
    date.update(GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="b")
    date["GIT_COMMITTER_EMAIL"] = "b@x"

    def commit(tree: str, parent: str | None, name: str) -> str:
        argv = ["git", "--git-dir", str(anchor), "commit-tree", tree, "-m", name]
        if parent:
            argv += ["-p", parent]
        oid = check(run(argv, env=date, cwd=work)).stdout.strip()
        check(run(["git", "--git-dir", str(anchor), "update-ref", f"refs/heads/{name}", oid],
                  env=env, cwd=work))  # fmt: skip
        return oid

    b = commit(base.tree, None, "base")
    commit(ours.tree, b, "ours")
    commit(theirs.tree, b, "theirs")
    return {
        "info": info,
        "store": store.git_dir,
        "anchor": anchor,
        "trees": (base.tree, ours.tree, theirs.tree),
        "plan": {k: len(v) for k, v in plan.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_bench_args(argv, "merge vs git merge-tree --write-tree", ["merge"])
    if not args.quick and "--files" not in (argv or sys.argv):
        args.files = 5000  # the issue's workspace; 50,000 is not needed to touch 1,000 files
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    env = isolated_env(work / "home")
    (work / "home").mkdir(exist_ok=True)
    # the store built below lives under the work directory and goes with it, not in the
    # user's data directory (every run used to leave a ~60 MB store behind there)
    os.environ["XDG_DATA_HOME"] = env["XDG_DATA_HOME"]
    try:
        log(f"building {args.files:,} files / {args.size_mb} MiB in {work} ...")
        setup = build(args, work, env)
        base, ours, theirs = setup["trees"]
        compile_bytecode(env, work)
        sides = {
            "ours": [sys.executable, "-c", _OURS_SCRIPT, setup["store"], base, ours, theirs],
            "anchor": ["git", "--git-dir", str(setup["anchor"]), "merge-tree", "--write-tree",
                       "--no-messages", "ours", "theirs"],
        }  # fmt: skip
        stats = {name: SideStats() for name in sides}
        trees: dict[str, str] = {}
        conflicts: dict[str, int] = {}
        for rep in range(args.reps + 1):  # rep 0 warms the caches and writes the objects
            order = ["ours", "anchor"] if rep % 2 else ["anchor", "ours"]
            for name in order:
                p = run(sides[name], env=env, cwd=work)
                if name == "ours":
                    check(p)
                    tree, count = p.stdout.split()
                    conflicts[name] = int(count)
                elif p.rc not in (0, 1):  # git exits 1 when the merge has conflicts
                    check(p)
                else:
                    lines = p.stdout.splitlines()
                    tree = lines[0]
                    conflicts[name] = len({ln.split("\t")[1] for ln in lines[1:] if "\t" in ln})
                trees[name] = tree
                if rep:
                    stats[name].add(Sample(p.seconds, p.maxrss_kib))
                log(f"rep {rep} {name}: {p.seconds:.3f}s")
        o, a = stats["ours"].median, stats["anchor"].median
        ratio = o / a if o and a else None
        status = "ok" if ratio is not None and ratio <= TARGET else "MISS"
        same = trees["ours"] == trees["anchor"]
        header = (
            f"{args.files:,} files / {args.size_mb} MiB, {sum(setup['plan'].values()):,} paths "
            f"changed ({setup['plan']}); {args.reps} reps; {git_version(env)}"
        )
        print(f"# merge benchmark\n\n{header}\n")
        print(
            "| scenario | ours (s) | git merge-tree (s) | ratio | target | status "
            "| peak RSS ours/git (MB) |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| merge, result touching {TOUCHED:,} files | {fmt(o, '.3f')} | {fmt(a, '.3f')} | "
            f"{fmt(ratio, '.2f')}x | <= {TARGET:.1f}x | {status} | "
            f"{fmt(stats['ours'].peak_mb, '.0f')} / {fmt(stats['anchor'].peak_mb, '.0f')} |"
        )
        print(
            f"\nconflicted paths: ours {conflicts.get('ours')}, git {conflicts.get('anchor')}; "
            f"merged tree ids {'identical' if same else 'differ'} "
            f"(ours {trees['ours'][:12]}, git {trees['anchor'][:12]})"
        )
        out = write_results(
            "merge",
            args,
            setup["info"],
            time.perf_counter() - t_start,
            {"git": git_version(env)},
            {
                "plan": setup["plan"],
                "ours_seconds": stats["ours"].seconds,
                "anchor_seconds": stats["anchor"].seconds,
                "ratio": ratio,
                "trees": trees,
                "conflicts": conflicts,
            },
        )
        log(f"results: {out}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
