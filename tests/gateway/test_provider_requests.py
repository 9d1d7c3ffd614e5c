"""The hub side of provider messages (``Gateway.provider_request``), token claims of peers
(``Gateway.peer_claims``) and peer up/down listeners, over real WebSocket servers on
127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.builtins import install_builtins
from gateway.errors import (
    AccessDenied,
    Busy,
    GatewayTimeout,
    HandlerFailed,
    NoHandler,
    ProtocolError,
    TargetNotFound,
    Unavailable,
)
from gateway.handlers import HandlerContext
from gateway.node import Gateway
from gateway.protocol import (
    Heartbeat,
    HeartbeatResponse,
    ProviderAgentStart,
    ProviderAgentStartResponse,
    ProviderDeleteFile,
    ProviderDeleteFileResponse,
    ProviderReadFile,
    ProviderReadFileResponse,
    ProviderStart,
    ProviderStartResponse,
    ProviderStop,
    ProviderStopResponse,
    ProviderWriteFile,
    ProviderWriteFileResponse,
)
from gateway.tokens import TokenSigner
from tests.gateway.conftest import FAST, async_test, hub


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``pred`` until it holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def runtime(
    signer: TokenSigner, url: str, root: Path, env: str = "rt"
) -> AsyncIterator[Gateway]:
    """A gateway with the fs built-ins and provider:* handlers, dialled into ``url``."""
    node = Gateway(env, limits=FAST)
    install_builtins(node.handlers, root)

    @node.handler("provider", "start")
    async def start(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
        return {"started": payload["options"], "by": ctx.route_path}

    @node.handler("provider", "agentStart")
    async def agent_start(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
        return {"agent": payload["agent"], "options": payload["options"]}

    @node.handler("provider", "stop")
    async def stop(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
        return {"stopped": True}

    try:
        await node.connect(url, signer.issue("r", env, 60))
        yield node
    finally:
        await node.close()


@asynccontextmanager
async def raw_peer(url: str, token: str, env: str) -> AsyncIterator[ClientConnection]:
    """A bare WebSocket peer (hello done) whose every frame the test writes by hand."""
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(url, additional_headers=headers, proxy=None) as ws:
        hello = {"type": "executionGateway.hello", "environmentId": env, "runtimeId": "rt"}
        await ws.send(json.dumps(hello))
        assert json.loads(await ws.recv())["type"] == "executionGateway.welcome"
        yield ws


# ----------------------------------------------------------------------------- provider_request


@async_test
async def test_round_trip_of_every_provider_message(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin), runtime(signer, plugin.url, root) as rt:
        await until(lambda: "rt" in node.connections, "rt on the hub")
        ask = node.provider_request

        start = await ask("rt", ProviderStart(requestId="s1", options={"a": 1}))
        assert isinstance(start, ProviderStartResponse)
        assert start.requestId == "s1" and start.success
        assert start.result == {"started": {"a": 1}, "by": ["hub"]}

        agent = await ask(
            "rt", ProviderAgentStart(requestId="a1", agent="claude", options={"m": 2})
        )
        assert isinstance(agent, ProviderAgentStartResponse)
        assert agent.result == {"agent": "claude", "options": {"m": 2}}

        write = await ask("rt", ProviderWriteFile(requestId="w1", path="n.txt", content="hi"))
        assert isinstance(write, ProviderWriteFileResponse)
        assert write.result == {"path": "n.txt", "size": 2}
        assert (root / "n.txt").read_text() == "hi"

        read = await ask("rt", ProviderReadFile(requestId="r1", path="n.txt"))
        assert isinstance(read, ProviderReadFileResponse)
        assert read.result["content"] == "hi" and read.result["size"] == 2

        delete = await ask("rt", ProviderDeleteFile(requestId="d1", path="n.txt"))
        assert isinstance(delete, ProviderDeleteFileResponse)
        assert delete.result == {"path": "n.txt", "deleted": True}
        assert not (root / "n.txt").exists()

        beat = await ask("rt", Heartbeat(requestId=node.new_request_id(), timestamp=7.5))
        assert isinstance(beat, HeartbeatResponse)
        assert beat.result == {"environmentId": "rt", "timestamp": 7.5}

        stop = await ask("rt", ProviderStop(requestId=node.new_request_id()))
        assert isinstance(stop, ProviderStopResponse) and stop.result == {"stopped": True}

        # many at once, on one connection, each matched by its id
        many = await asyncio.gather(
            *(ask("rt", Heartbeat(requestId=f"h{i}", timestamp=float(i))) for i in range(50))
        )
        assert [m.result["timestamp"] for m in many] == [float(i) for i in range(50)]
        assert node.provider_requests.waiting == set()
        assert rt.provider_requests.waiting == set()


@async_test
async def test_failed_responses_raise_the_class_for_their_code(
    signer: TokenSigner, root: Path
) -> None:
    async with hub(signer) as (node, plugin), runtime(signer, plugin.url, root) as rt:

        async def stop(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            raise RuntimeError("disk on fire")

        rt.handlers.register("provider", "stop", stop, replace=True)

        await until(lambda: "rt" in node.connections, "rt on the hub")

        with pytest.raises(AccessDenied) as denied:
            await node.provider_request("rt", ProviderReadFile(requestId="x1", path="../../x"))
        assert denied.value.code == "forbidden" and denied.value.environment_id == "rt"

        with pytest.raises(TargetNotFound, match=r"no such file: missing\.txt") as missing:
            await node.provider_request("rt", ProviderReadFile(requestId="x2", path="missing.txt"))
        assert missing.value.environment_id == "rt"

        with pytest.raises(HandlerFailed, match="RuntimeError"):
            await node.provider_request("rt", ProviderStop(requestId="x3"))
        assert node.provider_requests.waiting == set()


@async_test
async def test_no_handler_is_reported_as_no_handler(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin):
        bare = Gateway("bare", limits=FAST)  # no provider:* handlers at all
        await bare.connect(plugin.url, signer.issue("r", "bare", 60))
        try:
            await until(lambda: "bare" in node.connections, "bare on the hub")
            with pytest.raises(NoHandler, match="provider:start"):
                await node.provider_request("bare", ProviderStart(requestId="n1"))
        finally:
            await bare.close()
        assert node.provider_requests.waiting == set()


@async_test
async def test_not_connected_timeout_and_cancel(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin), runtime(signer, plugin.url, root) as rt:
        with pytest.raises(Unavailable, match="nowhere is not connected to hub"):
            await node.provider_request("nowhere", ProviderStop(requestId="u1"))

        release = asyncio.Event()
        entered = asyncio.Event()

        async def slow(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            entered.set()
            await release.wait()
            return {"late": True}

        rt.handlers.register("provider", "start", slow, replace=True)

        await until(lambda: "rt" in node.connections, "rt on the hub")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(GatewayTimeout, match=r"rt did not answer providerStart t1 within 0.2s"):
            await node.provider_request("rt", ProviderStart(requestId="t1"), timeout=0.2)
        assert 0.15 < loop.time() - t0 < 2
        assert node.provider_requests.waiting == set()

        # the caller gives up (cancelled): nothing is left waiting either
        entered.clear()
        task = asyncio.create_task(node.provider_request("rt", ProviderStart(requestId="c1")))
        await asyncio.wait_for(entered.wait(), 5)
        assert ("rt", "c1") in node.provider_requests.waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert node.provider_requests.waiting == set()

        # the late answers arrive and are dropped without harm
        release.set()
        await asyncio.sleep(0.1)
        beat = await node.provider_request("rt", Heartbeat(requestId="after"))
        assert beat.success and beat.result["environmentId"] == "rt"


@async_test
async def test_duplicate_request_id_is_refused(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin), runtime(signer, plugin.url, root) as rt:
        release = asyncio.Event()

        async def slow(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            await release.wait()
            return "first"

        rt.handlers.register("provider", "start", slow, replace=True)

        await until(lambda: "rt" in node.connections, "rt on the hub")
        first = asyncio.create_task(node.provider_request("rt", ProviderStart(requestId="dup")))
        await until(
            lambda: ("rt", "dup") in node.provider_requests.waiting, "the first request registered"
        )
        with pytest.raises(ProtocolError, match="already waiting"):
            await node.provider_request("rt", ProviderStop(requestId="dup"))
        release.set()
        assert (await first).result == "first"
        assert node.provider_requests.waiting == set()


@async_test
async def test_peer_drops_mid_request(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin), runtime(signer, plugin.url, root) as rt:
        entered = asyncio.Event()

        async def hang(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            entered.set()
            await asyncio.sleep(60)

        rt.handlers.register("provider", "start", hang, replace=True)

        await until(lambda: "rt" in node.connections, "rt on the hub")
        # 1. the hub closes the connection (the runtime's link will dial again)
        task = asyncio.create_task(node.provider_request("rt", ProviderStart(requestId="p1")))
        await asyncio.wait_for(entered.wait(), 5)
        for ws in list(node.connections.of("rt")):
            await ws.close()
        with pytest.raises(Unavailable, match="connection to rt closed before it answered"):
            await asyncio.wait_for(task, 5)
        assert node.provider_requests.waiting == set()

        # 2. the runtime goes away for good
        await until(lambda: "rt" in node.connections, "rt back on the hub")
        entered.clear()
        task = asyncio.create_task(node.provider_request("rt", ProviderStart(requestId="p2")))
        await asyncio.wait_for(entered.wait(), 5)
        await rt.close()
        with pytest.raises(Unavailable, match="closed before it answered"):
            await asyncio.wait_for(task, 5)
        assert node.provider_requests.waiting == set()


@async_test
async def test_hub_closing_fails_waiting_requests(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin), runtime(signer, plugin.url, root) as rt:
        entered = asyncio.Event()

        async def hang(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            entered.set()
            await asyncio.sleep(60)

        rt.handlers.register("provider", "start", hang, replace=True)

        await until(lambda: "rt" in node.connections, "rt on the hub")
        task = asyncio.create_task(node.provider_request("rt", ProviderStart(requestId="z1")))
        await asyncio.wait_for(entered.wait(), 5)
        await node.close()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(task, 5)
        assert node.provider_requests.waiting == set()
        with pytest.raises(Unavailable):
            await node.provider_request("rt", ProviderStop(requestId="z2"))


@async_test
async def test_unsolicited_and_mismatched_responses(
    signer: TokenSigner, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        hub(signer) as (node, plugin),
        raw_peer(plugin.url, signer.issue("r", "raw", 60), "raw") as ws,
    ):
        await until(lambda: "raw" in node.connections, "raw on the hub")
        with caplog.at_level(logging.DEBUG, logger="gateway.provider_calls"):
            unsolicited = {
                "type": "providerStopResponse",
                "requestId": "nobody",
                "success": True,
            }
            await ws.send(json.dumps(unsolicited))
            await until(
                lambda: "providerStopResponse nobody from raw ignored" in caplog.text,
                "the debug line",
            )

        async def answer(**fields: Any) -> None:
            msg = json.loads(await ws.recv())
            await ws.send(json.dumps({"requestId": msg["requestId"], **fields}))

        # a response of the wrong type for the id
        task = asyncio.create_task(node.provider_request("raw", ProviderStop(requestId="m1")))
        await answer(type="providerStartResponse", success=True)
        with pytest.raises(ProtocolError, match="expected ProviderStopResponse"):
            await task

        # an error code from the peer becomes its class
        task = asyncio.create_task(node.provider_request("raw", ProviderStop(requestId="m2")))
        err = {"code": "busy", "message": "try later"}
        await answer(type="providerStopResponse", success=False, error=err)
        with pytest.raises(Busy, match="raw: try later"):
            await task

        # and the right one is returned as is
        task = asyncio.create_task(node.provider_request("raw", ProviderStop(requestId="m3")))
        await answer(type="providerStopResponse", success=True, result={"ok": 1})
        got = await task
        assert isinstance(got, ProviderStopResponse) and got.result == {"ok": 1}
        assert node.provider_requests.waiting == set()


# ----------------------------------------------------------------------------- peer claims


@async_test
async def test_peer_claims_for_accepted_and_dialled_peers(signer: TokenSigner, root: Path) -> None:
    async with hub(signer) as (node, plugin):
        assert node.peer_claims("rt") is None
        async with runtime(signer, plugin.url, root) as rt:
            await until(lambda: "rt" in node.connections, "rt on the hub")
            claims = node.peer_claims("rt")
            assert claims is not None
            assert (claims.run_id, claims.environment_id) == ("r", "rt")
            assert rt.peer_claims("hub") is None  # we dialled it: it presented no token
            assert node.peer_claims("nope") is None
        await until(lambda: "rt" not in node.connections, "rt gone")
        assert node.peer_claims("rt") is None
        assert node.access.claims == {}


@async_test
async def test_peer_claims_follow_the_open_connection(signer: TokenSigner, root: Path) -> None:
    async with hub(signer, env="a") as (a, pa), hub(signer, env="b") as (b, pb):
        link_ab = await a.connect(pb.url, signer.issue("run-ab", "a", 60))
        await until(lambda: "a" in b.connections, "a on b")
        assert a.peer_claims("b") is None  # only dialled so far
        claims_b = b.peer_claims("a")
        assert claims_b is not None and claims_b.run_id == "run-ab"
        await b.connect(pa.url, signer.issue("run-ba", "b", 60))
        await until(lambda: len(a.connections.of("b")) == 2, "both directions on a")
        got = a.peer_claims("b")
        assert got is not None and got.run_id == "run-ba"
        await link_ab.close()  # b's accepted connection from a goes; b's dialled one stays
        await until(lambda: len(b.connections.of("a")) == 1, "one connection left on b")
        assert b.peer_claims("a") is None
        assert "a" in b.peers()


# ----------------------------------------------------------------------------- peer listeners


@async_test
async def test_peer_listeners_up_down_and_reconnect(signer: TokenSigner, root: Path) -> None:
    hub_events: list[tuple[str, bool]] = []
    rt_events: list[tuple[str, bool]] = []

    def broken(peer: str, up: bool) -> None:
        raise RuntimeError("listener bug")

    async with hub(signer) as (node, plugin):
        node.add_peer_listener(broken)  # logged, and the next listener still runs
        node.add_peer_listener(lambda p, up: hub_events.append((p, up)))
        rt = Gateway("rt", limits=FAST)
        rt.add_peer_listener(lambda p, up: rt_events.append((p, up)))
        try:
            await rt.connect(plugin.url, signer.issue("r", "rt", 60))
            await until(lambda: hub_events == [("rt", True)], "rt up on the hub")
            assert rt_events == [("hub", True)]
            # the state knows the peer by the time the listener hears of it
            assert (await node.call("gateway", "whoami", target="rt"))["environmentId"] == "rt"

            # drop it from the hub's side: the link redials
            for ws in list(node.connections.of("rt")):
                await ws.close()
            await until(lambda: len(hub_events) == 3, "rt down and up again on the hub")
            assert hub_events == [("rt", True), ("rt", False), ("rt", True)]
            await until(lambda: len(rt_events) == 3, "hub down and up again on rt")
            assert rt_events == [("hub", True), ("hub", False), ("hub", True)]
        finally:
            await rt.close()
        await until(lambda: len(hub_events) == 4, "rt down on the hub")
        assert hub_events[-1] == ("rt", False)
        assert rt_events == [("hub", True), ("hub", False), ("hub", True)]  # not on own close

        # a second connection of a connected peer is no news; its last one going is
        rt2 = Gateway("rt", limits=FAST)
        try:
            await rt2.connect(plugin.url, signer.issue("r", "rt", 60))
            await rt2.connect(plugin.url, signer.issue("r", "rt", 60))
            await until(lambda: len(node.connections.of("rt")) == 2, "two connections")
            assert hub_events[4:] == [("rt", True)]
            await rt2._links[0].close()
            await until(lambda: len(node.connections.of("rt")) == 1, "one connection")
            assert hub_events[4:] == [("rt", True)]
        finally:
            await rt2.close()
        await until(lambda: len(hub_events) == 6, "rt down again")
        assert hub_events[4:] == [("rt", True), ("rt", False)]

        node.remove_peer_listener(broken)
        node.remove_peer_listener(broken)  # twice: no error
    # the hub's own close reports nothing
    assert len(hub_events) == 6
