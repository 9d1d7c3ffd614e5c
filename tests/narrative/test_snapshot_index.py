"""A long-lived process resolves snapshots through an index kept per store (it reads only
what was added since it last asked), and a new process starts from what an earlier one kept in
the store's cache directory. Whatever happens to the threads in between, from this process or
another, it lists exactly what a fresh scan lists, in the same order, and resolves nothing a
fresh scan would not."""

from __future__ import annotations

import marshal
import os
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narrative import commits
from narrative.commits import _all_links, keep_snapshot_ids, snapshot_ids, thread_snapshots
from narrative.errors import SnapshotNotFound
from narrative.hierarchy import create_thread, list_objectives, list_threads, reset_thread
from narrative.history import resolve_snapshot
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.properties import examples

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
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_the_index_lists_what_a_fresh_scan_lists(
    tmp_path_factory: pytest.TempPathFactory,
    keep_every_reading: None,
    ops: list[tuple[str, bool, int]],
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
        # ... also in a process that starts now from what the others kept: part of the
        # history first (kept in turn), then all of it
        fresh = Store.open(mine.git_dir)
        assert list(islice(snapshot_ids(fresh), pick)) == scan[:pick]
        keep_snapshot_ids(fresh)
        assert list(snapshot_ids(Store.open(mine.git_dir))) == scan
        assert list(snapshot_ids(fresh)) == scan
    # ... and one that reads all, after all of that
    assert list(snapshot_ids(mine)) == _scan(Store.open(mine.git_dir))
    for sid, _oid in _scan(Store.open(mine.git_dir)):
        assert resolve_snapshot(mine, sid).id == sid


@pytest.fixture
def keep_every_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every resolve (and :func:`keep_snapshot_ids`) writes the index file, however little it
    read: the model then starts fresh processes from every kind of kept state."""
    monkeypatch.setattr(commits, "KEEP_INDEX_AFTER", 0)


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


def _commit_reads(store: Store) -> list[bytes]:
    """Records every commit ``store`` reads from now on (names are also looked up among the
    threads' records, which are other objects)."""
    reads: list[bytes] = []
    read = store.odb.read

    def counted(oid: bytes) -> tuple[str, bytes]:
        kind, data = read(oid)
        if kind == "commit":
            reads.append(oid)
        return kind, data

    store.odb.read = counted  # type: ignore[method-assign]
    return reads


def _history(tmp_path: Path, count: int) -> tuple[Store, str, list[str]]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    store = Store.init(str(workspace), str(tmp_path / "store"))
    thread = list_threads(store)[0].id
    made = []
    for i in range(count):
        (workspace / "a").write_text(f"{i}\n")
        made.append(take_snapshot(store, thread, message=f"s{i}").snapshot.id)
    return store, thread, made


def _index_file(store: Store) -> Path:
    return Path(store.git_dir, "narrative", "cache", "snapshot-index")


def test_a_new_process_reads_only_the_snapshots_taken_since_an_earlier_one_kept_the_index(
    tmp_path: Path,
) -> None:
    store, thread, made = _history(tmp_path, commits.KEEP_INDEX_AFTER + 16)
    oldest = made[0]
    assert resolve_snapshot(Store.open(store.git_dir), oldest).id == oldest  # reads them all
    assert _index_file(store).is_file()
    later = Store.open(store.git_dir)
    reads = _commit_reads(later)
    assert resolve_snapshot(later, oldest).id == oldest
    assert len(reads) <= 2  # the snapshot's commit (and its parent's, for its parent id)
    workspace = Path(store.workspace)
    for i in range(3):
        (workspace / "a").write_text(f"new {i}\n")
        take_snapshot(store, thread, message=f"n{i}")
    latest = Store.open(store.git_dir)
    reads = _commit_reads(latest)
    assert resolve_snapshot(latest, oldest).id == oldest
    # the new ones, the old head met again and its parent (a chain reads one ahead), the
    # snapshot's two: not the 80 below
    assert len(reads) <= 3 + 2 + 2
    assert list(snapshot_ids(latest)) == _scan(Store.open(store.git_dir))


def test_a_kept_index_that_is_torn_foreign_or_wrong_is_read_again(
    tmp_path: Path, keep_every_reading: None
) -> None:
    store, thread, made = _history(tmp_path, 5)
    resolve_snapshot(Store.open(store.git_dir), made[0])
    path = _index_file(store)
    whole = path.read_bytes()
    version, kept = marshal.loads(whole)
    head, ids, oids, start = kept[thread]
    damaged = [
        b"",
        whole[: len(whole) // 2],
        b"not marshal at all",
        marshal.dumps((version + 1, kept)),
        marshal.dumps((version, {thread: (head, ids, oids[:-1], start)})),  # an oid cut short
        marshal.dumps((version, {thread: (head, ids + " snap-extra", oids, start)})),
        marshal.dumps((version, [kept])),
        marshal.dumps((version, {thread: (head, ids, oids)})),
    ]
    for data in damaged:
        path.write_bytes(data)
        fresh = Store.open(store.git_dir)
        assert list(snapshot_ids(fresh)) == _scan(store)
        assert [resolve_snapshot(fresh, sid).id for sid in made] == made


def test_a_name_that_resolves_to_nothing_leaves_the_store_as_it_was(
    tmp_path: Path, keep_every_reading: None
) -> None:
    store, _thread, _made = _history(tmp_path, 3)

    def files() -> dict[str, bytes]:
        top = Path(store.git_dir)
        return {str(p.relative_to(top)): p.read_bytes() for p in top.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(SnapshotNotFound):
        resolve_snapshot(Store.open(store.git_dir), "snap-nothingofthatname")
    assert files() == before


def test_a_store_where_the_index_cannot_be_kept_still_resolves(
    tmp_path: Path, keep_every_reading: None
) -> None:
    store, _thread, made = _history(tmp_path, 3)
    _index_file(store).mkdir(parents=True)  # what stands in its place cannot be replaced
    for sid in made:
        assert resolve_snapshot(Store.open(store.git_dir), sid).id == sid
    assert _index_file(store).is_dir() and not os.listdir(_index_file(store))
