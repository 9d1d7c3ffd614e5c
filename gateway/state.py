"""The gateway's protocol state, free of I/O (the shape of ``websockets.protocol``).

:class:`GatewayState` takes events — a message from a peer, a call from this process, a handler
finishing, a peer coming or going, the clock moving — and returns the actions the I/O shell must
perform (send this message to that peer, run this handler, deliver this result). It owns every
decision: routing, loop and hop checks, matching replies to requests by id, streaming partial
results and notifications back along the path (and notifications down it), fan-out and gather,
idempotent resends, execution deadlines and the grace period for a lost hop. Time is passed in
(``now``), so timeouts are tested without sleeping.

Keys: a call is known by ``(peer, requestId)`` (see :mod:`gateway.actions`, which also holds the
actions and the :class:`~gateway.actions.Outcome` of a call). Requests sent onwards ("legs")
get fresh ids, so the same call reaching a node twice through a mesh is never confused with a
resend.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from narrative.errors import validation_problem

from .actions import (
    Action,
    CancelLocal,
    Deliver,
    DeliverNotification,
    DeliverPartial,
    Key,
    NotifyLocal,
    Outcome,
    RunLocal,
    Send,
)
from .errors import (
    Busy,
    Cancelled,
    GatewayError,
    GatewayTimeout,
    ProtocolError,
    RoutingError,
    Unavailable,
)
from .limits import Limits
from .protocol import Cancel, Notification, Partial, Reply, Request, check_sender, trusted
from .router import Decision, Router

__all__ = ["GatewayState"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- bookkeeping


@dataclass(slots=True, eq=False)
class _Call:
    key: Key
    request: Request
    deadline: float
    local: bool
    gather: bool = False
    targets: tuple[str, ...] = ()
    #: leg id -> target, for legs still outstanding
    legs: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seq: itertools.count[int] = field(default_factory=itertools.count)


@dataclass(slots=True, eq=False)
class _Leg:
    call: _Call
    target: str
    message: Request
    lost_since: float | None = None


@dataclass(slots=True)
class _Peer:
    capabilities: frozenset[str]
    connected: bool = True
    lost_at: float | None = None


class GatewayState:
    """Protocol state of one gateway node.

    Args:
        environment_id: This node's environment id.
        runtime_id: This node's runtime (process) id.
        router: Routing rules (default: everything local).
        limits: Timeouts and bounds.
    """

    def __init__(
        self,
        environment_id: str,
        runtime_id: str,
        router: Router | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.environment_id = environment_id
        self.runtime_id = runtime_id
        self.router = router or Router()
        #: peer -> the rules for calls arriving from that peer, in place of :attr:`router`
        self.peer_routers: dict[str, Router] = {}
        self.limits = limits or Limits()
        #: False until a plugin claims the gateway: routing is lazy, no claim, no proxying.
        self.proxying = False
        self._calls: dict[Key, _Call] = {}
        self._legs: dict[str, _Leg] = {}
        self._peers: dict[str, _Peer] = {}
        #: peer -> capabilities, kept beside ``_peers`` so routing needs no copy per call
        self._reach: dict[str, frozenset[str]] = {}
        self._done: OrderedDict[Key, Reply] = OrderedDict()
        self._timers: list[tuple[float, int, str, Any]] = []
        self._tick = itertools.count()
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count()

    # ------------------------------------------------------------------ queries

    def new_id(self) -> str:
        """A request id unique to this node instance (random prefix, then a counter)."""
        return f"{self._prefix}-{next(self._ids)}"

    def peers(self) -> dict[str, frozenset[str]]:
        """Reachable peers (connected, or lost but within their grace period) and capabilities."""
        return dict(self._reach)

    def connected(self, peer: str) -> bool:
        info = self._peers.get(peer)
        return info is not None and info.connected

    def seen(self, peer: str, request_id: str) -> bool:
        """Whether request ``request_id`` from ``peer`` is running here or was answered (so a
        request with that id is a resend, answered once)."""
        key = (peer, request_id)
        return key in self._calls or key in self._done

    def forwarded_to(self, peer: str, request_id: str) -> tuple[str, ...]:
        """The neighbours the running call ``request_id`` from ``peer`` was proxied to (``()``
        when it runs here or is unknown), including legs held for a peer that is away."""
        call = self._calls.get((peer, request_id))
        if call is None or call.local:
            return ()
        return call.targets

    @property
    def inflight(self) -> int:
        """Calls currently running here or proxied from here."""
        return len(self._calls)

    @property
    def remembered_replies(self) -> int:
        """Replies kept to answer resent requests (at most ``limits.done_cache``)."""
        return len(self._done)

    @property
    def armed_timers(self) -> int:
        """Deadlines on the timer heap, stale ones included (kept proportional to live calls)."""
        return len(self._timers)

    def earliest_deadline(self) -> float | None:
        """The earliest armed deadline, possibly stale (a cheap lower bound for timers)."""
        return self._timers[0][0] if self._timers else None

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do, or None."""
        while self._timers:
            when, _, kind, ref = self._timers[0]
            if self._timer_live(when, kind, ref):
                return when
            heapq.heappop(self._timers)
        return None

    # ------------------------------------------------------------------ events: calls

    def call(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any],
        now: float,
        *,
        timeout: float | None = None,
        target: str | None = None,
        via: str | None = None,
        route_path: list[str] | None = None,
    ) -> tuple[str, list[Action]]:
        """A call made in this process; its outcome comes back as a :class:`Deliver` action.

        Args:
            kind: Capability family (``originalType``).
            action: Action within it (``originalAction``).
            payload: The handler's input.
            now: The current time.
            timeout: Execution budget in seconds (default ``limits.execution_timeout``).
            target: Final destination environment, if the caller names one.
            via: Send to this peer first, whatever the rules say (what a client does).
            route_path: Hops the call already went through (a provider message relayed here).

        Returns:
            The call's request id and the actions to perform.

        Raises:
            ProtocolError: an argument cannot go on the wire (malformed name, budget, target).
        """
        budget = self.limits.execution_timeout if timeout is None else timeout
        path = route_path or []
        try:
            request = Request(
                requestId=self.new_id(),
                originalType=kind,
                originalAction=action,
                originalMessage=payload,
                routePath=path,
                originRuntimeId=self.runtime_id,
                originEnvironmentId=path[0] if path else self.environment_id,
                timeoutMs=max(1, int(budget * 1000)),
                target=target,
            )
        except ValidationError as exc:  # the caller's own arguments: say which one is wrong
            problem = validation_problem(exc)
            raise ProtocolError(f"invalid call {kind}:{action}: {problem}") from None
        return request.requestId, self.receive_request("", request, now, via=via)

    def receive_request(
        self, peer: str, request: Request, now: float, *, via: str | None = None
    ) -> list[Action]:
        """A request from ``peer`` (``""``: this process; ``via`` only for those)."""
        key = (peer, request.requestId)
        if key in self._calls:
            return []  # a resend of a call still running: answered once, when it finishes
        if peer:
            done = self._done.get(key)
            if done is not None:
                return [Send(peer, done)]
        budget = request.timeoutMs / 1000 if request.timeoutMs else self.limits.execution_timeout
        router = self.peer_routers.get(peer, self.router) if peer else self.router
        try:
            if peer:
                check_sender(peer, request)
            if peer and len(self._calls) >= self.limits.max_inflight:
                raise Busy(f"{self.environment_id} has {len(self._calls)} calls in flight")
            if via is not None:
                router.check_path(request.routePath, self.environment_id)
                if via not in self._reach:
                    raise RoutingError(f"{via!r} is not connected to {self.environment_id!r}")
                decision = Decision((via,))
            else:
                decision = router.decide(
                    request.originalType,
                    request.originalAction,
                    request.routePath,
                    self.environment_id,
                    self._reach,
                    proxying=self.proxying,
                    target=request.target,
                )
        except GatewayError as exc:
            return self._answer(key, request, Outcome.failure(exc, self.environment_id))
        call = _Call(key, request, now + budget, decision.local, decision.gather, decision.targets)
        self._calls[key] = call
        self._arm(call.deadline, "call", key)
        if call.local:
            return [RunLocal(key, request)]
        actions: list[Action] = []
        path = [*request.routePath, self.environment_id]
        remaining = max(1, int((call.deadline - now) * 1000))
        for target in decision.targets:
            leg = trusted(
                Request,
                requestId=self.new_id(),
                originalType=request.originalType,
                originalAction=request.originalAction,
                originalMessage=request.originalMessage,
                routePath=path,
                originRuntimeId=request.originRuntimeId or self.runtime_id,
                originEnvironmentId=request.originEnvironmentId or self.environment_id,
                parentRuntimeId=self.runtime_id,
                parentEnvironmentId=self.environment_id,
                timeoutMs=remaining,
                target=request.target,
            )
            call.legs[leg.requestId] = target
            state = _Leg(call, target, leg)
            self._legs[leg.requestId] = state
            info = self._peers[target]
            if info.connected:
                actions.append(Send(target, leg))
            else:  # held until the peer is back (resent by peer_up) or its grace runs out
                state.lost_since = lost = info.lost_at or now
                self._arm(lost + self.limits.transport_timeout, "leg", leg.requestId)
        return actions

    def cancel(self, request_id: str) -> list[Action]:
        """This process gives up on its call ``request_id``."""
        return self.receive_cancel("", Cancel(requestId=request_id))

    def receive_cancel(self, peer: str, cancel: Cancel) -> list[Action]:
        """``peer`` gives up on its request: stop the work, answer nothing more."""
        key = (peer, cancel.requestId)
        call = self._calls.pop(key, None)
        if call is None:
            return []
        actions = self._drop_legs(call)
        if call.local:
            actions.append(CancelLocal(key))
        if peer:
            outcome = Outcome.failure(Cancelled("cancelled by the caller"), self.environment_id)
            self._remember(key, self._reply(call.request, outcome))
        return actions

    def receive_reply(self, peer: str, reply: Reply) -> list[Action]:
        """A final reply from ``peer``; matched to the leg it answers by id alone."""
        leg_id = reply.replyRequestId
        leg = self._legs.get(leg_id) if leg_id is not None else None
        if leg is None or leg.target != peer:
            if reply.error is not None:
                log.warning("%s reported: %s: %s", peer, reply.error.code, reply.error.message)
            else:
                log.debug("reply from %s to unknown request %s ignored", peer, leg_id)
            return []
        del self._legs[leg_id]  # type: ignore[arg-type]
        outcome = Outcome(reply.success, reply.result, reply.error, reply.environmentId or peer)
        return self._leg_done(leg, outcome)

    def receive_partial(self, peer: str, partial: Partial) -> list[Action]:
        """A streamed partial result from ``peer``: pass it back towards the caller."""
        leg = self._legs.get(partial.replyRequestId)
        if leg is None or leg.target != peer:
            return []
        return self._partial_up(leg.call, partial.result, partial.environmentId or peer)

    def receive_notification(self, peer: str, note: Notification) -> list[Action]:
        """A notification from ``peer``: up or down a call's path, or for this process."""
        rid = note.requestId
        if rid is None:
            return [DeliverNotification(None, peer, note)]
        leg = self._legs.get(rid)
        if leg is not None and leg.target == peer:
            return self._notify_up(leg.call, note, note.environmentId or peer)
        call = self._calls.get((peer, rid))
        if call is not None:
            return self._notify_down(call, note)
        log.debug("notification from %s about unknown request %s dropped", peer, rid)
        return []

    def notify_down(self, request_id: str, kind: str, result: Any) -> list[Action]:
        """This process sends a notification along its call ``request_id`` to where it runs."""
        call = self._calls.get(("", request_id))
        if call is None:
            return []
        note = Notification(originalType=kind, result=result, environmentId=self.environment_id)
        return self._notify_down(call, note)

    # ------------------------------------------------------------------ events: local handlers

    def local_done(self, key: Key, outcome: Outcome) -> list[Action]:
        """The handler started by :class:`RunLocal` for ``key`` finished."""
        call = self._calls.get(key)
        if call is None or not call.local:
            return []  # cancelled or timed out meanwhile: the answer was already given
        return self._finish(call, outcome)

    def local_partial(self, key: Key, result: Any) -> list[Action]:
        """The handler for ``key`` streams a partial result."""
        call = self._calls.get(key)
        if call is None:
            return []
        return self._partial_up(call, result, self.environment_id)

    def local_notify(self, key: Key, kind: str, result: Any) -> list[Action]:
        """The handler for ``key`` sends a notification back to its caller."""
        call = self._calls.get(key)
        if call is None:
            return []
        note = Notification(originalType=kind, result=result, environmentId=self.environment_id)
        return self._notify_up(call, note, self.environment_id)

    # ------------------------------------------------------------------ events: peers and time

    def peer_up(self, peer: str, capabilities: Iterable[str]) -> list[Action]:
        """``peer`` connected (or reconnected): resend every request it has not answered."""
        self._peers[peer] = _Peer(frozenset(capabilities))
        self._reach[peer] = self._peers[peer].capabilities
        actions: list[Action] = []
        for leg in self._legs.values():
            if leg.target == peer:
                leg.lost_since = None
                actions.append(Send(peer, leg.message))
        return actions

    def peer_down(self, peer: str, now: float) -> list[Action]:
        """``peer``'s last connection closed; its calls wait ``transport_timeout`` for it."""
        info = self._peers.get(peer)
        if info is None or not info.connected:
            return []
        info.connected = False
        info.lost_at = now
        until = now + self.limits.transport_timeout
        self._arm(until, "peer", peer)
        for leg_id, leg in self._legs.items():
            if leg.target == peer:
                leg.lost_since = now
                self._arm(until, "leg", leg_id)
        return []

    def tick(self, now: float) -> list[Action]:
        """Fire every deadline that has passed: timed-out calls, lost hops, forgotten peers."""
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, kind, ref = heapq.heappop(self._timers)
            if not self._timer_live(when, kind, ref):
                continue
            if kind == "call":
                call = self._calls[ref]
                budget = (call.request.timeoutMs or 0) / 1000
                exc = GatewayTimeout(
                    f"{call.request.originalType}:{call.request.originalAction} got no reply "
                    f"within {budget:g}s"
                )
                if call.local:
                    actions.append(CancelLocal(call.key))
                actions += self._finish(call, Outcome.failure(exc, self.environment_id))
            elif kind == "leg":
                leg = self._legs.pop(ref)
                exc2 = Unavailable(
                    f"{leg.target} disconnected and did not come back within "
                    f"{self.limits.transport_timeout:g}s"
                )
                actions += self._leg_done(leg, Outcome.failure(exc2, self.environment_id))
            else:
                del self._peers[ref]
                del self._reach[ref]
        return actions

    # ------------------------------------------------------------------ internals

    def _timer_live(self, when: float, kind: str, ref: Any) -> bool:
        if kind == "call":
            call = self._calls.get(ref)
            return call is not None and call.deadline == when
        if kind == "leg":
            leg = self._legs.get(ref)
            return (
                leg is not None
                and leg.lost_since is not None
                and leg.lost_since + self.limits.transport_timeout <= when
            )
        info = self._peers.get(ref)
        return (
            info is not None
            and not info.connected
            and info.lost_at is not None
            and info.lost_at + self.limits.transport_timeout <= when
        )

    def _arm(self, when: float, kind: str, ref: Any) -> None:
        timers = self._timers
        heapq.heappush(timers, (when, next(self._tick), kind, ref))
        # Finished calls leave their deadline behind; compact now and then so the heap stays
        # proportional to the live calls rather than to the request rate times the timeout.
        if len(timers) > 1024 and len(timers) > 4 * (
            len(self._calls) + len(self._legs) + len(self._peers)
        ):
            self._timers = [t for t in self._timers if self._timer_live(t[0], t[2], t[3])]
            heapq.heapify(self._timers)

    def _leg_done(self, leg: _Leg, outcome: Outcome) -> list[Action]:
        call = leg.call
        call.legs.pop(leg.message.requestId, None)
        if self._calls.get(call.key) is not call:
            return []
        if not call.gather:
            return self._finish(call, outcome)
        call.outcomes[leg.target] = outcome
        if len(call.outcomes) < len(call.targets):
            return []
        gathered = [call.outcomes[t].as_dict() for t in call.targets]
        return self._finish(call, Outcome(True, gathered, None, self.environment_id))

    def _finish(self, call: _Call, outcome: Outcome) -> list[Action]:
        del self._calls[call.key]
        actions = self._drop_legs(call)
        return actions + self._answer(call.key, call.request, outcome)

    def _drop_legs(self, call: _Call) -> list[Action]:
        actions: list[Action] = []
        for leg_id, target in call.legs.items():
            self._legs.pop(leg_id, None)
            if self.connected(target):
                actions.append(Send(target, Cancel(requestId=leg_id)))
        call.legs.clear()
        return actions

    def _answer(self, key: Key, request: Request, outcome: Outcome) -> list[Action]:
        peer = key[0]
        if not peer:
            return [Deliver(request.requestId, outcome)]
        reply = self._reply(request, outcome)
        self._remember(key, reply)
        return [Send(peer, reply)]

    def _reply(self, request: Request, outcome: Outcome) -> Reply:
        return trusted(
            Reply,
            requestId=self.new_id(),
            replyRequestId=request.requestId,
            success=outcome.success,
            result=outcome.result,
            error=outcome.error,
            environmentId=outcome.environment_id,
        )

    def _remember(self, key: Key, reply: Reply) -> None:
        self._done[key] = reply
        if len(self._done) > self.limits.done_cache:
            self._done.popitem(last=False)

    def _partial_up(self, call: _Call, result: Any, source: str) -> list[Action]:
        partial = trusted(
            Partial,
            replyRequestId=call.request.requestId,
            seq=next(call.seq),
            result=result,
            environmentId=source,
        )
        peer = call.key[0]
        if not peer:
            return [DeliverPartial(call.request.requestId, partial)]
        return [Send(peer, partial)]

    def _notify_up(self, call: _Call, note: Notification, source: str) -> list[Action]:
        peer = call.key[0]
        up = note.model_copy(update={"requestId": call.request.requestId, "environmentId": source})
        if not peer:
            return [DeliverNotification(call.request.requestId, None, up)]
        return [Send(peer, up)]

    def _notify_down(self, call: _Call, note: Notification) -> list[Action]:
        if call.local:
            return [NotifyLocal(call.key, note)]
        return [
            Send(target, note.model_copy(update={"requestId": leg_id}))
            for leg_id, target in call.legs.items()
            if self.connected(target)
        ]
