"""Local handlers at work: each call the state runs here (:class:`~gateway.actions.RunLocal`)
becomes a task running its handler, with the notifications its caller sends down queued for it,
until it finishes (reported back to the state) or is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

from .actions import Action, Key, Outcome
from .calls import QUEUE_BOUND, offer
from .handlers import Handler, HandlerContext, HandlerRegistry, error_body
from .protocol import ErrorBody, Notification, Request
from .state import GatewayState

__all__ = ["LocalHandlers"]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Running:
    """A local handler at work, and the notifications its caller sent down to it."""

    task: asyncio.Task[None] | None = None
    #: made on first use: most calls never see a notification from their caller
    _inbox: asyncio.Queue[Notification] | None = None

    def inbox(self) -> asyncio.Queue[Notification]:
        if self._inbox is None:
            self._inbox = asyncio.Queue(QUEUE_BOUND)
        return self._inbox


class LocalHandlers:
    """The handlers running in this node, by the key of the call each serves.

    Args:
        state: The node's protocol state (told of partial results, notifications, the end).
        handlers: Where handlers are looked up.
        apply: Performs the actions the state returns (the node's I/O shell).
        spawn: Runs a coroutine as one of the node's tasks.
    """

    def __init__(
        self,
        state: GatewayState,
        handlers: HandlerRegistry,
        apply: Callable[[list[Action]], Awaitable[None]],
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.state = state
        self.handlers = handlers
        self.apply = apply
        self.spawn = spawn
        self._running: dict[Key, _Running] = {}

    def run(self, key: Key, request: Request) -> list[Action]:
        """Start the handler for ``request`` (a ``no_handler`` failure if there is none).

        Returns:
            The actions of its end when it is an inline handler (it ran to completion here,
            in the caller's task: no task per call), else none (a task reports its end).
        """
        handler, inline = self.handlers.resolve(request.originalType, request.originalAction)
        if inline is not None:
            env = self.state.environment_id
            ctx = HandlerContext(request, env, _no_stream, _no_notify, _no_inbox)
            try:
                outcome = _checked(request, inline(ctx, request.originalMessage), env)
            except Exception as exc:
                outcome = Outcome(False, error=error_body(exc, env), environment_id=env)
            return self.state.local_done(key, outcome)
        running = _Running()
        self._running[key] = running
        running.task = self.spawn(self._execute(key, request, handler, running))
        return []

    def cancel(self, key: Key) -> None:
        """Stop the handler for ``key``, if it still runs."""
        running = self._running.pop(key, None)
        if running is not None and running.task is not None:
            running.task.cancel()

    def notify(self, key: Key, notification: Notification) -> None:
        """Queue a notification from the caller for the handler of ``key``, if it still runs."""
        running = self._running.get(key)
        if running is not None:
            offer(running.inbox(), notification, "notification")

    def cancel_all(self) -> None:
        for running in list(self._running.values()):
            if running.task is not None:
                running.task.cancel()

    async def _execute(
        self, key: Key, request: Request, handler: Handler | None, running: _Running
    ) -> None:
        env = self.state.environment_id
        if handler is None:
            name = f"{request.originalType}:{request.originalAction}"
            outcome = Outcome(
                False,
                error=ErrorBody(code="no_handler", message=f"no handler for {name} in {env}"),
                environment_id=env,
            )
        else:

            async def partial(result: Any) -> None:
                await self.apply(self.state.local_partial(key, result))

            async def notify(kind: str, result: Any) -> None:
                await self.apply(self.state.local_notify(key, kind, result))

            ctx = HandlerContext(request, env, partial, notify, running.inbox)
            try:
                outcome = _checked(request, await handler(ctx, request.originalMessage), env)
            except asyncio.CancelledError:
                self._running.pop(key, None)
                raise
            except Exception as exc:
                outcome = Outcome(False, error=error_body(exc, env), environment_id=env)
        self._running.pop(key, None)
        await self.apply(self.state.local_done(key, outcome))


def _checked(request: Request, result: Any, env: str) -> Outcome:
    """The outcome of a handler that returned ``result``: checked here, once, so a bad result
    fails this call instead of the send of its reply (and so a handler behaves the same for
    local and remote callers)."""
    try:
        to_json(result)
    except PydanticSerializationError as exc:
        log.error(
            "%s:%s returned non-JSON data: %s", request.originalType, request.originalAction, exc
        )
        failure = ErrorBody(code="handler_error", message="handler returned non-JSON data")
        return Outcome(False, None, failure, env)
    return Outcome(True, result, None, env)


async def _no_stream(result: Any) -> None:
    raise RuntimeError("an inline handler cannot stream partial results")


async def _no_notify(kind: str, result: Any) -> None:
    raise RuntimeError("an inline handler cannot send notifications")


def _no_inbox() -> asyncio.Queue[Notification]:
    raise RuntimeError("an inline handler cannot wait for notifications")
