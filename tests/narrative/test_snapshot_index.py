"""A long-lived process resolves snapshots through an index kept per store (it reads only
what was added since it last asked). Whatever happens to the threads in between, from this
process or another, it lists exactly what a fresh scan lists, in the same order, and resolves
nothing a fresh scan would not."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narrative.commits import _all_links, snapshot_ids, thread_snapshots
from narrative.errors import SnapshotNotFound
from narrative.hierarchy import create_thread, list_objectives, list_threads, reset_thread
from narrative.history import resolve_snapshot
from narrative.snapshot import take_snapshot
from narrative.store import Store

OPS = st.lists(
    st.tuples(
        st.sampled_from(["snapshot", "reset", "new-thread", "drop-thread", "resolve"]),
        st.booleans(),  # through another instance of the store (another process's view)
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=20,
)


def _scan(store: Store) -> list[tuple[str, bytes]]:
    """What a process that never asked before sees: the whole walk (not through the index)."""
    return [(link.snapshot_id or "", link.oid) for link, _ in _all_links(store)]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_the_index_lists_what_a_fresh_scan_lists(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, bool, int]]
) -> None:
    root = tmp_path_factory.mktemp("index")
    workspace = root / "ws"
    workspace.mkdir()
    mine = Store.init(str(workspace), str(root / "store"))
    other = Store.open(mine.git_dir)
    list(snapshot_ids(mine))  # the index exists from the start
    objective = list_objectives(mine)[0].id
    for step, (op, elsewhere, pick) in enumerate(ops):
        store = other if elsewhere else mine
        heads = store.thread_heads()
        threads = sorted(heads) or [t.id for t in list_threads(store)]
        thread = threads[pick % len(threads)]
        if op == "snapshot":
            (workspace / "f.txt").write_text(f"{step}\n")
            # mostly the workspace's own thread, which grows (another thread gets a fork of it)
            on = None if pick % 4 else thread
            take_snapshot(store, on, message=f"s{step}", allow_empty=True)
        elif op == "reset" and thread in heads:
            older = [s for s in thread_snapshots(store, thread)][1:]
            if older:
                reset_thread(store, thread, older[pick % len(older)], force=True)
        elif op == "new-thread":
            create_thread(store, objective, f"t{step}")
        elif op == "drop-thread" and thread in heads:
            store.refs.update(store.thread_ref(thread), None, expected=heads[thread], force=True)
        scan = _scan(Store.open(mine.git_dir))
        if op == "resolve" and scan:  # stops reading at the snapshot it looks for
            sid = scan[pick % len(scan)][0]
            assert resolve_snapshot(mine, sid).id == sid
        # a reader that stops early (what is read stays kept, the rest is read later) ...
        assert list(islice(snapshot_ids(mine), pick)) == scan[:pick]
        # ... also in a process that starts now: part of the history first, then all of it
        fresh = Store.open(mine.git_dir)
        assert list(islice(snapshot_ids(fresh), pick)) == scan[:pick]
        assert list(snapshot_ids(fresh)) == scan
    # ... and one that reads all, after all of that
    assert list(snapshot_ids(mine)) == _scan(Store.open(mine.git_dir))
    for sid, _oid in _scan(Store.open(mine.git_dir)):
        assert resolve_snapshot(mine, sid).id == sid


def test_a_snapshot_dropped_by_a_reset_is_not_found_any_more(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    store = Store.init(str(workspace), str(tmp_path / "store"))
    thread = list_threads(store)[0].id
    (workspace / "a").write_text("1")
    first = take_snapshot(store, thread, message="one").snapshot
    (workspace / "a").write_text("2")
    second = take_snapshot(store, thread, message="two").snapshot
    assert resolve_snapshot(store, second.id).id == second.id  # indexed
    reset_thread(store, thread, first, force=True)
    with pytest.raises(SnapshotNotFound):
        resolve_snapshot(store, second.id)
    assert resolve_snapshot(store, first.id).id == first.id
