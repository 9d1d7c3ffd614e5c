"""A call whose partial results are iterated before its final result (``Gateway.stream``)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any

from .actions import Outcome
from .calls import OwnCalls, PendingCall
from .errors import GatewayError
from .protocol import Notification

__all__ = ["CallStream"]


class CallStream:
    """A call in progress whose partial results are iterated (see :meth:`Gateway.stream`).

    Attributes:
        result: The final result, once iteration ended.
    """

    def __init__(
        self,
        calls: OwnCalls,
        kind: str,
        action: str,
        payload: dict[str, Any] | None,
        timeout: float | None,
        target: str | None,
        via: str | None,
    ) -> None:
        self._calls = calls
        self._args = (kind, action, payload, timeout, target, via)
        self._request_id: str | None = None
        self._pending: PendingCall | None = None
        self._waiter: asyncio.Task[Outcome] | None = None
        self.result: Any = None
        self.finished = False

    async def __aenter__(self) -> CallStream:
        kind, action, payload, timeout, target, via = self._args
        calls = self._calls
        self._request_id, self._pending, actions = calls.start(
            kind, action, payload, timeout, target, via, None, streaming=True
        )
        await calls.apply(actions)
        self._waiter = asyncio.ensure_future(calls.wait(self._request_id, self._pending))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()  # cancels the call along its whole path
            with contextlib.suppress(asyncio.CancelledError, GatewayError):
                await self._waiter

    def __aiter__(self) -> CallStream:
        return self

    async def __anext__(self) -> Any:
        if self._pending is None or self._waiter is None or self._pending.partials is None:
            raise RuntimeError("use 'async with gateway.stream(...)' first")
        partials = self._pending.partials
        if self.finished:
            raise StopAsyncIteration
        if partials.empty() and not self._waiter.done():
            getter = asyncio.ensure_future(partials.get())
            await asyncio.wait({getter, self._waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result().result
            getter.cancel()
        if not partials.empty():
            return partials.get_nowait().result
        self.finished = True
        self.result = self._waiter.result().unwrap()
        raise StopAsyncIteration

    async def notify(self, kind: str, result: Any) -> None:
        """Send a notification down to the handler running this call."""
        if self._request_id is not None:
            await self._calls.notify_down(self._request_id, kind, result)

    async def next_notification(self, timeout: float | None = None) -> Notification:
        """The next notification the handler sent back about this call."""
        if self._pending is None or self._pending.notes is None:
            raise RuntimeError("use 'async with gateway.stream(...)' first")
        return await asyncio.wait_for(self._pending.notes.get(), timeout)
