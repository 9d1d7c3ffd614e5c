"""Listing records decodes each version of a record once per store (a hub lists a store's runs
for every run it starts): what a listing hands out is never stale, whoever changed the record,
and the records' dicts keep the keys and order they had as dataclasses (the JSON bytes of
``--json`` and of the metadata records)."""

from __future__ import annotations

from narrative.hierarchy import (
    create_thread,
    finish_run,
    list_objectives,
    list_runs,
    list_threads,
    start_run,
)
from narrative.models import AgentRun, Objective, Snapshot, Thread
from narrative.store import Store


def test_a_listing_is_decoded_once_and_sees_every_change_at_once(store: Store) -> None:
    thread = list_threads(store)[0]
    first = start_run(store, thread.id, manual=True)
    assert list_runs(store)[0] is list_runs(store)[0]  # the second listing decoded nothing
    # another process of the same store (its own instance, its own cache) finishes the run
    other = Store.open(store.git_dir)
    finish_run(other, first.id, "succeeded", exit_code=0)
    [seen] = list_runs(store)
    assert (seen.status, seen.exit_code) == ("succeeded", 0)
    second = start_run(other, thread.id, manual=True)
    assert {r.id for r in list_runs(store)} == {first.id, second.id}
    store.meta.update("runs", second.id, lambda _cur: None, "drop it")
    assert [r.id for r in list_runs(store)] == [first.id]
    assert [r.id for r in list_runs(other)] == [first.id]


def test_a_record_changed_in_place_by_an_update_is_listed_changed(store: Store) -> None:
    """An update's change function may edit the dict it is given and return it: that dict is
    the store's fresh copy, the listing after it shows the change, the one before stays."""
    thread = list_threads(store)[0]
    run = start_run(store, thread.id, manual=True)
    [before] = list_runs(store)

    def rename(current: dict[str, object] | None) -> dict[str, object] | None:
        assert current is not None
        current["agent"] = "renamed"
        return current

    store.meta.update("runs", run.id, rename, "rename")
    assert list_runs(store)[0].agent == "renamed"
    assert before.agent == run.agent  # what was handed out before is unchanged


# the keys, in order, that ``dataclasses.asdict`` gave when the records were dataclasses
_KEYS = {
    Objective: ["id", "title", "description", "status", "created_at"],
    Thread: ["id", "objective_id", "name", "forked_from", "created_at"],
    AgentRun: [
        "id",
        "thread_id",
        "agent",
        "environment",
        "base_snapshot",
        "result_snapshot",
        "status",
        "exit_code",
        "started_at",
        "finished_at",
        "manual",
        "reason",
        "thread",
    ],
}


def test_records_as_dicts_keep_their_keys_values_and_order(store: Store) -> None:
    objective = list_objectives(store)[0]
    thread = create_thread(store, objective.id, "side")
    run = start_run(store, thread.id).replace(reason="why", exit_code=3)
    for record in (objective, thread, run):
        data = record.to_dict()
        assert list(data) == _KEYS[type(record)]  # same order: same JSON bytes
        for key, value in data.items():
            assert value == getattr(record, "thread_id" if key == "thread" else key)
    assert Objective.from_dict(objective.to_dict()) == objective
    assert Thread.from_dict(thread.to_dict()) == thread
    assert AgentRun.from_dict(run.to_dict()) == run


def test_a_snapshot_as_a_dict_is_a_deep_copy_in_field_order() -> None:
    skipped = [{"path": "a", "reason": "too large", "sizes": [1, 2]}]
    snap = Snapshot(
        "snap-x", "c" * 40, "t" * 40, "thread-x", None, None, "msg", "2026", {"files": 1}, skipped
    )
    data = snap.to_dict()
    assert list(data) == [
        "id",
        "commit",
        "tree",
        "thread",
        "run",
        "parent",
        "message",
        "created_at",
        "stats",
        "skipped",
        "parent_commit",
    ]
    data["stats"]["files"] = 9
    data["skipped"][0]["sizes"].append(3)
    assert snap.stats == {"files": 1} and snap.skipped[0]["sizes"] == [1, 2]
    assert snap == Snapshot(**{**data, "stats": {"files": 1}, "skipped": skipped})
