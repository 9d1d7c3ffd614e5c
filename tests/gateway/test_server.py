"""Real WebSocket servers on 127.0.0.1 (port 0): request/reply, streaming, notifications both
ways, claims, provider messages, TLS, reconnects, and hostile clients."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.client import GatewayClient
from gateway.errors import (
    ClaimError,
    GatewayTimeout,
    NoHandler,
    RoutingError,
    TokenInvalid,
    Unavailable,
)
from gateway.handlers import HandlerContext
from gateway.limits import Limits
from gateway.node import Gateway
from gateway.plugins import RemoteExecutionPlugin
from gateway.protocol import Notification
from gateway.tokens import TokenSigner
from tests.gateway.conftest import FAST, async_test, hub


def _raw(url: str, token: str | None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return connect(url, additional_headers=headers, proxy=None, **kw)


def _hello(env: str) -> str:
    return json.dumps({"type": "executionGateway.hello", "environmentId": env, "runtimeId": "rt"})


@async_test
async def test_request_reply_and_errors(signer: TokenSigner, root: Path) -> None:
    async with (
        hub(signer, root) as (_node, plugin),
        GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c,
    ):
        assert c.server == "hub"
        assert await c.call("gateway", "echo", {"a": [1, 2]}) == {"a": [1, 2]}
        who = await c.call("gateway", "whoami")
        assert who["environmentId"] == "hub" and who["routePath"] == ["agent"]
        got = await c.call("fs", "readFile", {"path": "hello.txt"})
        assert got["content"] == "hello\n"
        with pytest.raises(NoHandler, match="nope:x"):
            await c.call("nope", "x")
        results = await asyncio.gather(*(c.call("gateway", "echo", {"i": i}) for i in range(200)))
        assert [r["i"] for r in results] == list(range(200))


@async_test
async def test_handler_failures_cross_as_codes_only(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):

        @node.handler("boom", "x")
        async def boom(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            raise RuntimeError("secret internal detail /etc/passwd")

        @node.handler("boom", "json")
        async def not_json(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            return {"x": object()}

        async with GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c:
            with pytest.raises(Exception) as info:
                await c.call("boom", "x")
            assert type(info.value).__name__ == "HandlerFailed"
            assert "secret" not in str(info.value) and "RuntimeError" in str(info.value)
            with pytest.raises(Exception, match="non-JSON"):
                await c.call("boom", "json")
            assert await c.call("gateway", "echo", {}) == {}  # still serving


@async_test
async def test_streaming_and_notifications_both_ways(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):
        seen_by_hub: list[tuple[str | None, Notification]] = []
        node.add_listener(lambda peer, note: seen_by_hub.append((peer, note)))

        @node.handler("chat", "talk")
        async def talk(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            for i in range(3):
                await ctx.partial({"token": i})
            await ctx.notify("progress", {"pct": 50})
            question = await ctx.next_notification(timeout=5)
            return {"answer": question.result}

        async with GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c:
            got_by_client: list[Notification] = []
            c.add_listener(lambda peer, note: got_by_client.append(note))
            async with c.stream("chat", "talk") as call:
                parts = []
                async for part in call:
                    parts.append(part)
                    if len(parts) == 3:
                        progress = await call.next_notification(timeout=5)
                        assert progress.result == {"pct": 50}
                        assert progress.environmentId == "hub"
                        await call.notify("reply", "42")
            assert parts == [{"token": 0}, {"token": 1}, {"token": 2}]
            assert call.result == {"answer": "42"}
            # neighbour notifications, both directions
            await c.notify("log", "from agent")
            await node.notify("log", "from hub")
            for _ in range(100):
                if seen_by_hub and any(n.result == "from hub" for n in got_by_client):
                    break
                await asyncio.sleep(0.02)
            assert seen_by_hub[0][0] == "agent" and seen_by_hub[0][1].result == "from agent"


@async_test
async def test_claims_and_lazy_routing(signer: TokenSigner) -> None:
    node = Gateway("solo", config=None, limits=FAST)
    plugin = RemoteExecutionPlugin(node, signer, port=0)
    await plugin.start()
    assert node.claimed_by == "remote-execution"
    with pytest.raises(ClaimError, match="already claimed by remote-execution"):
        node.claim("other")
    with pytest.raises(ClaimError, match="cannot relinquish"):
        node.relinquish("other")
    second = RemoteExecutionPlugin(node, signer, port=0)
    with pytest.raises(ClaimError):
        await second.start()
    await plugin.stop()
    assert node.claimed_by is None
    # no claim, no proxying: a call naming another environment is refused
    with pytest.raises(RoutingError, match="no plugin claims"):
        await node.call("gateway", "echo", target="elsewhere")
    assert await node.call("gateway", "echo", {"x": 1}) == {"x": 1}
    node.claim("other")
    node.relinquish("other")
    await node.close()


@async_test
async def test_proxy_to_a_connected_environment_in_process(signer: TokenSigner, root: Path) -> None:
    rules = {"rules": {"fs": {"mode": "proxy", "environment": "sandbox"}}}
    from gateway.config import parse_config

    async with hub(signer, None, config=parse_config(rules)) as (_node, plugin):
        sandbox = Gateway("sandbox", limits=FAST)
        from gateway.builtins import install_builtins

        install_builtins(sandbox.handlers, root)
        await sandbox.connect(plugin.url, signer.issue("r", "sandbox", 60))
        async with GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c:
            got = await c.call("fs", "readFile", {"path": "hello.txt"})
            assert got["content"] == "hello\n"
            assert (await c.call("gateway", "whoami", target="sandbox"))["routePath"] == [
                "agent",
                "hub",
            ]
        await sandbox.close()


@async_test
async def test_execution_timeout_and_cancellation_reach_the_handler(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):
        cancelled = asyncio.Event()
        started = asyncio.Event()

        @node.handler("slow", "x")
        async def slow(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async with GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c:
            with pytest.raises(GatewayTimeout):
                await c.call("slow", "x", timeout=0.3)
            await asyncio.wait_for(cancelled.wait(), 5)
            cancelled.clear()
            started.clear()
            task = asyncio.create_task(c.call("slow", "x"))
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(cancelled.wait(), 5)
            assert node.state.inflight == 0


@async_test
async def test_reconnect_resends_unanswered_requests_once(signer: TokenSigner) -> None:
    async with hub(signer) as (node, plugin):
        runs = 0
        release = asyncio.Event()

        @node.handler("once", "x")
        async def once(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            nonlocal runs
            runs += 1
            await release.wait()
            return runs

        async with GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c:
            task = asyncio.create_task(c.call("once", "x", timeout=10))
            while runs == 0:
                await asyncio.sleep(0.01)
            # drop the connection from the server side while the call is running
            for ws in list(node.connections.of("agent")):
                await ws.close()
            for _ in range(200):  # the client reconnects and resends the request
                if "agent" in node.connections:
                    break
                await asyncio.sleep(0.02)
            release.set()
            assert await task == 1
            assert runs == 1, "the resend must not run the handler twice"


@async_test
async def test_caller_gets_unavailable_when_the_hop_never_returns(signer: TokenSigner) -> None:
    from gateway.config import parse_config
    from gateway.errors import Unavailable

    rules = parse_config({"rules": {"*": {"mode": "proxy", "environment": "far"}}})
    async with hub(signer, config=rules) as (_node, plugin):
        far = Gateway("far", limits=FAST)
        started = asyncio.Event()

        @far.handler("gateway", "hang")
        async def hang(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            started.set()
            await asyncio.sleep(60)

        await far.connect(plugin.url, signer.issue("r", "far", 60))
        async with GatewayClient(plugin.url, signer.issue("r", "agent", 60), limits=FAST) as c:
            task = asyncio.create_task(c.call("gateway", "hang", timeout=20))
            await asyncio.wait_for(started.wait(), 5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await far.close()  # the hop goes away for good
            with pytest.raises(Unavailable, match="far disconnected"):
                await task
            assert loop.time() - t0 < FAST.transport_timeout + 1.5


@async_test
async def test_provider_messages(signer: TokenSigner, root: Path) -> None:
    async with hub(signer, root) as (node, plugin):

        @node.handler("provider", "start")
        async def start(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            return {"started": payload["options"]}

        async with _raw(plugin.url, signer.issue("r", "prov", 60)) as ws:
            await ws.send(_hello("prov"))
            assert json.loads(await ws.recv())["type"] == "executionGateway.welcome"

            async def ask(msg: dict[str, Any]) -> dict[str, Any]:
                await ws.send(json.dumps(msg))
                return json.loads(await ws.recv())  # type: ignore[no-any-return]

            beat = await ask({"type": "heartbeat", "requestId": "h1", "timestamp": 5.0})
            assert beat["type"] == "heartbeatResponse" and beat["success"]
            assert beat["result"] == {"environmentId": "hub", "timestamp": 5.0}
            w = await ask(
                {"type": "providerWriteFile", "requestId": "w", "path": "n.txt", "content": "hi"}
            )
            assert w["type"] == "providerWriteFileResponse" and w["success"], w
            r = await ask({"type": "providerReadFile", "requestId": "r", "path": "n.txt"})
            assert r["result"]["content"] == "hi"
            bad = await ask({"type": "providerReadFile", "requestId": "r2", "path": "../../x"})
            assert not bad["success"] and bad["error"]["code"] == "forbidden"
            d = await ask({"type": "providerDeleteFile", "requestId": "d", "path": "n.txt"})
            assert d["success"] and not (root / "n.txt").exists()
            s = await ask({"type": "providerStart", "requestId": "s", "options": {"a": 1}})
            assert s["type"] == "providerStartResponse" and s["result"] == {"started": {"a": 1}}
            stop = await ask({"type": "providerStop", "requestId": "st"})
            assert stop["error"]["code"] == "no_handler"
            ag = await ask({"type": "providerAgentStart", "requestId": "ag", "agent": "claude"})
            assert ag["type"] == "providerAgentStartResponse" and not ag["success"]


# ----------------------------------------------------------------------------- hostile clients


@async_test
async def test_missing_forged_expired_and_wrong_run_tokens_are_refused(
    signer: TokenSigner, tmp_path: Path
) -> None:
    from gateway.tokens import load_or_create_key

    forger = TokenSigner(load_or_create_key(tmp_path / "forged.key"))
    node = Gateway("hub", limits=FAST)
    plugin = RemoteExecutionPlugin(node, signer, port=0, run_id="run-1")
    await plugin.start()
    try:
        bad = [
            None,
            "garbage",
            forger.issue("run-1", "agent", 60),
            signer.issue("run-1", "agent", 60, now=0),  # expired long ago
            signer.issue("run-2", "agent", 60),  # another run
        ]
        for token in bad:
            with pytest.raises(InvalidStatus) as info:
                async with _raw(plugin.url, token):
                    pass
            assert info.value.response.status_code == 401
        # the client surfaces the refusal as an auth error, without retrying forever
        with pytest.raises(TokenInvalid, match="refused"):
            async with GatewayClient(plugin.url, forger.issue("run-1", "agent", 60), limits=FAST):
                pass
        # a valid token for one environment cannot say hello as another
        async with _raw(plugin.url, signer.issue("run-1", "agent", 60)) as ws:
            await ws.send(_hello("admin"))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        # ... and still works for the right one
        async with GatewayClient(plugin.url, signer.issue("run-1", "agent", 60), limits=FAST) as c:
            assert await c.call("gateway", "echo", {"ok": True}) == {"ok": True}
        assert node.state.inflight == 0
    finally:
        await plugin.stop()
        await node.close()


@async_test
async def test_a_connection_lives_only_as_long_as_its_token(signer: TokenSigner) -> None:
    """The token is verified once, at the upgrade; the connection is still held to it: closed
    (1008) when it expires or is revoked, and no call is served after that."""
    import time

    from gateway.tokens import CLOCK_SKEW_TOLERANCE

    request = json.dumps(
        {
            "type": "executionGateway.request",
            "requestId": "q1",
            "originalType": "gateway",
            "originalAction": "echo",
            "originalMessage": {"n": 1},
            "routePath": ["agent"],
        }
    )

    async def served_then_closed(ws: Any) -> tuple[dict[str, Any], int, str, float]:
        await ws.send(_hello("agent"))
        assert json.loads(await ws.recv())["type"] == "executionGateway.welcome"
        await ws.send(request)
        reply = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:  # and nothing else before the close
            await asyncio.wait_for(ws.recv(), 10)
        rcvd = closed.value.rcvd
        assert rcvd is not None
        return reply, rcvd.code, rcvd.reason, time.time()

    async with hub(signer) as (node, plugin):
        # good for about 1.5 s more: expired 3.5 s ago, within the clock-skew tolerance
        expires = time.time() - CLOCK_SKEW_TOLERANCE + 1.5
        expiring = signer.issue("run-1", "agent", 1.0, now=expires - 1.0)
        async with _raw(plugin.url, expiring) as ws:
            reply, code, reason, at = await served_then_closed(ws)
        assert reply["success"] and reply["result"] == {"n": 1}
        assert (code, reason) == (1008, "token expired")
        assert at >= expires + CLOCK_SKEW_TOLERANCE - 0.1

        async with _raw(plugin.url, signer.issue("run-2", "agent", 600)) as ws:
            await ws.send(_hello("agent"))
            await ws.recv()
            await ws.send(request)
            assert json.loads(await ws.recv())["success"]
            assert await node.revoke("run ended", run_id="run-2") == 1
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1008,
                "token revoked: run ended",
            )
        assert node.access.claims == {}


@async_test
async def test_garbage_oversized_and_floods_never_crash_the_server(signer: TokenSigner) -> None:
    limits = Limits(transport_timeout=1.0, max_frame=64 * 1024, max_bad_frames=20, max_inflight=50)
    async with hub(signer, limits=limits) as (node, plugin):
        token = signer.issue("r", "evil", 60)
        async with _raw(plugin.url, token) as ws:
            await ws.send(_hello("evil"))
            await ws.recv()
            for frame, code in (
                ("{not json", "bad_request"),
                ('{"type": "executionGateway.nuke", "requestId": "n1"}', "unknown_type"),
                ('{"type": "executionGateway.request", "requestId": "q1"}', "bad_request"),
                (json.dumps(["a"]), "bad_request"),
                (_hello("evil"), "bad_request"),  # a second hello on an open connection
            ):
                await ws.send(frame)
                reply = json.loads(await ws.recv())
                assert reply["type"] == "executionGateway.reply" and not reply["success"]
                assert reply["error"]["code"] == code, (frame, reply)
            unknown = json.loads(
                await asyncio.wait_for(_send_recv(ws, '{"type": "x.y", "requestId": "keep-me"}'), 5)
            )
            assert unknown["replyRequestId"] == "keep-me"
        # a garbage flood: the connection is closed once the budget of bad frames is spent
        async with _raw(plugin.url, token) as ws:
            await ws.send(_hello("evil"))
            await ws.recv()
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(1000):
                    await ws.send("\x00garbage")
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        # an oversized frame closes that connection (1009), nothing else
        async with _raw(plugin.url, token, max_size=None) as ws:
            await ws.send(_hello("evil"))
            await ws.recv()
            await ws.send("x" * (limits.max_frame + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        # a request flood beyond max_inflight gets "busy" answers, not unbounded work
        gate = asyncio.Event()

        @node.handler("wait", "x")
        async def wait(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
            await gate.wait()
            return 1

        async with _raw(plugin.url, token) as ws:
            await ws.send(_hello("evil"))
            await ws.recv()
            for i in range(200):
                req = {
                    "type": "executionGateway.request",
                    "requestId": f"f{i}",
                    "originalType": "wait",
                    "originalAction": "x",
                    "routePath": ["evil"],
                }
                await ws.send(json.dumps(req))
            busy = [json.loads(await ws.recv()) for _ in range(150)]
            assert all(b["error"]["code"] == "busy" for b in busy)
            assert node.state.inflight == 50
            gate.set()
            done = [json.loads(await ws.recv()) for _ in range(50)]
            assert all(d["success"] for d in done)
        # through it all, a well-behaved client is served
        async with GatewayClient(plugin.url, signer.issue("r", "good", 60), limits=FAST) as c:
            assert await c.call("gateway", "echo", {"still": "up"}) == {"still": "up"}


async def _send_recv(ws: Any, frame: str) -> Any:
    await ws.send(frame)
    return await ws.recv()


@async_test
async def test_no_hello_in_time_is_closed(signer: TokenSigner) -> None:
    async with (
        hub(signer) as (_node, plugin),
        _raw(plugin.url, signer.issue("r", "mute", 60)) as ws,
    ):
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@async_test
async def test_tls(signer: TokenSigner, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    node = Gateway("hub", limits=FAST)
    plugin = RemoteExecutionPlugin(node, signer, port=0, ssl=server_ctx)
    await plugin.start()
    try:
        assert plugin.url.startswith("wss://127.0.0.1:")
        client_ctx = ssl.create_default_context(cafile=str(cert))
        token = signer.issue("r", "agent", 60)
        async with GatewayClient(plugin.url, token, ssl=client_ctx, limits=FAST) as c:
            assert await c.call("gateway", "echo", {"tls": 1}) == {"tls": 1}
        # an untrusting client does not get through (and plain ws:// is not served)
        with pytest.raises(Unavailable):
            async with GatewayClient(plugin.url, token, limits=FAST):
                pass
    finally:
        await plugin.stop()
        await node.close()


@async_test
async def test_two_gateways_dialling_each_other_share_one_peer(signer: TokenSigner) -> None:
    async with hub(signer, env="a") as (a, pa), hub(signer, env="b") as (b, pb):
        link_ab = await a.connect(pb.url, signer.issue("r", "a", 60))
        await b.connect(pa.url, signer.issue("r", "b", 60))
        for _ in range(100):  # both directions registered on both sides
            if len(a.connections.of("b")) == 2 and len(b.connections.of("a")) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(a.connections.of("b")) == 2 and len(b.connections.of("a")) == 2
        assert (await a.call("gateway", "whoami", target="b"))["environmentId"] == "b"
        assert (await b.call("gateway", "whoami", target="a"))["environmentId"] == "a"
        await link_ab.close()  # one of the two connections goes away: the peer stays up
        for _ in range(100):
            if len(a.connections.of("b")) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(a.connections.of("b")) == 1
        assert a.peers() == {"b": []}
        assert (await a.call("gateway", "whoami", target="b"))["routePath"] == ["a"]


@async_test
async def test_unix_socket_admits_exactly_what_tcp_admits(
    signer: TokenSigner, tmp_path: Path
) -> None:
    """``ws+unix://``: the same token checks as over TCP (forged, expired and other runs' tokens
    get 401, the client gives up with an auth error), a valid token gets through, also at a
    path too long for a socket address; closing the socket removes it and a stale one left by a
    dead server is replaced."""
    from websockets.asyncio.client import unix_connect

    from gateway.tokens import load_or_create_key
    from gateway.unix import unix_url

    forger = TokenSigner(load_or_create_key(tmp_path / "forged.key"))
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    short, long = str(tmp_path / "hub.sock"), str(deep / "hub.sock")
    node = Gateway("hub", limits=FAST)
    plugin = RemoteExecutionPlugin(node, signer, port=0, run_id="run-1")
    await plugin.start()
    try:
        url = await plugin.server.listen_unix(short)
        assert url == unix_url(short) == f"ws+unix://{short}"
        for token in (None, forger.issue("run-1", "a", 60), signer.issue("run-2", "a", 60)):
            headers = {"Authorization": f"Bearer {token}"} if token else None
            with pytest.raises(InvalidStatus) as info:
                async with unix_connect(short, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 401
        with pytest.raises(TokenInvalid, match="refused"):
            async with GatewayClient(url, forger.issue("run-1", "agent", 60), limits=FAST):
                pass
        long_url = await plugin.server.listen_unix(long)
        for address in (url, long_url):
            async with GatewayClient(address, signer.issue("run-1", "a", 60), limits=FAST) as c:
                assert await c.call("gateway", "echo", {"ok": 1}) == {"ok": 1}
        await plugin.server.close_unix(long)
        assert not Path(long).exists()
    finally:
        await plugin.stop()
        await node.close()
    # the server is gone, its socket is not: the next one replaces it
    assert Path(short).is_socket()
    node = Gateway("hub", limits=FAST)
    plugin = RemoteExecutionPlugin(node, signer, port=0)
    await plugin.start()
    try:
        url = await plugin.server.listen_unix(short)
        async with GatewayClient(url, signer.issue("run-1", "a", 60), limits=FAST) as c:
            assert await c.call("gateway", "echo", {"ok": 1}) == {"ok": 1}
    finally:
        await plugin.stop()
        await node.close()
