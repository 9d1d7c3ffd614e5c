"""The environment lifecycle: states and the explicit table of legal transitions.

Kept free of I/O so that every transition can be tested directly. ``archived`` is terminal;
destroying an environment (→ ``archived``) is legal from every state, so a broken environment
can always be cleaned up.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TRANSITIONS", "EnvState", "can_transition", "is_active"]


class EnvState(StrEnum):
    """Where an environment is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"
    RESTARTING = "restarting"
    UNCONNECTABLE = "unconnectable"
    DISCONNECTED = "disconnected"
    NOT_AVAILABLE = "not_available"
    ARCHIVED = "archived"


S = EnvState

TRANSITIONS: dict[EnvState, frozenset[EnvState]] = {
    S.CREATED: frozenset({S.STARTING, S.ERROR, S.NOT_AVAILABLE}),
    S.STARTING: frozenset({S.RUNNING, S.ERROR, S.NOT_AVAILABLE}),
    S.RUNNING: frozenset(
        {S.STOPPING, S.RESTARTING, S.DISCONNECTED, S.UNCONNECTABLE, S.ERROR, S.NOT_AVAILABLE}
    ),
    S.STOPPING: frozenset({S.STOPPED, S.ERROR, S.NOT_AVAILABLE}),
    S.STOPPED: frozenset({S.STARTING, S.RESTARTING, S.ERROR, S.NOT_AVAILABLE}),
    S.ERROR: frozenset({S.STARTING, S.RESTARTING, S.STOPPING, S.STOPPED, S.NOT_AVAILABLE}),
    S.RESTARTING: frozenset({S.RUNNING, S.ERROR, S.NOT_AVAILABLE}),
    # Health checks move a running environment to disconnected, then unconnectable, and back.
    S.DISCONNECTED: frozenset(
        {S.RUNNING, S.UNCONNECTABLE, S.STOPPING, S.RESTARTING, S.ERROR, S.NOT_AVAILABLE}
    ),
    S.UNCONNECTABLE: frozenset(
        {S.RUNNING, S.DISCONNECTED, S.STOPPING, S.RESTARTING, S.ERROR, S.NOT_AVAILABLE}
    ),
    # The resource vanished: it can only be recreated (starting) or destroyed.
    S.NOT_AVAILABLE: frozenset({S.STARTING}),
    S.ARCHIVED: frozenset(),
}
# Destroy works from any live state.
for _state in EnvState:
    if _state is not S.ARCHIVED:
        TRANSITIONS[_state] = TRANSITIONS[_state] | {S.ARCHIVED}


def can_transition(current: EnvState, target: EnvState) -> bool:
    """Whether the table allows ``current`` → ``target``."""
    return target in TRANSITIONS[current]


def is_active(state: EnvState) -> bool:
    """States in which commands may be executed (a disconnected environment may recover)."""
    return state in (S.RUNNING, S.DISCONNECTED)
