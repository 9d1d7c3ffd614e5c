"""Environment records on disk: atomic, validated, unique names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from narrative.store import Store
from providers.errors import EnvironmentExists, EnvironmentNotFound, EnvironmentStateError
from providers.lifecycle import EnvState
from providers.records import EnvironmentRecord, EnvironmentStore, records_path


def test_round_trip_and_lookup(store: Store) -> None:
    records = EnvironmentStore(store)
    added = records.add(EnvironmentRecord(name="a", provider="worktree", config={"path": "/x"}))
    assert added.id.startswith("env-")
    again = EnvironmentStore(store).get("a")
    assert again == added
    assert EnvironmentStore(store).get(added.id) == added
    data = json.loads(Path(records_path(store)).read_bytes())
    assert data["version"] == 1 and data["environments"][0]["name"] == "a"


def test_names_are_unique_among_live_records(store: Store) -> None:
    records = EnvironmentStore(store)
    first = records.add(EnvironmentRecord(name="a", provider="worktree"))
    with pytest.raises(EnvironmentExists):
        records.add(EnvironmentRecord(name="a", provider="local"))
    records.change(first.id, lambda r: setattr(r, "state", EnvState.ARCHIVED))
    second = records.add(EnvironmentRecord(name="a", provider="local"))
    assert records.get("a").id == second.id
    assert records.get(first.id).state is EnvState.ARCHIVED  # history still reachable by id
    assert [r.id for r in records.live()] == [second.id]


def test_a_looked_up_record_is_the_callers_and_the_file_decides(store: Store) -> None:
    """``get`` answers from the records parsed last while the file's bytes are the same: what
    it hands out must be a copy, and any other writer's change must be seen at once."""
    records = EnvironmentStore(store)
    added = records.add(EnvironmentRecord(name="a", provider="worktree", history=[]))
    mine = records.get("a")
    mine.history.append({"at": "x", "from": "a", "to": "b", "reason": "mutated by a caller"})
    mine.state = EnvState.ERROR
    assert records.get("a") == added  # the shared parse was not touched
    # another process rewrites the file (same length, other bytes): seen at the next lookup
    path = records_path(store)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data.replace(b'"provider": "worktree"', b'"provider": "worktre2"'))
    assert EnvironmentStore(store).get("a").provider == "worktre2"
    Path(path).write_bytes(b'{"version": 1, "environments": []}')
    with pytest.raises(EnvironmentNotFound):
        records.get("a")


def test_unknown_name(store: Store) -> None:
    with pytest.raises(EnvironmentNotFound, match="nope"):
        EnvironmentStore(store).get("nope")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 1, "environments": [{"name": "a"}]}',
        b'{"version": 1, "environments": [], "extra": 1}',
        b'{"version": 1, "environments": [{"name": "a", "provider": "x", "state": "bogus"}]}',
        b'{"version": 9, "environments": []}',
    ],
)
def test_damaged_file_is_one_clear_error_and_left_alone(store: Store, content: bytes) -> None:
    path = records_path(store)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    records = EnvironmentStore(store)
    with pytest.raises(EnvironmentStateError, match=r"environments\.json"):
        records.load()
    with pytest.raises(EnvironmentStateError):
        records.add(EnvironmentRecord(name="b", provider="worktree"))
    assert Path(path).read_bytes() == content
