"""What a gateway node tells observers: the route each proxied call took, and peers coming
and going (see :meth:`Gateway.add_route_observer <gateway.node.Gateway.add_route_observer>` and
:meth:`Gateway.add_peer_listener <gateway.node.Gateway.add_peer_listener>`).

Records are computed by the I/O shell from the actions the sans-I/O state returns
(:class:`RouteTracker`), and only while an observer is registered, so an unobserved gateway pays
nothing for them. :class:`PeerEvents` tells listeners about peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .actions import Action, RunLocal, Send
from .protocol import Reply, Request
from .state import GatewayState

__all__ = ["PeerEvents", "PeerListener", "RouteObserver", "RouteRecord", "RouteTracker"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """One request received from a peer, as this node handled it (emitted when its reply is
    sent back).

    Attributes:
        kind: The call's capability family (``originalType``).
        action: The call's action (``originalAction``).
        route_path: The request's ``routePath`` as it arrived here: origin first, the sending
            neighbour last.
        origin: The environment the call started in (``route_path[0]``; the sender when the
            path was empty, which this node refuses).
        from_peer: The neighbour the request came from.
        next_hop: Where this node sent it: the neighbour it was forwarded to (the first one for
            a fan-out), this environment's id when it ran here, or None when it was refused
            here (loop, no route, busy, bad request).
        next_hops: Every neighbour it was forwarded to (several for a fan-out); ``[own id]``
            when it ran here, ``[]`` when refused.
        ran_in: The ``environmentId`` of the final reply (where the outcome was produced; this
            environment for a refusal, a timeout here, or a gathered fan-out).
        success: Whether the reply was a success.
        error_code: The reply's wire error code, or None on success.
        duration_ms: Milliseconds from receiving the request to sending its reply.
        request_id: The request's id on the hop it arrived by.
    """

    kind: str
    action: str
    route_path: list[str]
    origin: str
    from_peer: str
    next_hop: str | None
    next_hops: list[str]
    ran_in: str | None
    success: bool
    error_code: str | None
    duration_ms: float
    request_id: str


#: ``observer(record)``: called once per request received from a peer, when it is answered.
RouteObserver = Callable[[RouteRecord], None]

#: ``listener(peer, up)``: ``up`` True on the peer's first connection, False when its last one
#: closes.
PeerListener = Callable[[str, bool], None]


@dataclass(eq=False, slots=True)
class _Track:
    """A request from a peer being watched for route observers, until its reply is sent."""

    request: Request
    start: float
    hops: list[str]


class RouteTracker:
    """Watches the requests peers send while route observers are registered, and hands each
    observer one :class:`RouteRecord` per request when it is answered.

    Args:
        state: The node's protocol state (requests are handed to it here, to see where they go).
    """

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        #: registered observers; the node only tracks requests while this is not empty
        self.observers: list[RouteObserver] = []
        #: requests from peers awaiting their reply, only while route observers are registered
        self.tracked: dict[tuple[str, str], _Track] = {}

    def add(self, observer: RouteObserver) -> None:
        self.observers.append(observer)

    def remove(self, observer: RouteObserver) -> None:
        """Stop calling ``observer`` (no error if it is not registered)."""
        with contextlib.suppress(ValueError):
            self.observers.remove(observer)

    def receive_request(self, peer: str, request: Request) -> list[Action]:
        """Hand ``request`` to the state and note where it went.

        The state's actions for a new request say it all: a RunLocal (runs here), Sends of
        fresh Requests (forwarded to those peers) or a Send of the Reply (refused here).
        """
        now = asyncio.get_running_loop().time()
        rid = request.requestId
        resend = self.state.seen(peer, rid)
        actions = self.state.receive_request(peer, request, now)
        if resend:  # answered (or being answered) once: recorded once
            return actions
        hops: list[str] = []
        for action in actions:
            if isinstance(action, RunLocal):
                hops = [self.state.environment_id]
                break
            if isinstance(action, Send):
                if type(action.message) is Reply:
                    hops = []
                    break
                if type(action.message) is Request:
                    hops.append(action.peer)
        else:
            # legs for a peer that is away are held, not sent: the state still knows them
            targets = self.state.forwarded_to(peer, rid)
            if len(hops) < len(targets):
                hops = list(targets)
        self.tracked[(peer, rid)] = _Track(request, now, hops)
        return actions

    def replied(self, peer: str, reply: Reply) -> None:
        """``reply`` is being sent to ``peer``: record the request it answers, if tracked."""
        rid = reply.replyRequestId
        track = self.tracked.pop((peer, rid), None) if rid is not None else None
        if track is not None:
            code = reply.error.code if reply.error is not None else None
            self._observe(peer, track, reply.success, code, reply.environmentId)

    def cancelled(self, peer: str, request_id: str) -> None:
        """``peer`` cancelled its request: no reply will be sent, the record is made now."""
        track = self.tracked.pop((peer, request_id), None)
        if track is not None:
            self._observe(peer, track, False, "cancelled", self.state.environment_id)

    def _observe(
        self, peer: str, track: _Track, success: bool, code: str | None, ran_in: str | None
    ) -> None:
        request = track.request
        path = list(request.routePath)
        record = RouteRecord(
            kind=request.originalType,
            action=request.originalAction,
            route_path=path,
            origin=path[0] if path else peer,
            from_peer=peer,
            next_hop=track.hops[0] if track.hops else None,
            next_hops=list(track.hops),
            ran_in=ran_in,
            success=success,
            error_code=code,
            duration_ms=(asyncio.get_running_loop().time() - track.start) * 1000,
            request_id=request.requestId,
        )
        for observer in list(self.observers):
            try:
                observer(record)
            except Exception:
                log.exception("route observer failed")


class PeerEvents:
    """The node's peer listeners, told when a peer's first connection is up and when its last
    one closes."""

    def __init__(self) -> None:
        self._listeners: list[PeerListener] = []

    def add(self, listener: PeerListener) -> None:
        self._listeners.append(listener)

    def remove(self, listener: PeerListener) -> None:
        """Stop calling ``listener`` (no error if it is not registered)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def report(self, peer: str, up: bool) -> None:
        """Tell every listener (exceptions are logged and otherwise ignored)."""
        for listener in list(self._listeners):
            try:
                listener(peer, up)
            except Exception:
                log.exception("peer listener failed for %s (%s)", peer, "up" if up else "down")
