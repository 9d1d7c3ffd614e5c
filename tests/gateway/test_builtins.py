"""Built-in file and command handlers stay inside their root."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.errors import (
    AccessDenied,
    FrameTooLarge,
    GatewayTimeout,
    ProtocolError,
    TargetNotFound,
)
from gateway.node import Gateway
from tests.gateway.conftest import async_test


def _node(root: Path, **kw: object) -> Gateway:
    from gateway.builtins import install_builtins

    gw = Gateway("box")
    install_builtins(gw.handlers, root, **kw)  # type: ignore[arg-type]
    return gw


@async_test
async def test_file_handlers_roundtrip(root: Path) -> None:
    gw = _node(root)
    assert (await gw.call("fs", "readFile", {"path": "hello.txt"}))["content"] == "hello\n"
    await gw.call("fs", "writeFile", {"path": "a/b/c.txt", "content": "x"})
    assert (root / "a/b/c.txt").read_text() == "x"
    await gw.call("fs", "writeFile", {"path": "bin", "content": "AAEC", "encoding": "base64"})
    assert (root / "bin").read_bytes() == b"\x00\x01\x02"
    got = await gw.call("fs", "readFile", {"path": "bin", "encoding": "base64"})
    assert got["content"] == "AAEC" and got["size"] == 3
    listing = await gw.call("fs", "listFiles", {"recursive": True})
    assert [e["path"] for e in listing["entries"]] == ["a", "bin", "hello.txt", "a/b", "a/b/c.txt"]
    await gw.call("fs", "deleteFile", {"path": "a/b/c.txt"})
    assert not (root / "a/b/c.txt").exists()
    with pytest.raises(TargetNotFound):
        await gw.call("fs", "deleteFile", {"path": "a/b/c.txt"})
    with pytest.raises(TargetNotFound):
        await gw.call("fs", "readFile", {"path": "nope"})
    await gw.close()


@async_test
async def test_escaping_paths_are_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (root / "out").symlink_to(tmp_path)
    (root / "leak").symlink_to(outside)
    (root / ".narrative").mkdir()
    (root / ".narrative" / "gateway.key").write_text("k")
    gw = _node(root, deny=[root / ".narrative"])
    for path in ("../secret.txt", str(outside), "out/secret.txt", "a/../../secret.txt"):
        for action, extra in (
            ("readFile", {}),
            ("writeFile", {"content": "pwned"}),
            ("deleteFile", {}),
        ):
            with pytest.raises(AccessDenied):
                await gw.call("fs", action, {"path": path, **extra})
    # a symlink is never followed: reading refuses it, writing and deleting act on the link
    with pytest.raises(AccessDenied, match="symbolic link"):
        await gw.call("fs", "readFile", {"path": "leak"})
    await gw.call("fs", "writeFile", {"path": "leak", "content": "mine"})
    assert not (root / "leak").is_symlink() and (root / "leak").read_text() == "mine"
    (root / "leak").unlink()
    (root / "leak").symlink_to(outside)
    await gw.call("fs", "deleteFile", {"path": "leak"})
    assert not (root / "leak").is_symlink()
    with pytest.raises(AccessDenied, match="shadow store"):
        await gw.call("fs", "readFile", {"path": ".narrative/gateway.key"})
    (root / "gateway.key").write_text("k")
    gw2 = _node(root, deny=[root / "gateway.key"])
    with pytest.raises(AccessDenied, match="off limits"):
        await gw2.call("fs", "readFile", {"path": "gateway.key"})
    await gw2.close()
    with pytest.raises(AccessDenied):
        await gw.call("fs", "listFiles", {"path": ".."})
    with pytest.raises(AccessDenied):
        await gw.call("exec", "run", {"argv": ["pwd"], "cwd": "../"})
    listing = await gw.call("fs", "listFiles", {})
    assert ".narrative" not in [e["path"] for e in listing["entries"]]
    assert outside.read_text() == "secret"
    await gw.close()


@async_test
async def test_bad_arguments(root: Path) -> None:
    gw = _node(root, max_bytes=10)
    for payload in ({}, {"path": 3}, {"path": ""}, {"path": "a\x00b"}):
        with pytest.raises(ProtocolError):  # bad_request
            await gw.call("fs", "readFile", payload)
    with pytest.raises(FrameTooLarge):
        await gw.call("fs", "writeFile", {"path": "big", "content": "x" * 11})
    (root / "big").write_text("x" * 11)
    with pytest.raises(FrameTooLarge):
        await gw.call("fs", "readFile", {"path": "big"})
    for argv in (None, [], "ls", [1]):
        with pytest.raises(Exception, match="argv"):
            await gw.call("exec", "run", {"argv": argv})
    with pytest.raises(TargetNotFound, match="command not found"):
        await gw.call("exec", "run", {"argv": ["/no/such/binary"]})
    await gw.close()


@async_test
async def test_exec_streams_output_and_exit_code(root: Path) -> None:
    gw = _node(root)
    async with gw.stream(
        "exec", "run", {"argv": ["sh", "-c", "echo one; echo two >&2; cat; exit 3"], "stdin": "in"}
    ) as call:
        parts = [p async for p in call]
    assert {"stream": "stdout", "data": "one\n"} in parts
    assert {"stream": "stderr", "data": "two\n"} in parts
    assert call.result == {"exitCode": 3, "stdout": "one\nin", "stderr": "two\n"}
    assert (await gw.call("exec", "run", {"argv": ["pwd"]}))["stdout"].strip() == str(
        root.resolve()
    )
    await gw.close()


@async_test
async def test_exec_timeout_kills_the_command(root: Path) -> None:
    gw = _node(root)
    marker = root / "pid"
    with pytest.raises(GatewayTimeout):
        await gw.call(
            "exec", "run", {"argv": ["sh", "-c", f"echo $$ > {marker}; exec sleep 30"]}, timeout=0.5
        )
    pid = int(marker.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the command outlived its call")
    await gw.close()
