"""Handlers for calls that run locally: registration, the context they get, and how their
exceptions become wire errors.

A handler is ``async def handler(ctx: HandlerContext, payload: dict) -> result``; the result must
be JSON-serializable. It may stream partial results (``await ctx.partial(x)``), send progress
back to the caller (``await ctx.notify("progress", x)``) and read notifications the caller sends
down (``await ctx.next_notification()``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from narrative.errors import InvalidInput, NarrativeError, NotFound

from .errors import GatewayError
from .protocol import ErrorBody, Notification, Request

__all__ = ["Handler", "HandlerContext", "HandlerRegistry", "InlineHandler", "error_body"]

log = logging.getLogger(__name__)


class HandlerContext:
    """What a handler knows about its call and how it talks back.

    Attributes:
        request: The request as it arrived here (``routePath`` shows where it came from).
        environment_id: The environment running the handler.
    """

    def __init__(
        self,
        request: Request,
        environment_id: str,
        send_partial: Callable[[Any], Awaitable[None]],
        send_notification: Callable[[str, Any], Awaitable[None]],
        inbox: Callable[[], asyncio.Queue[Notification]],
    ) -> None:
        self.request = request
        self.environment_id = environment_id
        self._send_partial = send_partial
        self._send_notification = send_notification
        self._inbox = inbox

    @property
    def kind(self) -> str:
        """The call's type (``originalType``)."""
        return self.request.originalType

    @property
    def action(self) -> str:
        """The call's action (``originalAction``)."""
        return self.request.originalAction

    @property
    def route_path(self) -> list[str]:
        """Environments the call went through before reaching this one, origin first."""
        return list(self.request.routePath)

    async def partial(self, result: Any) -> None:
        """Stream a partial result to the caller, ahead of the final one."""
        await self._send_partial(result)

    async def notify(self, kind: str, result: Any) -> None:
        """Send a progress or log notification back to the caller."""
        await self._send_notification(kind, result)

    async def next_notification(self, timeout: float | None = None) -> Notification:
        """The next notification the caller sent down to this call.

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds.
        """
        return await asyncio.wait_for(self._inbox().get(), timeout)


Handler = Callable[[HandlerContext, dict[str, Any]], Awaitable[Any]]
#: A cheap synchronous handler (``(ctx, payload) -> result``), run inline by the connection's
#: reader: no task per call (see :meth:`HandlerRegistry.register_inline`).
InlineHandler = Callable[[HandlerContext, dict[str, Any]], Any]
H = TypeVar("H", bound=Handler)


class HandlerRegistry:
    """``(type, action)`` -> handler; ``(type, "*")`` catches every action of a type."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        #: the synchronous form of handlers registered with :meth:`register_inline`
        self._inline: dict[tuple[str, str], InlineHandler] = {}

    def register(self, kind: str, action: str, handler: Handler, *, replace: bool = False) -> None:
        """Register ``handler`` for ``kind:action``.

        Raises:
            ValueError: one is registered already and ``replace`` is false.
        """
        if not replace and (kind, action) in self._handlers:
            raise ValueError(f"a handler for {kind}:{action} is already registered")
        self._handlers[kind, action] = handler
        self._inline.pop((kind, action), None)

    def register_inline(
        self, kind: str, action: str, handler: InlineHandler, *, replace: bool = False
    ) -> None:
        """Register a synchronous ``handler`` for ``kind:action``, run inline: for cheap work
        that never waits (it holds up its connection's other messages while it runs, and
        cannot stream). :meth:`lookup` still returns an ``async`` form of it.

        Raises:
            ValueError: one is registered already and ``replace`` is false.
        """

        async def run(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            return handler(ctx, payload)

        self.register(kind, action, run, replace=replace)
        self._inline[kind, action] = handler

    def handler(self, kind: str, action: str) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""

        def decorate(func: H) -> H:
            self.register(kind, action, func)
            return func

        return decorate

    def lookup(self, kind: str, action: str) -> Handler | None:
        """The handler for ``kind:action``, or for ``kind:*``, or None."""
        found = self._handlers.get((kind, action))
        return found if found is not None else self._handlers.get((kind, "*"))

    def resolve(self, kind: str, action: str) -> tuple[Handler | None, InlineHandler | None]:
        """Like :meth:`lookup`, also giving the synchronous form of an inline handler."""
        key = (kind, action) if (kind, action) in self._handlers else (kind, "*")
        return self._handlers.get(key), self._inline.get(key)

    def names(self) -> list[str]:
        """Registered ``type:action`` names, sorted."""
        return sorted(f"{k}:{a}" for k, a in self._handlers)


def error_body(exc: BaseException, environment_id: str) -> ErrorBody:
    """The wire form of an exception raised by a handler.

    Only our own errors keep their message; anything else is logged here with its traceback and
    crosses the wire as a generic ``handler_error``, so no internals leak to the caller.
    """
    if isinstance(exc, GatewayError):
        return ErrorBody(code=exc.code, message=str(exc)[:4096])
    if isinstance(exc, NotFound):
        return ErrorBody(code="not_found", message=str(exc)[:4096])
    if isinstance(exc, InvalidInput):
        return ErrorBody(code="bad_request", message=str(exc)[:4096])
    if isinstance(exc, NarrativeError):
        return ErrorBody(code="handler_error", message=str(exc)[:4096])
    if isinstance(exc, TimeoutError):
        return ErrorBody(code="timeout", message="the handler timed out")
    log.error("handler failed in %s", environment_id, exc_info=exc)
    return ErrorBody(code="handler_error", message=f"handler failed: {type(exc).__name__}")
