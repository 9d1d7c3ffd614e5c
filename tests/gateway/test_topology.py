"""Chains of real gateway processes (``narrative gateway serve``), 3 to 5 of them: linear,
fan-out, tree, mesh and hub; and a middle hop killed mid-request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.client import GatewayClient
from gateway.errors import RouteLoop, Unavailable
from gateway.limits import Limits
from gateway.tokens import TokenSigner
from tests.gateway.conftest import Processes, async_test, proxy

pytestmark = pytest.mark.slow

LIMITS = Limits(transport_timeout=5.0)


def _client(url: str, signer: TokenSigner) -> GatewayClient:
    return GatewayClient(url, signer.issue("local", "client", 120), limits=LIMITS)


async def _read_whoami(client: GatewayClient, **kw: Any) -> Any:
    return await client.call("fs", "readFile", {"path": "whoami.txt"}, **kw)


def test_linear(processes: Processes, signer: TokenSigner) -> None:
    (d,) = processes.start(("d", None, []))
    (c,) = processes.start(("c", {"*": proxy("d")}, [d]))
    (b,) = processes.start(("b", {"*": proxy("c")}, [c]))
    (a,) = processes.start(("a", {"*": proxy("b")}, [b]))

    @async_test
    async def body() -> None:
        async with _client(a.url, signer) as client:
            who = await client.call("gateway", "whoami")
            assert who["environmentId"] == "d"
            assert who["routePath"] == ["client", "a", "b", "c"]
            assert (await _read_whoami(client))["content"] == "d"
            # streamed partial results come back along the whole path, in order
            script = "for i in 1 2 3 4 5; do echo line$i; done"
            async with client.stream("exec", "run", {"argv": ["sh", "-c", script]}) as run:
                parts = [p["data"] async for p in run]
            assert parts == [f"line{i}\n" for i in range(1, 6)]
            assert run.result["exitCode"] == 0
            # many calls in flight through the chain
            results = await asyncio.gather(
                *(client.call("gateway", "echo", {"i": i}) for i in range(100))
            )
            assert [r["i"] for r in results] == list(range(100))

    body()


def test_fan_out(processes: Processes, signer: TokenSigner) -> None:
    b, c, d = processes.start(("b", None, []), ("c", None, []), ("d", None, []))
    (a,) = processes.start(("a", {"fs": proxy("b", "c", "d")}, [b, c, d]))

    @async_test
    async def body() -> None:
        async with _client(a.url, signer) as client:
            gathered = await _read_whoami(client)
            assert [g["environmentId"] for g in gathered] == ["b", "c", "d"]
            assert [g["result"]["content"] for g in gathered] == ["b", "c", "d"]
            # one target failing does not sink the others
            (c.root / "whoami.txt").unlink()
            gathered = await _read_whoami(client)
            assert [g["success"] for g in gathered] == [True, False, True]
            assert gathered[1]["error"]["code"] == "not_found"

    body()


def test_tree(processes: Processes, signer: TokenSigner) -> None:
    d, e, c = processes.start(("d", None, []), ("e", None, []), ("c", None, []))
    (b,) = processes.start(("b", {"*": proxy("d", "e")}, [d, e]))
    (a,) = processes.start(("a", {"*": proxy("b", "c")}, [b, c]))

    @async_test
    async def body() -> None:
        async with _client(a.url, signer) as client:
            top = await client.call("gateway", "whoami")
            assert [t["environmentId"] for t in top] == ["b", "c"]
            leaves = top[0]["result"]
            assert [x["result"]["routePath"] for x in leaves] == [
                ["client", "a", "b"],
                ["client", "a", "b"],
            ]
            assert [x["environmentId"] for x in leaves] == ["d", "e"]
            assert top[1]["result"]["routePath"] == ["client", "a"]

    body()


def test_mesh_with_capabilities_and_a_loop(processes: Processes, signer: TokenSigner) -> None:
    (a,) = processes.start(
        (
            "a",
            {
                "gateway:whoami": proxy("b"),
                "fs": proxy("c"),
                "exec": {"mode": "proxy", "capability": "gpu"},
            },
            [],
        )
    )
    (b,) = processes.start(("b", {"gateway:whoami": proxy("c")}, [a]))
    processes.start(
        ("c", {"gateway:whoami": proxy("a"), "fs": proxy("b")}, [a, b]),
        ("d", None, [a, b], ("--capability", "gpu")),
    )

    @async_test
    async def body() -> None:
        async with _client(a.url, signer) as client:
            # a -> c -> b through the mesh, not over the direct a-b link
            assert (await _read_whoami(client))["content"] == "b"
            # a -> b -> c -> a: refused as a loop, with the path named
            with pytest.raises(RouteLoop, match="client -> a -> b -> c -> a"):
                await client.call("gateway", "whoami")
            # a capability rule finds the one environment that declares it
            out = await client.call("exec", "run", {"argv": ["cat", "whoami.txt"]})
            assert out["stdout"] == "d"
            # an explicit target rides any link
            assert await client.call("gateway", "echo", {"x": 1}, target="d") == {"x": 1}

    body()


def test_hub(processes: Processes, signer: TokenSigner) -> None:
    (h,) = processes.start(
        ("hub", {"fs": proxy("s2"), "exec": {"mode": "proxy", "capability": "build"}}, [])
    )
    s1, s2, s3 = processes.start(
        ("s1", {"*": proxy("hub")}, [h]),
        ("s2", None, [h]),
        ("s3", None, [h]),
    )
    _ = s2, s3

    @async_test
    async def body() -> None:
        async with _client(s1.url, signer) as client:
            assert (await _read_whoami(client))["content"] == "s2"
            who = await client.call("gateway", "whoami", target="s3")
            assert who == {
                "environmentId": "s3",
                "runtimeId": who["runtimeId"],
                "routePath": ["client", "s1", "hub"],
                "capabilities": [],
            }
            # exec goes to whoever declares "build": nobody yet
            with pytest.raises(Exception, match="capability 'build'"):
                await client.call("exec", "run", {"argv": ["true"]})

    body()


def test_kill_a_middle_hop_mid_request(processes: Processes, signer: TokenSigner) -> None:
    (c,) = processes.start(("c", None, []))
    (b,) = processes.start(("b", {"*": proxy("c")}, [c]))
    (a,) = processes.start(("a", {"*": proxy("b")}, [b]))

    @async_test
    async def body() -> None:
        async with _client(a.url, signer) as client:
            script = "echo started; exec sleep 30"
            async with client.stream(
                "exec", "run", {"argv": ["sh", "-c", script]}, timeout=25
            ) as run:
                first = await run.__anext__()
                assert first["data"] == "started\n"
                t0 = time.monotonic()
                b.kill()
                with pytest.raises(Unavailable, match="b disconnected"):
                    async for _ in run:
                        pass
                # a waits one transport timeout (1.5 s) for b to come back, then answers
                assert time.monotonic() - t0 < 5.0
            # a is still up and answers what it can
            with pytest.raises(Exception, match="'b' is not connected"):
                await client.call("gateway", "whoami")

    body()
