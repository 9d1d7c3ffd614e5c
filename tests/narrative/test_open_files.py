"""A store that is dropped keeps no file open: a process that opens many stores (the hub, a
long-lived API user, a test run) must not run out of descriptors.

Each pack's descriptor used to be closed only by ``ObjectStore.invalidate``: a store dropped
without it left one descriptor per pack and reader open for good, and a long property run
(``make soak``) failed with ``Too many open files`` after a few thousand stores.
"""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest

from narrative import odb
from narrative.commits import all_snapshots
from narrative.history import resolve_snapshot
from narrative.restore import materialize
from narrative.snapshot import take_snapshot
from narrative.store import Store
from transfer.exporter import export
from transfer.importer import import_


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_store_lifetime(root: Path) -> None:
    """What a user does with a store, through every reader, then the store is let go."""
    workspace = root / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("one\n")
    store = Store.init(str(workspace), str(root / "store"))
    first = take_snapshot(store, None, message="first")
    (workspace / "a.txt").write_text("two\n")
    take_snapshot(store, None, message="second")
    again = Store.open(store.git_dir)  # a second reader of the same packs
    materialize(again, resolve_snapshot(again, first.snapshot.id), str(root / "restored"))
    list(all_snapshots(again))
    export(again, str(root / "out.bundle"))
    other_ws = root / "other"
    other_ws.mkdir()
    other = Store.init(str(other_ws), str(root / "other-store"))
    import_(other, str(root / "out.bundle"))
    list(all_snapshots(other))


def test_a_dropped_store_keeps_no_file_open(tmp_path: Path) -> None:
    (tmp_path / "warm-up").mkdir()
    one_store_lifetime(tmp_path / "warm-up")  # modules and process-wide caches, opened once
    gc.collect()
    before = open_descriptors()
    for i in range(15):
        (tmp_path / str(i)).mkdir()
        one_store_lifetime(tmp_path / str(i))
    gc.collect()
    assert open_descriptors() - before <= 1, "descriptors left open by dropped stores"


def test_out_of_descriptors_is_an_error_not_a_missing_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack that cannot be opened for any reason but its removal (here: the process is out of
    descriptors, the failure make soak met) fails the read with that error; it used to be
    skipped as if gc had just removed it, so a snapshot that exists was reported unknown."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.txt").write_text("one\n")
    store = Store.init(str(tmp_path / "ws"), str(tmp_path / "store"))
    snapshot = take_snapshot(store, None, message="first").snapshot
    fresh = Store.open(store.git_dir)

    def out_of_descriptors(path: str) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)

    monkeypatch.setattr(odb, "PackIndex", out_of_descriptors)  # the system call's answer
    with pytest.raises(OSError) as failure:
        resolve_snapshot(fresh, snapshot.id)
    assert failure.value.errno == errno.EMFILE
