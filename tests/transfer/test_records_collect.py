"""What records travel with a thread: the thread, the threads it forks from, their objectives
and runs; a runtime restoring a run's base asks for the runs of its own thread only (its
user's main thread may hold thousands), and its store then holds no other."""

from __future__ import annotations

from pathlib import Path

from gateway.hub.narratives import make_bundle
from narrative.hierarchy import create_thread, list_runs, list_threads, start_run
from narrative.snapshot import take_snapshot
from narrative.store import Store
from transfer.importer import import_stream
from transfer.records import collect_records


def _forked(store: Store, workspace: Path) -> tuple[str, str, str, str]:
    """main with a snapshot and a run; a thread forked from it with a run of its own."""
    main = list_threads(store)[0]
    (workspace / "a.txt").write_text("a\n")
    base = take_snapshot(store, main.id, message="base").snapshot
    main_run = start_run(store, main.id, manual=True)
    side = create_thread(store, main.objective_id, "side", forked_from=base.id)
    side_run = start_run(store, side.id, base_snapshot=base.id, manual=True)
    return main.id, side.id, main_run.id, side_run.id


def test_a_thread_travels_with_its_forks_runs_unless_asked_not_to(
    store: Store, workspace: Path
) -> None:
    main, side, main_run, side_run = _forked(store, workspace)
    every = collect_records(store, [side])
    assert set(every["threads"]) == {main, side}
    assert set(every["runs"]) == {main_run, side_run}
    own = collect_records(store, [side], fork_runs=False)
    assert set(own["threads"]) == {main, side}
    assert own["objectives"] == every["objectives"]
    assert set(own["runs"]) == {side_run}


def test_a_runtimes_bundle_brings_no_run_of_the_base_thread(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    main, side, _main_run, side_run = _forked(store, workspace)
    base = take_snapshot(store, main, message="again", allow_empty=True).snapshot
    bundle = tmp_path / "in.bundle"
    make_bundle(store, str(bundle), {"snapshot": base.id, "threads": [side], "forkRuns": False})
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    other = Store.init(str(other_ws), str(tmp_path / "other-store"))
    with bundle.open("rb") as stream:
        import_stream(other, stream, str(bundle), "hub")
    assert [r.id for r in list_runs(other)] == [side_run]
