"""Concurrent snapshots and small-pack consolidation: no traceback, no lost snapshot.

Every snapshot publishes a pack; past MAX_PACKS the snapshot that notices merges the small
ones and removes them. Readers in other processes that listed the packs before must still
find every object, and concurrent snapshots must all succeed (or fail with one clear line).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from narrative.odb import ObjectStore, PackWriter
from narrative.repack import MAX_PACKS, consolidate_small_packs
from narrative.store import Store
from tests.conftest import NARRATIVE, git


def _small_packs(store: Store, count: int) -> list[bytes]:
    oids = []
    for _ in range(count):
        writer = PackWriter(store.odb)
        oids.append(writer.add_raw("blob", os.urandom(64)))
        writer.publish(durable=False)
    return oids


def test_reader_finds_objects_of_packs_merged_away_since_it_listed_them(store: Store) -> None:
    oids = _small_packs(store, MAX_PACKS + 6)
    reader = ObjectStore(store.git_dir)
    assert all(reader.exists(oid) for oid in oids)  # the reader has listed the small packs
    assert consolidate_small_packs(ObjectStore(store.git_dir))  # another process merges them
    assert reader.read(oids[0])[0] == "blob"
    assert reader.raw_entry(oids[1]) is not None


@pytest.mark.long  # several seconds: make test stays under ten minutes
def test_eight_concurrent_snapshots_never_traceback_nor_lose_work(
    store: Store, workspace: Path
) -> None:
    printed: list[str] = []
    for round_ in range(8):
        _small_packs(store, MAX_PACKS + 40)  # every snapshot of the round will consolidate
        procs = []
        for i in range(8):
            (workspace / f"file{i}.txt").write_text(f"round {round_} writer {i}\n")
            procs.append(
                subprocess.Popen(
                    [NARRATIVE, "snapshot", "-m", f"r{round_} w{i}"],
                    cwd=workspace,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert "Traceback" not in err, err
            if proc.returncode == 0:
                printed.append(out.strip().split()[-1])
            else:
                assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
                assert "busy" in err and "retry" in err, err
    assert printed
    for snapshot_id in set(printed):
        subprocess.run(
            [NARRATIVE, "show", snapshot_id], cwd=workspace, check=True, capture_output=True
        )
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
