"""Route records (``Gateway.add_route_observer``): one per request received from a peer, with
the route it took, over real WebSocket servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway import RouteRecord
from gateway.client import GatewayClient
from gateway.config import parse_config
from gateway.errors import HandlerFailed, NoHandler, RoutingError, Unavailable
from gateway.handlers import HandlerContext
from gateway.node import Gateway
from gateway.tokens import TokenSigner
from tests.gateway.conftest import FAST, async_test, hub, proxy
from tests.gateway.test_provider_requests import raw_peer, until


def _records(node: Gateway) -> list[RouteRecord]:
    got: list[RouteRecord] = []
    node.add_route_observer(got.append)
    return got


@asynccontextmanager
async def spoke(signer: TokenSigner, url: str, env: str) -> AsyncIterator[Gateway]:
    """A gateway ``env`` dialled into the hub, with a failing and a slow handler."""
    node = Gateway(env, limits=FAST)

    @node.handler("work", "fail")
    async def fail(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
        raise ValueError("nope")

    @node.handler("work", "x")
    async def work(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
        return {"ran": env}

    try:
        await node.connect(url, signer.issue("r", env, 60))
        yield node
    finally:
        await node.close()


@async_test
async def test_local_proxied_fan_out_refused_and_failed_calls(signer: TokenSigner) -> None:
    rules = parse_config({"rules": {"work": proxy("b"), "multi": proxy("b", "c")}})
    async with hub(signer, config=rules) as (node, plugin):
        recs = _records(node)
        async with (
            spoke(signer, plugin.url, "b") as b,
            spoke(signer, plugin.url, "c") as c_node,
            GatewayClient(plugin.url, signer.issue("r", "a", 60), limits=FAST) as a,
        ):

            @c_node.handler("multi", "x")
            async def multi_c(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
                return "c"

            @b.handler("multi", "x")
            async def multi_b(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
                return "b"

            b_recs = _records(b)
            await until(lambda: {"b", "c"} <= set(node.connections.peers()), "b and c on the hub")

            # 1. runs on the hub itself
            assert await a.call("gateway", "echo", {"x": 1}) == {"x": 1}
            await until(lambda: len(recs) == 1, "record 1")
            r = recs[0]
            assert (r.kind, r.action) == ("gateway", "echo")
            assert r.route_path == ["a"] and r.origin == "a" and r.from_peer == "a"
            assert (r.next_hop, r.next_hops, r.ran_in) == ("hub", ["hub"], "hub")
            assert r.success is True and r.error_code is None
            assert r.duration_ms >= 0 and r.request_id

            # 2. a -> hub -> b, by a rule and by an explicit target
            assert await a.call("work", "x") == {"ran": "b"}
            who = await a.call("gateway", "whoami", target="b")
            assert who["routePath"] == ["a", "hub"]
            await until(lambda: len(recs) == 3 and len(b_recs) == 2, "records 2-3")
            for r in recs[1:3]:
                assert r.route_path == ["a"] and r.from_peer == "a" and r.origin == "a"
                assert (r.next_hop, r.next_hops, r.ran_in) == ("b", ["b"], "b")
                assert r.success is True and r.error_code is None
            assert [(r.kind, r.action) for r in recs[1:3]] == [("work", "x"), ("gateway", "whoami")]
            # and as b saw the second hop
            bx = b_recs[0]
            assert bx.route_path == ["a", "hub"] and bx.origin == "a" and bx.from_peer == "hub"
            assert (bx.next_hop, bx.ran_in, bx.success) == ("b", "b", True)

            # 3. fan-out: both neighbours, the gathered result is the hub's
            gathered = await a.call("multi", "x")
            assert [g["result"] for g in gathered] == ["b", "c"]
            await until(lambda: len(recs) == 4, "record 4")
            r = recs[3]
            assert (r.next_hop, r.next_hops, r.ran_in, r.success) == ("b", ["b", "c"], "hub", True)

            # 4. refused here: no route to the target
            with pytest.raises(RoutingError, match="'nowhere' is not reachable from 'hub'"):
                await a.call("gateway", "echo", target="nowhere")
            await until(lambda: len(recs) == 5, "record 5")
            r = recs[4]
            assert (r.next_hop, r.next_hops, r.ran_in) == (None, [], "hub")
            assert (r.success, r.error_code) == (False, "no_route")

            # 5. an error reply from b, and a missing handler on the hub
            with pytest.raises(HandlerFailed, match="ValueError"):
                await a.call("work", "fail")
            with pytest.raises(NoHandler):
                await a.call("nope", "x")
            await until(lambda: len(recs) == 7, "records 6-7")
            r = recs[5]
            assert (r.next_hop, r.ran_in, r.success, r.error_code) == (
                "b",
                "b",
                False,
                "handler_error",
            )
            r = recs[6]
            assert (r.next_hop, r.ran_in, r.success, r.error_code) == (
                "hub",
                "hub",
                False,
                "no_handler",
            )
            assert len(b_recs) == 4  # whoami, multi, fail (+ work:x first)
        assert node.routes.tracked == {}


@async_test
async def test_loop_timeout_cancel_resend_and_bad_sender(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):
        recs = _records(node)
        started = asyncio.Event()

        @node.handler("slow", "x")
        async def slow(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            started.set()
            await asyncio.sleep(30)

        async with raw_peer(plugin.url, signer.issue("r", "raw", 60), "raw") as ws:

            async def send(**fields: Any) -> None:
                msg = {"type": "executionGateway.request", "routePath": ["raw"], **fields}
                await ws.send(json.dumps(msg))

            async def reply() -> dict[str, Any]:
                return json.loads(await ws.recv())  # type: ignore[no-any-return]

            # a loop through the hub is refused
            await send(requestId="l1", originalType="gateway", originalAction="echo",
                       routePath=["hub", "raw"])  # fmt: skip
            got = await reply()
            assert got["replyRequestId"] == "l1" and got["error"]["code"] == "loop"
            await until(lambda: len(recs) == 1, "loop record")
            r = recs[0]
            assert r.route_path == ["hub", "raw"] and r.origin == "hub" and r.from_peer == "raw"
            assert (r.next_hop, r.ran_in, r.error_code, r.request_id) == (None, "hub", "loop", "l1")

            # a path that does not end with the sender is a bad request
            await send(requestId="b1", originalType="gateway", originalAction="echo",
                       routePath=["someone"])  # fmt: skip
            assert (await reply())["error"]["code"] == "bad_request"
            await until(lambda: len(recs) == 2, "bad request record")
            assert (recs[1].origin, recs[1].error_code, recs[1].next_hop) == (
                "someone",
                "bad_request",
                None,
            )

            # the hub's deadline passes
            await send(requestId="t1", originalType="slow", originalAction="x", timeoutMs=200)
            got = await reply()
            assert got["replyRequestId"] == "t1" and got["error"]["code"] == "timeout"
            await until(lambda: len(recs) == 3, "timeout record")
            r = recs[2]
            assert (r.next_hop, r.ran_in, r.error_code) == ("hub", "hub", "timeout")
            assert r.duration_ms >= 150

            # the caller cancels: no reply, one record
            started.clear()
            await send(requestId="c1", originalType="slow", originalAction="x", timeoutMs=9000)
            await asyncio.wait_for(started.wait(), 5)
            await ws.send(json.dumps({"type": "executionGateway.cancel", "requestId": "c1"}))
            await until(lambda: len(recs) == 4, "cancel record")
            r = recs[3]
            assert (r.request_id, r.next_hop, r.success, r.error_code) == (
                "c1",
                "hub",
                False,
                "cancelled",
            )

            # an answered request sent again gets the same reply and no second record
            await send(requestId="e1", originalType="gateway", originalAction="echo",
                       originalMessage={"k": 1})  # fmt: skip
            first = await reply()
            await send(requestId="e1", originalType="gateway", originalAction="echo",
                       originalMessage={"k": 1})  # fmt: skip
            again = await reply()
            assert first == again and first["result"] == {"k": 1}
            await asyncio.sleep(0.05)
            assert [r.request_id for r in recs] == ["l1", "b1", "t1", "c1", "e1"]
            assert node.routes.tracked == {}


@async_test
async def test_held_leg_to_a_lost_peer(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):
        recs = _records(node)
        async with GatewayClient(plugin.url, signer.issue("r", "a", 60), limits=FAST) as a:
            async with spoke(signer, plugin.url, "b"):
                await until(lambda: "b" in node.connections, "b on the hub")
            await until(lambda: "b" not in node.connections, "b gone")
            assert "b" in node.peers()  # still within its grace period: the leg is held
            with pytest.raises(Unavailable, match="b disconnected"):
                await a.call("work", "x", target="b")
            await until(lambda: len(recs) == 1, "record")
            r = recs[0]
            assert (r.next_hop, r.next_hops, r.ran_in, r.error_code) == (
                "b",
                ["b"],
                "hub",
                "unavailable",
            )


@async_test
async def test_observers_cost_nothing_when_absent_and_can_fail(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):
        release = asyncio.Event()

        @node.handler("slow", "x")
        async def slow(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            await release.wait()
            return 1

        async with GatewayClient(plugin.url, signer.issue("r", "a", 60), limits=FAST) as a:
            assert await a.call("gateway", "echo") == {}
            assert node.routes.tracked == {}  # nothing watched without an observer

            def broken(record: RouteRecord) -> None:
                raise RuntimeError("observer bug")

            recs = _records(node)
            node.add_route_observer(broken)  # logged; the call and the other observer are fine
            task = asyncio.create_task(a.call("slow", "x"))
            await until(lambda: len(node.routes.tracked) == 1, "tracked")
            assert await a.call("gateway", "echo", {"z": 1}) == {"z": 1}
            await until(lambda: len(recs) == 1, "echo record")
            node.remove_route_observer(broken)
            node.remove_route_observer(recs.append)
            node.remove_route_observer(recs.append)  # twice: no error
            release.set()
            assert await task == 1
            await until(lambda: node.routes.tracked == {}, "tracked entry dropped")
            assert [(r.kind, r.action) for r in recs] == [("gateway", "echo")]
