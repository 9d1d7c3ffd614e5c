"""The intake of a runtime's numbered events into its run's event log, gaps filled.

Runtime events carry their own sequence numbers (``rseq``): one that arrives out of order, or a
reconnect, makes the intake ask the runtime for what it missed (``runtime:events``), so a
dropped connection loses nothing. What a runtime sends is a claim: it is recorded under its own
type only if it is one a runtime reports, without the fields only the hub writes, and within the
run's caps (:class:`gateway.hub.events.EventBudget`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gateway.errors import GatewayError

from .events import EventBudget, RunEventLog

__all__ = ["RuntimeEventIntake", "claimed_fields"]

log = logging.getLogger(__name__)

_RUNTIME_EVENTS = frozenset({"agent.started", "agent.output", "agent.exited", "call.routed"})
"""What a runtime reports. Anything else it sends is recorded as ``runtime.event`` (its claimed
type in ``event``), never as one of the hub's own events (``run.finished``, ``runtime.spawned``)."""
_HUB_FIELDS = frozenset({"seq", "time", "type", "kind", "run", "hub", "at", "event"})
"""Fields only the hub writes into its log (readers trust ``hub`` to find the driving hub)."""


def claimed_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """What a runtime sent, without the fields only the hub writes."""
    return {k: v for k, v in fields.items() if k not in _HUB_FIELDS}


class RuntimeEventIntake:
    """Records the events of run ``run_id``'s runtime in order into ``events``.

    ``fetch(since)`` asks the runtime for its events after ``since`` (the reply of
    ``runtime:events``); ``background(coro)`` runs a coroutine as the driver's background task.
    """

    def __init__(
        self,
        run_id: str,
        events: RunEventLog,
        fetch: Callable[[int], Awaitable[Any]],
        background: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.run_id = run_id
        self.events = events
        self.fetch = fetch
        self.background = background
        self.budget = EventBudget()
        """The run's caps (replaced once the environment's config is read)."""
        self.last_rseq = 0
        self.exit_event: dict[str, Any] | None = None
        """The first ``agent.exited`` the runtime reported."""
        self.exited = asyncio.Event()
        """Set when the agent is over (reported exited, or killed by the hub)."""
        self._filling = False
        self._fill_wanted = False

    def replay(self, history: list[dict[str, Any]]) -> None:
        """Take up where an earlier hub's log of the run ends (the run is adopted)."""
        for event in history:
            if isinstance(event.get("rseq"), int):
                self.last_rseq = max(self.last_rseq, event["rseq"])
            if event["type"] == "agent.exited":
                self.exit_event = event
                self.exited.set()

    def on_event(self, event: dict[str, Any]) -> None:
        rseq = event.get("rseq")
        if not isinstance(rseq, int) or event.get("run") != self.run_id:
            return
        if rseq <= self.last_rseq:
            return
        if rseq > self.last_rseq + 1:
            self.request_fill()
            return
        self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        """Record one of the runtime's events: under its own type only if it is one a runtime
        reports, without the fields only the hub writes, within the run's caps. The first
        ``agent.exited`` ends the agent (later ones are claims recorded as such)."""
        self.last_rseq = event["rseq"]
        kind, fields = event.get("type"), claimed_fields(event)
        fields["at"] = event.get("time")
        if kind == "agent.exited" and self.exit_event is None:
            self.exit_event = event
            self.exited.set()
            self.events.append(kind, **fields)  # the one event past the caps: the run ends
            return
        if kind not in _RUNTIME_EVENTS or kind == "agent.exited":
            kind, fields["event"] = "runtime.event", str(kind)[:200]
        for admitted_kind, admitted in self.budget.admit(kind, fields):
            self.events.append(admitted_kind, **admitted)

    def request_fill(self) -> None:
        """Ask the runtime for the events this intake missed (once at a time)."""
        self._fill_wanted = True
        if not self._filling:
            self._filling = True
            self.background(self._fill())

    async def _fill(self) -> None:
        """Ask the runtime for the events after the last one recorded, until it has no more
        (and again if another gap showed while asking)."""
        try:
            while self._fill_wanted:
                self._fill_wanted = False
                while True:
                    reply = await self.fetch(self.last_rseq)
                    batch = reply.get("events", []) if isinstance(reply, dict) else []
                    if not isinstance(batch, list):
                        break
                    recorded = self.last_rseq
                    for event in batch:
                        if isinstance(event, dict) and event.get("rseq") == self.last_rseq + 1:
                            self._record(event)
                    if self.last_rseq == recorded or self.exited.is_set():
                        break
        except GatewayError as exc:
            log.info("could not fetch the missed events of %s: %s", self.run_id, exc)
        finally:
            self._filling = False
