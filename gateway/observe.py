"""What a gateway node tells observers: the route each proxied call took, and peers coming
and going (see :meth:`Gateway.add_route_observer <gateway.node.Gateway.add_route_observer>` and
:meth:`Gateway.add_peer_listener <gateway.node.Gateway.add_peer_listener>`).

Records are computed by the I/O shell from the actions the sans-I/O state returns, and only
while an observer is registered, so an unobserved gateway pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PeerListener", "RouteObserver", "RouteRecord"]


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
