"""Inline handlers: synchronous, run in the caller's task (no task per call), same outcomes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.handlers import HandlerContext
from gateway.node import Gateway
from narrative.errors import NotFound


def test_inline_handler_runs_without_a_task_and_keeps_error_mapping() -> None:
    async def main() -> None:
        async with Gateway("here") as gw:
            seen: list[Any] = []

            def add(ctx: HandlerContext, payload: dict[str, Any]) -> int:
                seen.append(asyncio.current_task())
                return int(payload["a"]) + int(payload["b"])

            def bad(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
                return object()  # not JSON

            def boom(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
                raise NotFound("no such thing")

            gw.handlers.register_inline("math", "add", add)
            gw.handlers.register_inline("math", "bad", bad)
            gw.handlers.register_inline("math", "boom", boom)
            assert await gw.call("math", "add", {"a": 1, "b": 2}) == 3
            assert seen == [asyncio.current_task()]  # ran in the caller's own task
            with pytest.raises(GatewayError, match="non-JSON"):
                await gw.call("math", "bad")
            with pytest.raises(GatewayError, match="no such thing") as info:
                await gw.call("math", "boom")
            assert info.value.code == "not_found"
            # lookup still gives an async handler; register() replaces the inline form
            handler = gw.handlers.lookup("math", "add")
            assert handler is not None
            assert await handler(None, {"a": 2, "b": 2}) == 4  # type: ignore[arg-type]

            async def slow(ctx: HandlerContext, payload: dict[str, Any]) -> str:
                await asyncio.sleep(0)
                return "async"

            gw.handlers.register("math", "add", slow, replace=True)
            assert await gw.call("math", "add") == "async"
            assert await gw.call("gateway", "echo", {"x": 1}) == {"x": 1}

    asyncio.run(main())
