"""The open WebSocket connections of one gateway node, by peer environment, and sending on them.

A peer may be connected more than once (it dialled us and we dialled it, or a reconnect overlaps
the old connection); messages for a peer go on its newest connection.
"""

from __future__ import annotations

import logging
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from .protocol import dump

__all__ = ["Connections", "send_message"]

log = logging.getLogger(__name__)


async def send_message(ws: Connection, message: Any) -> None:
    """Send ``message`` on ``ws``; a closed connection drops it (the reader learns of the close,
    and resends happen on reconnect)."""
    try:  # noqa: SIM105 - per message: contextlib.suppress costs more than the send's framing
        await ws.send(dump(message))
    except ConnectionClosed:
        pass  # the state learns of it from the reader; resends happen on reconnect


class Connections:
    """Open connections by peer environment id."""

    def __init__(self) -> None:
        self._by_peer: dict[str, list[Connection]] = {}

    def __contains__(self, peer: object) -> bool:
        return peer in self._by_peer

    def peers(self) -> list[str]:
        """The peers with at least one open connection."""
        return list(self._by_peer)

    def of(self, peer: str) -> tuple[Connection, ...]:
        """``peer``'s open connections, oldest first (empty when it is not connected)."""
        return tuple(self._by_peer.get(peer, ()))

    def latest(self, peer: str) -> Connection | None:
        """``peer``'s newest open connection, or None."""
        conns = self._by_peer.get(peer)
        return conns[-1] if conns else None

    def all(self) -> list[Connection]:
        """Every open connection."""
        return [ws for conns in self._by_peer.values() for ws in conns]

    def add(self, peer: str, ws: Connection) -> bool:
        """Record ``ws`` as open to ``peer``; True when it is the peer's only connection."""
        conns = self._by_peer.setdefault(peer, [])
        conns.append(ws)
        return len(conns) == 1

    def remove(self, peer: str, ws: Connection) -> bool:
        """Forget the closed ``ws``; True when it was the peer's last connection."""
        conns = self._by_peer[peer]
        conns.remove(ws)
        if conns:
            return False
        del self._by_peer[peer]
        return True

    async def send(self, peer: str, message: Any) -> None:
        """Send ``message`` on ``peer``'s newest connection (dropped if it has none)."""
        conns = self._by_peer.get(peer)
        if not conns:
            log.debug("%s not connected; %s held or dropped", peer, message.type)
            return
        await send_message(conns[-1], message)
