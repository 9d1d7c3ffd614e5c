"""The store works with pygit2 absent: deltified objects are then read by dulwich.

pygit2 needs a libgit2 wheel for the platform; where there is none (a minimal container image,
an unusual architecture) the store falls back to dulwich, pure Python. The core loop runs here in
a fresh interpreter in which ``import pygit2`` fails, over a store that stock ``git repack`` left
full of deltas (the store itself only writes whole objects, so deltas come from stock git).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import git

_CORE_LOOP = r"""
import json, os, subprocess, sys
sys.modules["pygit2"] = None  # as on a platform without a pygit2 wheel: import raises

from narrative.history import resolve_snapshot
from narrative.restore import restore_workspace
from narrative.snapshot import take_snapshot
from narrative.store import Store
from transfer.exporter import export
from transfer.importer import import_

root = sys.argv[1]
workspace = os.path.join(root, "ws")
os.makedirs(workspace)
store = Store.init(workspace)
base = "".join(f"line {i} of a file that changes a little each time\n" for i in range(400))
snapshots = []
for round_ in range(6):
    for name in ("a.txt", "b.txt", "c.txt"):
        with open(os.path.join(workspace, name), "w") as f:
            f.write(base + f"{name} round {round_}\n")
    snapshots.append(take_snapshot(store, message=f"round {round_}").snapshot)
# stock git repacks the store: most blobs become deltas against each other
subprocess.run(["git", "--git-dir", store.git_dir, "repack", "-adfq"], check=True)
verify = subprocess.run(
    ["git", "--git-dir", store.git_dir, "verify-pack", "-v",
     *[os.path.join(store.git_dir, "objects", "pack", n)
       for n in os.listdir(os.path.join(store.git_dir, "objects", "pack")) if n.endswith(".idx")]],
    check=True, capture_output=True, text=True).stdout
deltas = sum(1 for line in verify.splitlines() if len(line.split()) == 7)

store = Store.open(workspace=workspace)
first = resolve_snapshot(store, snapshots[0].id)
restore_workspace(store, first)
with open(os.path.join(workspace, "b.txt")) as f:
    restored = f.read() == base + "b.txt round 0\n"
bundle = os.path.join(root, "all.bundle")
export(store, bundle)
other_ws = os.path.join(root, "other")
os.makedirs(other_ws)
other = Store.init(other_ws)
import_(other, bundle)
from narrative.odb import fallback_reader  # after the loop: it ran on the store's own choice
print(json.dumps({
    "reader": fallback_reader(),
    "dulwich_loaded": "dulwich.object_store" in sys.modules,
    "pygit2_loaded": sys.modules.get("pygit2") is not None,
    "deltas": deltas,
    "restored": restored,
    "stores": [store.git_dir, other.git_dir],
}))
"""


def test_core_loop_without_pygit2_reads_deltas_with_dulwich(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", _CORE_LOOP, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    # nothing on stderr: no unclosed dulwich pack warned when collected or at shutdown
    assert proc.stderr == ""
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["deltas"] > 5, "stock git left no deltas: the fallback was not exercised"
    assert outcome["reader"] == "dulwich"
    assert outcome["dulwich_loaded"] and not outcome["pygit2_loaded"]
    assert outcome["restored"]
    for git_dir in outcome["stores"]:
        git("--git-dir", git_dir, "fsck", "--strict", "--no-dangling")


def test_pygit2_is_preferred_when_it_imports() -> None:
    from narrative.odb import fallback_reader

    assert fallback_reader() == "pygit2"


_CONCURRENT_READS = r"""
import subprocess, sys
sys.modules["pygit2"] = None
from concurrent.futures import ThreadPoolExecutor
from narrative.errors import StoreCorrupted
from narrative.objects import hash_object
from narrative.odb import ObjectStore

git_dir = sys.argv[1]
failures = 0
for _trial in range(20):
    odb = ObjectStore(git_dir)  # fresh each time: the race is on first use
    oids = [o for path in odb.pack_index_paths() for o in odb.pack_oids(path)]

    def read_ok(oid):
        try:
            kind, data = odb.read(oid)
        except StoreCorrupted:
            return False
        return hash_object(kind, data) == oid

    with ThreadPoolExecutor(8) as pool:
        failures += sum(1 for ok in pool.map(read_ok, oids * 3) if not ok)
print(failures)
"""


def test_deltified_reads_on_several_threads_without_pygit2(tmp_path: Path) -> None:
    """Restores read on several threads; dulwich must not report objects missing then."""
    git_dir = tmp_path / "store.git"
    git("init", "-q", "--bare", str(git_dir))
    work = tmp_path / "work"
    work.mkdir()
    base = "".join(f"line {i} of a file that changes a little each time\n" for i in range(300))
    for round_ in range(4):
        for i in range(150):
            (work / f"f{i}.txt").write_text(base + f"{i} {round_}\n")
        git("--git-dir", str(git_dir), "--work-tree", str(work), "add", "-A")
        git("--git-dir", str(git_dir), "--work-tree", str(work), "commit", "-qm", f"r{round_}")
    git("--git-dir", str(git_dir), "repack", "-adfq")
    proc = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_READS, str(git_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0", "objects read wrong or reported missing"
