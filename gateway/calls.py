"""The calls this process makes and waits on (the caller's side of a gateway node).

:class:`OwnCalls` starts a call in the protocol state, bounds how many are outstanding (callers
wait for a slot: backpressure, not errors), and completes each from the state's
:class:`~gateway.actions.Deliver` / :class:`~gateway.actions.DeliverPartial` /
:class:`~gateway.actions.DeliverNotification` actions. Streamed partial results and
notifications go through bounded queues (:func:`offer` drops, with a warning, what a slow reader
leaves behind).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .actions import Action, Deliver, DeliverNotification, DeliverPartial, Outcome
from .protocol import ErrorBody, Notification, Partial
from .state import GatewayState

__all__ = ["QUEUE_BOUND", "NotificationListener", "OwnCalls", "PendingCall", "offer"]

log = logging.getLogger(__name__)

#: ``listener(peer or None, notification)``; peer is None for notifications about own calls.
NotificationListener = Callable[[str | None, Notification], None]

#: Partial results or notifications buffered per call before the newest are dropped.
QUEUE_BOUND = 1024


@dataclass(eq=False)
class PendingCall:
    """A call this process is waiting on."""

    future: asyncio.Future[Outcome]
    partials: asyncio.Queue[Partial] | None = None
    notes: asyncio.Queue[Notification] | None = None


def offer(queue: asyncio.Queue[Any], item: Any, what: str) -> None:
    """Put ``item`` on ``queue`` unless it is full (then drop it, with a warning)."""
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        log.warning("%s dropped: its reader is %d behind", what, queue.qsize())


class OwnCalls:
    """The calls this process made that have not finished, and who hears their news.

    Args:
        state: The node's protocol state (where calls start and are cancelled).
        apply: Performs the actions the state returns (the node's I/O shell).
        max_pending: Calls that may be outstanding at once; more wait for a slot.
    """

    def __init__(
        self,
        state: GatewayState,
        apply: Callable[[list[Action]], Awaitable[None]],
        max_pending: int,
    ) -> None:
        self.state = state
        self.apply = apply
        #: notification listeners (see :meth:`gateway.node.Gateway.add_listener`)
        self.listeners: list[NotificationListener] = []
        #: bounds this process's outstanding calls (the caller waits: backpressure, not errors)
        self.slots = asyncio.Semaphore(max_pending)
        self._pending: dict[str, PendingCall] = {}

    def start(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any] | None,
        timeout: float | None,
        target: str | None,
        via: str | None,
        route_path: list[str] | None,
        *,
        streaming: bool = False,
    ) -> tuple[str, PendingCall, list[Action]]:
        """Start a call in the state; returns its id, what to wait on, and the actions to apply
        (see :meth:`gateway.state.GatewayState.call` for the arguments)."""
        loop = asyncio.get_running_loop()
        request_id, actions = self.state.call(
            kind,
            action,
            payload or {},
            loop.time(),
            timeout=timeout,
            target=target,
            via=via,
            route_path=route_path,
        )
        pending = PendingCall(loop.create_future())
        if streaming:
            pending.partials = asyncio.Queue(QUEUE_BOUND)
            pending.notes = asyncio.Queue(QUEUE_BOUND)
        self._pending[request_id] = pending
        return request_id, pending, actions

    async def wait(self, request_id: str, pending: PendingCall) -> Outcome:
        """The outcome of call ``request_id``; cancelling the wait cancels the call."""
        try:
            return await pending.future
        except asyncio.CancelledError:
            if self._pending.pop(request_id, None) is not None:
                await asyncio.shield(self.apply(self.state.cancel(request_id)))
            raise
        finally:
            self._pending.pop(request_id, None)

    async def notify_down(self, request_id: str, kind: str, result: Any) -> None:
        """Send a notification along call ``request_id`` to the handler running it."""
        await self.apply(self.state.notify_down(request_id, kind, result))

    def deliver(self, action: Deliver) -> None:
        pending = self._pending.get(action.request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(action.outcome)

    def deliver_partial(self, action: DeliverPartial) -> None:
        pending = self._pending.get(action.request_id)
        if pending is not None and pending.partials is not None:
            offer(pending.partials, action.partial, "partial result")

    def deliver_notification(self, action: DeliverNotification) -> None:
        if action.request_id is not None:
            pending = self._pending.get(action.request_id)
            if pending is not None and pending.notes is not None:
                offer(pending.notes, action.notification, "notification")
        for listener in self.listeners:
            try:
                listener(action.peer, action.notification)
            except Exception:
                log.exception("notification listener failed")

    def fail_all(self, environment_id: str) -> None:
        """Complete every call still waiting as unavailable (the node closed)."""
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(
                    Outcome(
                        False,
                        error=ErrorBody(code="unavailable", message="gateway closed"),
                        environment_id=environment_id,
                    )
                )
