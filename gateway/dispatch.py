"""Reading one connection and dispatching what arrives on it.

:class:`Dispatcher` parses each frame (answering malformed ones with an error, closing a
connection that sends too many), holds calls from token-bearing connections to their token
(:class:`~gateway.access.ConnectionAccess`), hands requests, replies, partial results,
notifications and cancels to the protocol state (through the route tracker while observers
watch), answers ``gateway:refresh``, runs incoming provider messages as local calls and matches
provider responses to the messages this node sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from .access import ConnectionAccess
from .actions import Action
from .calls import OwnCalls
from .connections import send_message
from .errors import AuthError, GatewayError, ProtocolError
from .limits import Limits
from .observe import RouteTracker
from .protocol import (
    PROVIDER_TYPES,
    Cancel,
    ErrorBody,
    Heartbeat,
    Notification,
    Partial,
    ProviderAgentStart,
    ProviderDeleteFile,
    ProviderReadFile,
    ProviderStart,
    ProviderStop,
    ProviderWriteFile,
    Reply,
    Request,
    parse_message,
)
from .provider_calls import ProviderRequests, provider_call
from .state import GatewayState

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


class Dispatcher:
    """Serves the frames of a node's open connections.

    Args:
        state: The node's protocol state.
        limits: The node's bounds (malformed frames tolerated per connection).
        access: The token claims calls are held to.
        routes: Route observation (requests go through it while observers are registered).
        provider_requests: Provider messages this node sent, waiting for their responses.
        calls: This process's calls (incoming provider messages run as such).
        apply: Performs the actions the state returns (the node's I/O shell).
        spawn: Runs a coroutine as one of the node's tasks.
    """

    def __init__(
        self,
        state: GatewayState,
        limits: Limits,
        access: ConnectionAccess,
        routes: RouteTracker,
        provider_requests: ProviderRequests,
        calls: OwnCalls,
        apply: Callable[[list[Action]], Awaitable[None]],
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.state = state
        self.limits = limits
        self.access = access
        self.routes = routes
        self.provider_requests = provider_requests
        self.calls = calls
        self.apply = apply
        self.spawn = spawn

    async def read(self, ws: Connection, peer: str) -> None:
        """Dispatch the frames ``peer`` sends on ``ws`` until it closes."""
        bad = 0
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                try:
                    message = parse_message(frame)
                except ProtocolError as exc:
                    bad += 1
                    log.warning("bad frame from %s: %s", peer, exc)
                    await self.send_error(ws, exc)
                    if bad > self.limits.max_bad_frames:
                        await ws.close(1008, "too many malformed messages")
                        return
                    continue
                handler = _DISPATCH.get(type(message))
                if handler is None:
                    await self.send_error(
                        ws, ProtocolError(f"unexpected {message.type} on an open connection")
                    )
                    continue
                await handler(self, peer, ws, message)

    async def send_error(
        self, ws: Connection, exc: GatewayError, request_id: str | None = None
    ) -> None:
        """Answer on ``ws`` with a failed reply carrying ``exc``."""
        if request_id is None and isinstance(exc, ProtocolError):
            request_id = exc.request_id
        reply = Reply(
            requestId=self.state.new_id(),
            replyRequestId=request_id,
            success=False,
            error=ErrorBody(code=exc.code, message=str(exc)[:4096]),
            environmentId=self.state.environment_id,
        )
        await send_message(ws, reply)

    async def _on_request(self, peer: str, ws: Connection, message: Any) -> None:
        refused = self.access.refusal(
            ws,
            peer,
            message.originalType,
            message.originalAction,
            message.originalMessage,
            message.target,
        )
        if refused is not None:
            await self.send_error(ws, refused, message.requestId)
            return
        if (message.originalType, message.originalAction) == ("gateway", "refresh") and (
            self.access.claims_of(ws) is not None
        ):
            await self._refresh(ws, peer, message)
            return
        if self.routes.observers:
            await self.apply(self.routes.receive_request(peer, message))
            return
        now = asyncio.get_running_loop().time()
        await self.apply(self.state.receive_request(peer, message, now))

    async def _refresh(self, ws: Connection, peer: str, message: Request) -> None:
        """``gateway:refresh {token}`` (see :meth:`ConnectionAccess.refresh`)."""
        try:
            fresh = self.access.refresh(ws, peer, message.originalMessage.get("token"))
        except AuthError as exc:
            await self.send_error(ws, exc, message.requestId)
            return
        reply = Reply(
            requestId=self.state.new_id(),
            replyRequestId=message.requestId,
            success=True,
            result={"expiresAt": fresh.expires_at},
            environmentId=self.state.environment_id,
        )
        await send_message(ws, reply)

    async def _on_reply(self, peer: str, ws: Connection, message: Any) -> None:
        await self.apply(self.state.receive_reply(peer, message))

    async def _on_partial(self, peer: str, ws: Connection, message: Any) -> None:
        await self.apply(self.state.receive_partial(peer, message))

    async def _on_notification(self, peer: str, ws: Connection, message: Any) -> None:
        await self.apply(self.state.receive_notification(peer, message))

    async def _on_cancel(self, peer: str, ws: Connection, message: Any) -> None:
        if self.routes.tracked:
            self.routes.cancelled(peer, message.requestId)
        await self.apply(self.state.receive_cancel(peer, message))

    async def _on_provider(self, peer: str, ws: Connection, message: Any) -> None:
        # Provider messages are answered out of line, so a slow file read does not stall the
        # connection's other traffic.
        self.spawn(self._provider(peer, ws, message))

    async def _on_response(self, peer: str, ws: Connection, message: Any) -> None:
        self.provider_requests.receive(peer, message)

    async def _provider(self, peer: str, ws: Connection, message: Any) -> None:
        response = PROVIDER_TYPES[message.type]
        if isinstance(message, Heartbeat):
            env = self.state.environment_id
            result: Any = {"environmentId": env, "timestamp": message.timestamp}
            await send_message(
                ws, response(requestId=message.requestId, success=True, result=result)
            )
            return
        kind, action, payload = provider_call(message)
        refused = self.access.refusal(ws, peer, kind, action, payload, None)
        if refused is not None:
            body = ErrorBody(code=refused.code, message=str(refused)[:4096])
            await send_message(ws, response(requestId=message.requestId, success=False, error=body))
            return
        calls = self.calls
        async with calls.slots:
            request_id, pending, actions = calls.start(
                kind, action, payload, None, None, None, [peer]
            )
            await self.apply(actions)
            outcome = await calls.wait(request_id, pending)
        await send_message(
            ws,
            response(
                requestId=message.requestId,
                success=outcome.success,
                result=outcome.result,
                error=outcome.error,
            ),
        )


_DISPATCH: dict[type, Callable[[Dispatcher, str, Connection, Any], Awaitable[None]]] = {
    Request: Dispatcher._on_request,
    Reply: Dispatcher._on_reply,
    Partial: Dispatcher._on_partial,
    Notification: Dispatcher._on_notification,
    Cancel: Dispatcher._on_cancel,
    **{
        cls: Dispatcher._on_provider
        for cls in (
            ProviderStart,
            ProviderAgentStart,
            ProviderStop,
            ProviderReadFile,
            ProviderWriteFile,
            ProviderDeleteFile,
            Heartbeat,
        )
    },
    **{cls: Dispatcher._on_response for cls in PROVIDER_TYPES.values()},
}
