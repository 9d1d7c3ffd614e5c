"""A call whose partial results are iterated before its final result (``Gateway.stream``)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import GatewayError
from .protocol import Notification

if TYPE_CHECKING:
    from .actions import Outcome
    from .node import Gateway, _Pending

__all__ = ["CallStream"]


class CallStream:
    """A call in progress whose partial results are iterated (see :meth:`Gateway.stream`).

    Attributes:
        result: The final result, once iteration ended.
    """

    def __init__(
        self,
        gateway: Gateway,
        kind: str,
        action: str,
        payload: dict[str, Any] | None,
        timeout: float | None,
        target: str | None,
        via: str | None,
    ) -> None:
        self._gateway = gateway
        self._args = (kind, action, payload, timeout, target, via)
        self._request_id: str | None = None
        self._pending: _Pending | None = None
        self._waiter: asyncio.Task[Outcome] | None = None
        self.result: Any = None
        self.finished = False

    async def __aenter__(self) -> CallStream:
        kind, action, payload, timeout, target, via = self._args
        gw = self._gateway
        self._request_id, self._pending, actions = gw._start(
            kind, action, payload, timeout, target, via, None, streaming=True
        )
        await gw._apply(actions)
        self._waiter = asyncio.ensure_future(gw._wait(self._request_id, self._pending))
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
            gw = self._gateway
            await gw._apply(gw.state.notify_down(self._request_id, kind, result))

    async def next_notification(self, timeout: float | None = None) -> Notification:
        """The next notification the handler sent back about this call."""
        if self._pending is None or self._pending.notes is None:
            raise RuntimeError("use 'async with gateway.stream(...)' first")
        return await asyncio.wait_for(self._pending.notes.get(), timeout)
