"""Three-way text merge: the own (narrative.merge3) vs the ``merge3`` library, stock
``git merge-file`` as the oracle (docs/decisions.md).

1,000 generated source files (~200 lines each), each with ours and theirs edits: mostly
separate hunks (clean), some identical edits on both sides, some adjacent hunks, some
overlapping edits (conflicts). Every file is merged by each side with the labels ``ours`` and
``theirs``; results are compared byte for byte with ``git merge-file -p``. Then the same for the
edge cases of ``tests/test_merge.py`` (adjacent hunks, no final newline, add/add, common ends).

Usage::

    pip install -e ".[bench]"              # merge3
    python bench/bench_merge3.py            # 1,000 files, best of 3
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable

from common import best_of

Triple = tuple[bytes, bytes, bytes]


def make_triples(count: int, seed: int = 15) -> list[Triple]:
    """(base, ours, theirs) for ``count`` files with a mix of edit shapes."""
    rng = random.Random(seed)
    triples = []
    for n in range(count):
        base = [
            f"    total_{n}_{i} = compute(value_{i}, {rng.randint(0, 99)})\n" for i in range(200)
        ]
        ours, theirs = list(base), list(base)
        shape = n % 10
        a = rng.randint(10, 80)
        b = rng.randint(110, 180)
        ours[a] = f"    ours edit {n}\n"
        theirs[b] = f"    theirs edit {n}\n"
        if shape == 7:  # both make the same edit too
            ours[a + 3] = theirs[a + 3] = f"    same edit {n}\n"
        elif shape == 8:  # adjacent hunks: git calls this a conflict
            ours[150] = f"    ours next {n}\n"
            theirs[151] = f"    theirs next {n}\n"
        elif shape == 9:  # overlapping edits with a common added line at the start
            ours[100:102] = ["    shared start\n", f"    ours {n}\n"]
            theirs[100:101] = ["    shared start\n", f"    theirs {n}\n", "    extra\n"]
        if shape in (3, 4):  # insertions and deletions
            del ours[a + 5 : a + 8]
            theirs[b - 4 : b - 4] = [f"    inserted {n} {k}\n" for k in range(3)]
        triples.append(tuple("".join(x).encode() for x in (base, ours, theirs)))  # type: ignore[misc]
    return triples


def own_merge(triple: Triple) -> tuple[bytes, int]:
    from narrative.merge3 import merge_text

    result = merge_text(*triple, labels=("ours", "theirs"))
    return result.data, result.conflicts


def library_merge(triple: Triple, reprocess: bool) -> tuple[bytes, int]:
    import merge3

    base, ours, theirs = (x.splitlines(keepends=True) for x in triple)
    lines = list(
        merge3.Merge3(base, ours, theirs).merge_lines(
            name_a=b"ours", name_b=b"theirs", reprocess=reprocess
        )
    )
    return b"".join(lines), sum(1 for line in lines if line.startswith(b"<<<<<<< "))


def git_merge(triples: list[Triple], root: str) -> list[tuple[bytes, int]]:
    out = []
    for n, triple in enumerate(triples):
        paths = {}
        for name, data in zip(("base", "ours", "theirs"), triple, strict=True):
            paths[name] = os.path.join(root, f"{n}.{name}")
            with open(paths[name], "wb") as f:
                f.write(data)
        proc = subprocess.run(
            [
                "git",
                "merge-file",
                "-p",
                "-L",
                "ours",
                "-L",
                "base",
                "-L",
                "theirs",
                paths["ours"],
                paths["base"],
                paths["theirs"],
            ],
            capture_output=True,
            check=False,
        )
        out.append((proc.stdout, max(proc.returncode, 0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    triples = make_triples(args.files)
    sides: dict[str, Callable[[Triple], tuple[bytes, int]]] = {
        "own": own_merge,
        "merge3": lambda t: library_merge(t, False),
        "merge3 reprocess": lambda t: library_merge(t, True),
    }
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        oracle = git_merge(triples, root)
        git_seconds = time.perf_counter() - started
    conflicted = sum(1 for _, c in oracle if c)
    print(f"{len(triples)} files, {conflicted} conflicted according to git merge-file")
    print(f"git merge-file: {git_seconds * 1e3:.0f} ms (one process per file)")
    own_seconds = best_of(args.reps, lambda: [own_merge(t) for t in triples])
    for name, merge in sides.items():
        seconds = (
            own_seconds
            if name == "own"
            else best_of(
                args.reps,
                lambda m=merge: [m(t) for t in triples],  # type: ignore[misc]
            )
        )
        results = [merge(t) for t in triples]
        same = sum(1 for got, want in zip(results, oracle, strict=True) if got[0] == want[0])
        verdict = sum(
            1 for got, want in zip(results, oracle, strict=True) if (got[1] > 0) == (want[1] > 0)
        )
        print(
            f"{name:17} {seconds * 1e3:7.1f} ms  x{seconds / own_seconds:5.1f}   "
            f"identical to git {same}/{len(triples)}   clean/conflict verdict as git "
            f"{verdict}/{len(triples)}"
        )
    from tests.test_merge import TEXT_CASES

    edge = [tuple(x.encode() for x in TEXT_CASES[name]) for name in sorted(TEXT_CASES)]
    with tempfile.TemporaryDirectory() as root:
        edge_oracle = git_merge(edge, root)  # type: ignore[arg-type]
    for name, merge in sides.items():
        wrong = [
            case
            for case, triple, want in zip(sorted(TEXT_CASES), edge, edge_oracle, strict=True)
            if merge(triple)[0] != want[0]  # type: ignore[arg-type]
        ]
        print(f"{name:17} edge cases differing from git: {wrong or 'none'}")


if __name__ == "__main__":
    main()
