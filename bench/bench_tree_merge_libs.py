"""Tree merge: the own (narrative.merge) vs pygit2's and dulwich's, with ``git merge-tree`` as
the oracle (docs/decisions.md).

The scenario of ``bench_merge.py`` (5,000 files, a run result touching 1,000 of them, clean
line merges and text and binary conflicts). Each side is a cold process merging the same three
trees, best of ``--reps``; reported: time, conflicted paths, and whether the merged tree is
git's (markers included).

Usage::

    python bench/bench_tree_merge_libs.py --quick
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from bench_merge import build
from common import check, isolated_env, log, parse_bench_args, run

_SCRIPTS = {
    "own": """
from narrative.merge import merge_trees
from narrative.odb import PackWriter
from narrative.store import Store
store = Store.open(GIT_DIR)
writer = PackWriter(store.odb)
result = merge_trees(store.odb, BASE, OURS, THEIRS, writer)
writer.publish()
print(result.tree.hex(), len(result.conflicts))
""",
    "pygit2": """
from narrative._pygit2 import open_repository
repo = open_repository(GIT_DIR)
index = repo.merge_trees(BASE.hex(), OURS.hex(), THEIRS.hex())
conflicts = {next(e for e in c if e is not None).path for c in index.conflicts or ()}
print("-" if conflicts else index.write_tree(repo), len(conflicts))
""",
    "dulwich": """
import os
from dulwich.merge import Merger
from dulwich.object_store import DiskObjectStore
store = DiskObjectStore(os.path.join(GIT_DIR, "objects"))
tree, conflicts = Merger(store).merge_trees(store[BASE], store[OURS], store[THEIRS])
print(tree.id.decode(), len(conflicts))
""",
}
_PRELUDE = (
    "import sys\nGIT_DIR = sys.argv[1]\nBASE, OURS, THEIRS = map(bytes.fromhex, sys.argv[2:5])\n"
)


def main() -> int:
    args = parse_bench_args(None, "tree merge: own vs pygit2 vs dulwich", ["merge"])
    if not args.quick and "--files" not in sys.argv:
        args.files = 5000
    work = Path(tempfile.mkdtemp(prefix="bench-tree-merge-"))
    env = isolated_env(work / "home")
    (work / "home").mkdir(exist_ok=True)
    try:
        setup = build(args, work, env)
        trees = setup["trees"]
        git = run(["git", "--git-dir", str(setup["anchor"]), "merge-tree", "--write-tree",
                   "--no-messages", "ours", "theirs"], env=env, cwd=work)  # fmt: skip
        if git.rc not in (0, 1):  # 1: the merge has conflicts
            check(git)
        lines = git.stdout.splitlines()
        git_conflicts = len({ln.split("\t")[1] for ln in lines[1:] if "\t" in ln})
        print(f"git merge-tree: {git.seconds * 1000:.0f} ms, {git_conflicts} conflicted paths")
        own = 0.0
        for name, script in _SCRIPTS.items():
            argv = [sys.executable, "-c", _PRELUDE + script, setup["store"], *trees]
            best = float("inf")
            for _ in range(args.reps + 1):  # the first warms the caches
                p = check(run(argv, env=env, cwd=work))
                best = min(best, p.seconds)
                log(f"{name}: {p.seconds:.3f}s")
            tree, count = p.stdout.split()
            own = own or best
            if tree == "-":
                verdict = "no merged tree (conflicts stay in an index, without markers)"
            else:
                verdict = f"tree {'identical to' if tree == lines[0] else 'differs from'} git's"
            print(
                f"{name:8} {best * 1000:7.0f} ms x{best / own:5.2f}  {count} conflicted  {verdict}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
