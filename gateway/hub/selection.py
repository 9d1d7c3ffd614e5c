"""Which environment a run goes to when the caller names none: the hub selects one.

An idle environment that has every required capability is reused (a running one first, then
one that can be reconnected or started); when none is free, a new one is created with the
preferred provider that has them. The choice is made under the environment's lease, so two
hubs selecting at once never pick the same environment.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

from providers.errors import EnvironmentExists, ProviderError
from providers.lifecycle import EnvState
from providers.manager import EnvironmentManager
from providers.records import EnvironmentRecord
from providers.registry import pick_provider

from .leases import EnvironmentLease

__all__ = ["Selection", "select_environment"]

# Reuse order: ready now, then reachable again, then merely stopped.
_PREFERENCE = {
    EnvState.RUNNING: 0,
    EnvState.DISCONNECTED: 1,
    EnvState.UNCONNECTABLE: 2,
    EnvState.STOPPED: 3,
    EnvState.CREATED: 3,
}


@dataclass
class Selection:
    """The environment chosen for a run, its lease, and how it was obtained
    (``reused``, ``started`` or ``created``)."""

    record: EnvironmentRecord
    how: str
    lease: EnvironmentLease


def select_environment(
    manager: EnvironmentManager, require: Iterable[str] = (), private: Container[str] = ()
) -> Selection:
    """Lease an environment with every capability in ``require`` (see the module docstring),
    never one whose id is in ``private`` (a team user's own, which only a run naming it gets).

    Raises:
        NoProviderAvailable: none exists and no provider has the capabilities.
        ProviderError: a new environment could not be created.
    """
    wanted = sorted({r.strip() for r in require if r.strip()})
    candidates = sorted(
        (
            r
            for r in manager.environments()
            if r.state in _PREFERENCE
            and r.id not in private
            and all(c in r.capabilities for c in wanted)
        ),
        key=lambda r: (_PREFERENCE[r.state], r.created_at),
    )
    for record in candidates:
        lease = EnvironmentLease.acquire(manager.store, record.id)
        if lease is None:
            continue
        try:
            return Selection(*_make_ready(manager, record.id), lease=lease)
        except ProviderError:
            lease.release()  # it would not come back: try the next one (its state says why)
    provider = pick_provider(wanted)
    for _ in range(5):  # another hub may take the same new name at the same moment
        taken = {r.name for r in manager.environments()}
        name = next(f"auto-{provider}-{n}" for n in range(1, len(taken) + 2)
                    if f"auto-{provider}-{n}" not in taken)  # fmt: skip
        try:
            record = manager.create(name, provider=provider, require=wanted, start=False)
            break
        except EnvironmentExists:
            continue
    else:
        raise ProviderError("could not find a free name for a new environment")
    lease = EnvironmentLease.acquire(manager.store, record.id)
    assert lease is not None  # nobody else knows its id yet
    try:
        return Selection(manager.start(record.id), "created", lease)
    except BaseException:
        lease.release()
        raise


def _make_ready(manager: EnvironmentManager, env_id: str) -> tuple[EnvironmentRecord, str]:
    """Bring a leased environment to running: as it is, after a health check, or started."""
    record = manager.get(env_id)  # as it is now that it is ours
    if record.state is EnvState.RUNNING:
        return record, "reused"
    if record.state in (EnvState.DISCONNECTED, EnvState.UNCONNECTABLE):
        manager.check_health([env_id])
        record = manager.get(env_id)
        if record.state is EnvState.RUNNING:
            return record, "reused"
        return manager.restart(env_id), "started"
    return manager.start(env_id), "started"
