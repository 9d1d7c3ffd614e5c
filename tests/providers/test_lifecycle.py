"""The lifecycle table, enforced and persisted by the environment manager."""

from __future__ import annotations

import itertools

import pytest

from narrative.store import Store
from providers.errors import IllegalTransition
from providers.lifecycle import TRANSITIONS, EnvState, can_transition
from providers.manager import EnvironmentManager
from providers.records import EnvironmentRecord

S = EnvState
PAIRS = [(a, b) for a, b in itertools.product(EnvState, EnvState) if a is not b]


def test_archived_is_terminal_and_reachable_from_everywhere() -> None:
    assert TRANSITIONS[S.ARCHIVED] == frozenset()
    for state in EnvState:
        if state is not S.ARCHIVED:
            assert can_transition(state, S.ARCHIVED), state


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.CREATED, S.RUNNING),  # must pass through starting
        (S.RUNNING, S.STOPPED),  # must pass through stopping
        (S.STOPPED, S.RUNNING),  # must pass through starting
        (S.NOT_AVAILABLE, S.RUNNING),  # a vanished resource is recreated, not resumed
        (S.STOPPED, S.DISCONNECTED),  # only a running environment loses its connection
        (S.ARCHIVED, S.STARTING),
    ],
)
def test_shortcuts_are_illegal(current: EnvState, target: EnvState) -> None:
    assert not can_transition(current, target)


def test_health_states_recover() -> None:
    assert can_transition(S.RUNNING, S.DISCONNECTED)
    assert can_transition(S.DISCONNECTED, S.UNCONNECTABLE)
    assert can_transition(S.UNCONNECTABLE, S.RUNNING)
    assert can_transition(S.DISCONNECTED, S.RUNNING)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    ws = tmp_path_factory.mktemp("ws")
    return Store.init(str(ws))


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_manager_enforces_every_pair(
    module_store: Store, current: EnvState, target: EnvState
) -> None:
    manager = EnvironmentManager(module_store)
    record = manager.records.add(
        EnvironmentRecord(name=f"e-{current}-{target}", provider="worktree", state=current)
    )
    if can_transition(current, target):
        moved = manager._move(record, target, "test")
        assert moved.state is target
        assert manager.get(record.id).state is target
        assert moved.history[-1]["from"] == current.value
        assert moved.history[-1]["to"] == target.value
    else:
        with pytest.raises(IllegalTransition) as info:
            manager._move(record, target, "test")
        assert (info.value.current, info.value.target) == (current.value, target.value)
        assert manager.get(record.id).state is current
        assert manager.get(record.id).history == []
