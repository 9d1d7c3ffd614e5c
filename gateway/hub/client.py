"""Driving runs from the command line: through the store's serving hub (``narrative serve``)
when there is one, else through a hub embedded in this process for as long as the runs last.

Either way the runs' event logs in the store are the source of truth; the caller follows them
to show output as it arrives.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

from gateway.client import GatewayClient
from narrative.errors import InvalidInput, NarrativeError
from narrative.hierarchy import finish_run, get_run
from narrative.models import AgentRun
from narrative.store import Store
from providers.manager import EnvironmentManager

from .direct import screen_result
from .events import RunEventLog
from .run_request import RunRequest, collect_from_environment
from .server import Hub, control_token, find_hub
from .team import revoke_user
from .users import OWNER, AuditLog, UserRegistry

__all__ = [
    "follow_runs",
    "hub_client",
    "kill_run",
    "revoke_user_on_hub",
    "run_through_hub",
    "stop_run",
]

EventFn = Callable[[AgentRun, dict[str, Any]], None]


def hub_client(info: dict[str, Any], token: str) -> GatewayClient:
    """A client for the hub a hub file describes (:func:`.server.find_hub`): its URL, and
    the fingerprint of its certificate pinned when it serves TLS."""
    fingerprint = info.get("fingerprint")
    return GatewayClient(
        info["url"], token, fingerprint=fingerprint if isinstance(fingerprint, str) else None
    )


async def follow_runs(store: Store, runs: Sequence[AgentRun], on_event: EventFn) -> None:
    """Report every event of ``runs`` as it is appended, until each run finished."""
    logs = {run.id: (run, RunEventLog(store, run.id)) for run in runs}
    while logs:
        for run_id, (run, events) in list(logs.items()):
            for event in events.read_new():
                on_event(run, event)
                if event["type"] == "run.finished":
                    del logs[run_id]
                    break
        if logs:
            await asyncio.sleep(0.05)


async def run_through_hub(
    store: Store, requests: Sequence[RunRequest], on_event: EventFn
) -> list[AgentRun]:
    """Start ``requests`` (one run each: several make a fan-out) and wait for all of them."""
    info = find_hub(store)
    if info is not None:
        token = control_token(store, f"cli-{os.getpid()}")
        async with hub_client(info, token) as client:
            target = info["environment"]
            runs = [
                AgentRun.from_dict(
                    await client.call("hub", "runStart", request.to_payload(), target=target)
                )
                for request in requests
            ]
            await follow_runs(store, runs, on_event)
    else:
        async with Hub(store) as hub:
            runs = []
            try:
                for request in requests:
                    runs.append(await hub.submit(request))
                await follow_runs(store, runs, on_event)
            except BaseException:
                # Interrupted: stop what was started rather than leave it for adoption.
                for run in runs:
                    if run.id in hub.drivers:
                        await hub.stop_run(run.id, 2.0)
                        await hub.wait(run.id)
                raise
            for run in runs:
                await hub.wait(run.id)
    return [get_run(store, run.id) for run in runs]


def _driving_hub(store: Store, run: AgentRun) -> dict[str, Any] | None:
    history = RunEventLog(store, run.id).read()
    pids = [e["hub"]["pid"] for e in history if isinstance(e.get("hub"), dict)]
    for pid in reversed(pids):
        if isinstance(pid, int):
            info = find_hub(store, pid)
            if info is not None:
                return info
    return None


async def _control(store: Store, run: AgentRun, action: str, payload: dict[str, Any]) -> bool:
    info = _driving_hub(store, run)
    if info is None:
        return False
    token = control_token(store, f"cli-{os.getpid()}")
    async with hub_client(info, token) as client:
        await client.call("hub", action, payload, target=info["environment"])
    return True


async def stop_run(store: Store, run: AgentRun, grace: float | None) -> None:
    """Ask the hub driving ``run`` to stop it (gracefully, killing after ``grace``)."""
    _check_running(run)
    if not await _control(store, run, "runStop", {"run": run.id, "grace": grace}):
        await kill_run(store, run)


async def kill_run(store: Store, run: AgentRun) -> None:
    """Have the hub kill ``run`` at once; with no hub alive, kill its runtime through the
    provider, collect what the environment holds and record the run as killed."""
    _check_running(run)
    if await _control(store, run, "runKill", {"run": run.id}):
        return
    _kill_orphan(store, run)


def _check_running(run: AgentRun) -> None:
    if run.status != "running":
        raise InvalidInput(f"run {run.id} already finished ({run.status})")


def _kill_orphan(store: Store, run: AgentRun) -> None:
    events = RunEventLog(store, run.id)
    handles = [e.get("handle") for e in events.read() if e["type"] == "runtime.spawned"]
    manager = EnvironmentManager(store)
    events.append("run.killing", by="cli (no hub alive)")
    if handles and isinstance(handles[-1], str):
        try:
            manager.signal(run.environment, handles[-1], "kill")
        except NarrativeError as exc:
            events.append("run.kill_failed", reason=str(exc))
    result = screen_result(store, run.id, collect_from_environment(manager, run, events))
    finish_run(store, run.id, "killed", None, result)
    events.append("run.finished", status="killed", exitCode=None, resultSnapshot=result)


async def revoke_user_on_hub(store: Store, user: str) -> int:
    """Revoke a team user of ``store``'s hub: through the serving hub, which closes their open
    connections too (how many it closed is returned), else in the store directly."""
    info = find_hub(store)
    if info is None:
        revoke_user(UserRegistry(store), AuditLog(store), user, OWNER)
        return 0
    token = control_token(store, f"cli-{os.getpid()}")
    async with GatewayClient(info["url"], token) as client:
        answer = await client.call("team", "revoke", {"user": user}, target=info["environment"])
    return int(answer["closed"])
