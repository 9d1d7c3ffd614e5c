"""Reading packed objects: the own reader vs pygit2 (libgit2) vs dulwich (docs/decisions.md).

Builds a store of ``--files`` text files snapshotted ``--rounds`` times with small edits, then
reads every object of the store, each reader in a fresh interpreter, best of ``--reps``:

* whole objects, as the store writes them: own reader (``ObjectStore.read``), pygit2, dulwich;
* the same objects loose (``git unpack-objects``): own reader, pygit2, dulwich;
* the same store after stock ``git repack -adf`` (deltas, what the library fallback is for):
  pygit2, dulwich with its Rust extensions, dulwich pure Python (extensions blocked: what a
  platform without wheels gets).

Usage::

    python bench/bench_pack_read.py             # 2,000 files x 5 rounds, 3 reps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_READ = r"""
import json, os, sys, time
reader, git_dir, pure = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if pure:
    sys.modules["dulwich._pack"] = None
    sys.modules["dulwich._objects"] = None
from narrative.odb import ObjectStore
odb = ObjectStore(git_dir)
oids = [o for path in odb.pack_index_paths() for o in odb.pack_oids(path)] or [
    bytes.fromhex(d + name)
    for d in os.listdir(odb.objects_dir) if len(d) == 2
    for name in os.listdir(os.path.join(odb.objects_dir, d))
]
start = time.perf_counter()
if reader == "own":
    total = sum(len(odb.read(o)[1]) for o in oids)
elif reader == "pygit2":
    from narrative._pygit2 import open_repository, read_object
    repo = open_repository(git_dir)
    total = sum(len(read_object(repo, o)[1]) for o in oids)
else:
    from narrative._dulwich import open_object_store, read_object
    store = open_object_store(git_dir)
    total = sum(len(read_object(store, o)[1]) for o in oids)
print(json.dumps({"seconds": time.perf_counter() - start, "objects": len(oids), "bytes": total}))
"""


def _build(root: str, files: int, rounds: int) -> str:
    from narrative.snapshot import take_snapshot
    from narrative.store import Store

    workspace = os.path.join(root, "ws")
    os.makedirs(workspace)
    store = Store.init(workspace, store_dir=os.path.join(root, "store"))
    body = "".join(f"    value_{i} = compute({i}, other_{i % 7})\n" for i in range(120))
    for round_ in range(rounds):
        for i in range(files):
            if round_ == 0 or i % 3 == round_ % 3:
                path = os.path.join(workspace, f"pkg{i % 40}", f"mod{i}.py")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(f"def f{i}():\n{body}    return {round_}\n")
        take_snapshot(store, message=f"round {round_}")
    return store.git_dir


def _time(reader: str, git_dir: str, reps: int, pure: bool = False) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", _READ, reader, git_dir, "1" if pure else "0"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out)
        if not best or result["seconds"] < best["seconds"]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        whole = _build(root, args.files, args.rounds)
        deltified = os.path.join(root, "deltified.git")
        shutil.copytree(whole, deltified)
        subprocess.run(["git", "--git-dir", deltified, "repack", "-adfq"], check=True)
        loose = os.path.join(root, "loose.git")
        subprocess.run(["git", "init", "-q", "--bare", loose], check=True)
        [pack] = [
            n for n in os.listdir(os.path.join(deltified, "objects", "pack")) if n.endswith(".pack")
        ]
        with open(os.path.join(deltified, "objects", "pack", pack), "rb") as packed:
            subprocess.run(
                ["git", "--git-dir", loose, "unpack-objects", "-q"], stdin=packed, check=True
            )
        rows = [
            ("whole objects", "own", whole, False),
            ("whole objects", "pygit2", whole, False),
            ("whole objects", "dulwich", whole, False),
            ("loose objects", "own", loose, False),
            ("loose objects", "pygit2", loose, False),
            ("loose objects", "dulwich", loose, False),
            ("deltified (git repack)", "pygit2", deltified, False),
            ("deltified (git repack)", "dulwich", deltified, False),
            ("deltified (git repack)", "dulwich-pure", deltified, True),
        ]
        baseline: dict[str, float] = {}
        started = time.perf_counter()
        for pack, reader, git_dir, pure in rows:
            result = _time(reader.removesuffix("-pure"), git_dir, args.reps, pure)
            baseline.setdefault(pack, result["seconds"])
            per_object = result["seconds"] / result["objects"] * 1e6
            print(
                f"{pack:24} {reader:13} {result['objects']:6d} objects "
                f"{result['bytes'] / 2**20:7.1f} MiB {result['seconds'] * 1000:8.1f} ms "
                f"{per_object:6.1f} us/object  x{result['seconds'] / baseline[pack]:.2f}"
            )
        print(f"(total {time.perf_counter() - started:.0f} s, ratios against the first row)")


if __name__ == "__main__":
    main()
