"""Writing objects: the own pack writer vs dulwich vs pygit2 (docs/decisions.md).

Writes the same ``--objects`` text blobs (1-40 KiB, a snapshot's worth) into an empty store,
each writer in a fresh interpreter, best of ``--reps``, no fsync on any side:

* own: :class:`narrative.odb.PackWriter` (one pack, deflate level 1), single-threaded here
  (snapshots deflate on several threads);
* dulwich: ``DiskObjectStore.add_objects`` (one pack);
* pygit2: ``repo.odb.write`` (libgit2 writes each object as a loose file; it has no API to
  write a pack from raw objects).

Every result is checked with ``git fsck``.

Usage::

    python bench/bench_pack_write.py             # 5,000 blobs, 3 reps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_WRITE = r"""
import json, os, random, sys, time
writer, git_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(15)
words = [f"word{i}" for i in range(500)]
blobs = [
    " ".join(rng.choice(words) for _ in range(rng.randint(150, 6000))).encode()
    for _ in range(count)
]
start = time.perf_counter()
if writer == "own":
    from narrative.odb import ObjectStore, PackWriter
    pack = PackWriter(ObjectStore(git_dir))
    for blob in blobs:
        pack.add_raw("blob", blob, dedupe=False)
    pack.publish(durable=False)
elif writer == "dulwich":
    from dulwich.object_store import DiskObjectStore
    from dulwich.objects import Blob
    DiskObjectStore(os.path.join(git_dir, "objects")).add_objects(
        [(Blob.from_string(blob), None) for blob in blobs])
else:
    from narrative._pygit2 import open_repository
    import pygit2
    odb = open_repository(git_dir).odb
    for blob in blobs:
        odb.write(pygit2.enums.ObjectType.BLOB, blob)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "bytes": sum(map(len, blobs))}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    baseline = 0.0
    for writer in ("own", "dulwich", "pygit2"):
        best = float("inf")
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory() as root:
                git_dir = os.path.join(root, "store.git")
                subprocess.run(["git", "init", "-q", "--bare", git_dir], check=True)
                out = subprocess.run(
                    [sys.executable, "-c", _WRITE, writer, git_dir, str(args.objects)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                result = json.loads(out)
                best = min(best, result["seconds"])
                subprocess.run(
                    ["git", "--git-dir", git_dir, "fsck", "--strict", "--no-dangling"],
                    check=True,
                    capture_output=True,
                )
                on_disk = sum(
                    os.path.getsize(os.path.join(d, f))
                    for d, _, files in os.walk(os.path.join(git_dir, "objects"))
                    for f in files
                )
        baseline = baseline or best
        print(
            f"{writer:8} {args.objects} blobs {result['bytes'] / 2**20:6.1f} MiB "
            f"-> {on_disk / 2**20:6.1f} MiB on disk  {best * 1000:8.1f} ms  x{best / baseline:.2f}"
        )


if __name__ == "__main__":
    main()
