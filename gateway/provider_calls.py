"""Provider-facing messages between neighbours (``providerStart``, ``providerReadFile``, ...,
``heartbeat``; see :mod:`gateway.protocol`).

Asking: :class:`ProviderRequests` sends a provider message to a neighbour and matches the
``<type>Response`` that comes back by ``(peer, requestId)``. Answering: :func:`provider_call`
names the capability call an incoming provider message stands for (the node runs it like any
other call and answers with the response type).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.connection import Connection

from .connections import send_message
from .errors import GatewayTimeout, ProtocolError, Unavailable, error_from_wire
from .protocol import (
    PROVIDER_TYPES,
    ErrorBody,
    ProviderAgentStart,
    ProviderDeleteFile,
    ProviderMessage,
    ProviderReadFile,
    ProviderResponse,
    ProviderStart,
    ProviderStop,
    ProviderWriteFile,
)

__all__ = ["ProviderRequests", "provider_call"]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Asked:
    """A provider message sent to a neighbour, waiting for its ``<type>Response``."""

    ws: Connection
    future: asyncio.Future[Any]
    response: type[Any]


class ProviderRequests:
    """Provider messages this node sent to neighbours, waiting for their responses.

    Args:
        environment_id: The node's environment id (where errors are reported from).
    """

    def __init__(self, environment_id: str) -> None:
        self.environment_id = environment_id
        #: (peer, requestId) -> provider message awaiting its response
        self._asked: dict[tuple[str, str], _Asked] = {}

    @property
    def waiting(self) -> Set[tuple[str, str]]:
        """``(peer, requestId)`` of every message still waiting for its response."""
        return self._asked.keys()

    async def ask(
        self, peer: str, ws: Connection, message: ProviderMessage, budget: float
    ) -> ProviderResponse:
        """Send ``message`` to ``peer`` on ``ws`` and wait up to ``budget`` seconds for its
        response (see :meth:`gateway.node.Gateway.provider_request`)."""
        key = (peer, message.requestId)
        if key in self._asked:
            raise ProtocolError(
                f"{message.type} {message.requestId}: that request id is already waiting for "
                f"an answer from {peer}",
                request_id=message.requestId,
            )
        # Registered before the send, with no await in between: if the connection closes
        # from here on, the node's connection cleanup fails this future as unavailable.
        asked = _Asked(ws, asyncio.get_running_loop().create_future(), PROVIDER_TYPES[message.type])
        self._asked[key] = asked
        try:
            await send_message(asked.ws, message)
            async with asyncio.timeout(budget):
                response: ProviderResponse = await asked.future
        except TimeoutError:
            raise GatewayTimeout(
                f"{peer} did not answer {message.type} {message.requestId} within {budget:g}s",
                environment_id=self.environment_id,
            ) from None
        finally:
            if self._asked.get(key) is asked:
                del self._asked[key]
        if not response.success:
            error = response.error or ErrorBody(code="internal", message="failed without an error")
            raise error_from_wire(error.code, error.message, peer)
        return response

    def receive(self, peer: str, message: Any) -> None:
        """A ``<type>Response`` from ``peer``: complete the message it answers."""
        asked = self._asked.get((peer, message.requestId))
        if asked is None or asked.future.done():
            log.debug(
                "%s %s from %s ignored: nothing waits for it", message.type, message.requestId, peer
            )
            return
        if type(message) is asked.response:
            asked.future.set_result(message)
        else:
            asked.future.set_exception(
                ProtocolError(
                    f"{peer} answered {message.requestId} with {message.type}, "
                    f"expected {asked.response.__name__}",
                    request_id=message.requestId,
                )
            )

    def fail(self, ws: Connection | None, why: str) -> None:
        """Fail the messages waiting on ``ws`` (None: all of them) as unavailable."""
        for asked in list(self._asked.values()):
            if (ws is None or asked.ws is ws) and not asked.future.done():
                asked.future.set_exception(Unavailable(why, environment_id=self.environment_id))


def provider_call(message: Any) -> tuple[str, str, dict[str, Any]]:
    """The capability call a provider-facing message stands for."""
    if isinstance(message, ProviderReadFile):
        return "fs", "readFile", {"path": message.path, "encoding": message.encoding}
    if isinstance(message, ProviderWriteFile):
        payload = {"path": message.path, "content": message.content, "encoding": message.encoding}
        return "fs", "writeFile", payload
    if isinstance(message, ProviderDeleteFile):
        return "fs", "deleteFile", {"path": message.path}
    if isinstance(message, ProviderAgentStart):
        return "provider", "agentStart", {"agent": message.agent, "options": message.options}
    if isinstance(message, ProviderStart):
        return "provider", "start", {"options": message.options}
    if isinstance(message, ProviderStop):
        return "provider", "stop", {}
    raise ProtocolError(f"not a provider message: {message.type}")
