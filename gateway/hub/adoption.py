"""Adoption of interrupted runs: a hub takes over the runs an earlier hub of its store was
driving when it stopped.

The run's event log says who drove it (``hub.pid`` of ``run.created``, later ``run.adopted``)
and what it asked for (the request of ``run.created``); its runtime keeps trying to reconnect,
so the new hub leases the environment again, listens where the runtime dials, and carries on
(:meth:`gateway.hub.runs.RunDriver.resume`); a run it cannot adopt is left as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from narrative.errors import NarrativeError
from narrative.hierarchy import list_runs
from narrative.history import resolve_snapshot
from narrative.models import AgentRun
from narrative.processes import pid_alive

from .events import RunEventLog
from .leases import EnvironmentLease as Lease
from .run_request import RunRequest

if TYPE_CHECKING:
    from .server import Hub

__all__ = ["adopt_interrupted"]

log = logging.getLogger(__name__)


async def adopt_interrupted(hub: Hub) -> None:
    """Take over the runs an earlier hub of this store was driving when it stopped: wait for
    their runtimes to reconnect (they keep trying) and carry on; finish the others."""

    def interrupted() -> list[tuple[AgentRun, list[dict[str, Any]]]]:
        found = []
        for run in list_runs(hub.store):
            if run.status != "running":
                continue
            events = RunEventLog(hub.store, run.id)
            history = events.read()
            if not history or history[0]["type"] != "run.created":
                continue
            pids = [e["hub"].get("pid") for e in history if isinstance(e.get("hub"), dict)]
            driver_pid = pids[-1] if pids else None
            # A hub that is still alive (an embedded one, say) keeps driving its own runs.
            if isinstance(driver_pid, int) and driver_pid != os.getpid() and pid_alive(driver_pid):
                continue
            found.append((run, history))
        return found

    found = await hub.blocking(interrupted)
    if not found:
        return
    # imported here: the run driver (and the merge code it needs) is for a hub with runs to
    # adopt; every hub starts here, and so does the runtime every run starts in its environment
    from .runs import RunDriver
    from .tools_node import lease_components

    for run, history in found:
        created = history[0]
        try:
            request = RunRequest.from_payload(created.get("request") or {})
            base = await hub.blocking(
                partial(resolve_snapshot, hub.store, str(created.get("base")))
            )
            environment = request.environment or run.environment
            env_id = (await hub.blocking(partial(hub.manager.get, environment))).id
        except NarrativeError as exc:
            log.warning("cannot adopt run %s: %s", run.id, exc)
            continue
        lease = await hub.blocking(partial(Lease.acquire, hub.store, env_id))
        if lease is None:
            log.warning("cannot adopt run %s: its environment is leased by another hub", run.id)
            continue
        try:  # a hybrid environment's agent and tools environments too
            await hub.blocking(partial(lease_components, hub.manager, environment, lease))
        except NarrativeError as exc:
            lease.release()
            log.warning("cannot adopt run %s: %s", run.id, exc)
            continue
        lease.note(run.id)
        events = RunEventLog(hub.store, run.id)
        driver = RunDriver(hub, run, base, replace(request, environment=environment), events)
        driver.lease = lease
        driver.replay(history)
        try:  # the runtime dials the environment's socket again, if it has one
            await driver.listen()
        except (NarrativeError, OSError) as exc:
            log.warning("cannot listen for the runtime of run %s: %s", run.id, exc)
        events.append("run.adopted", hub={"url": hub.url, "pid": os.getpid()})
        hub.register(driver)
        driver.resume()
