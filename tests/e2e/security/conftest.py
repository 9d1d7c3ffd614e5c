"""Fixtures for the adversarial suite: a real gateway over a real WebSocket, serving a root that
is the user's git repository, driven from test code as a synchronous client (so hypothesis and
threads can use it), plus an unguarded twin of the file actions for the negative controls."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from gateway.client import GatewayClient
from gateway.handlers import HandlerContext
from gateway.node import Gateway
from gateway.tokens import TokenSigner, load_or_create_key
from tests.gateway.conftest import FAST, hub

# The environments an agent attacks from are the providers of the contract suite, listed there
# once: a provider added to it is attacked by every suite here too.
from tests.providers.contract_targets import (  # noqa: F401  (re-exported to the attack suites)
    ISOLATED_PROVIDERS,
    docker_image_or_skip,
    env_create_args,
    over_isolated_providers,
    sandbox_or_skip,
)


class GatewayThread:
    """A hub serving ``root`` with the built-in handlers, and a client connected to it with a
    run token, both on an event loop in a background thread.

    ``call`` makes one call over the WebSocket and returns its result or raises its
    :mod:`gateway.errors` class, like an agent would see it.
    """

    def __init__(self, signer: TokenSigner, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self._ready: Future[None] = Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._serve(signer), self.loop)
        self._ready.result(timeout=30)

    async def _serve(self, signer: TokenSigner) -> None:
        self._stop = asyncio.Event()
        try:
            async with hub(signer, self.root) as (node, plugin):
                install_unguarded(node, self.root)
                token = signer.issue("run-1", "agent", 600)
                async with GatewayClient(plugin.url, token, limits=FAST) as client:
                    self.client = client
                    self._ready.set_result(None)
                    await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def call(self, kind: str, action: str, payload: dict[str, Any] | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(
            self.client.call(kind, action, payload or {}), self.loop
        )
        return future.result(timeout=30)

    def close(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._main.result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


def install_unguarded(node: Gateway, root: Path) -> None:
    """``unguarded:writeFile`` / ``unguarded:readFile``: the file actions as they were before
    the guards (check the resolved path, then open it by name), for the negative controls that
    show each attack really lands when nothing stops it."""
    real_root = os.path.realpath(root)

    def resolve(rel: str) -> str:
        real = os.path.realpath(os.path.join(real_root, rel))
        if real != real_root and not real.startswith(real_root + os.sep):
            raise PermissionError(f"escapes: {rel}")
        return real

    @node.handler("unguarded", "writeFile")
    async def write(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        path = resolve(payload["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:  # truncates in place: an executable hook stays executable
            f.write(base64.b64decode(payload["content"]))
        return {"path": payload["path"]}

    @node.handler("unguarded", "readFile")
    async def read(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        path = resolve(payload["path"])
        with open(path, "rb") as f:
            return {"content": base64.b64encode(f.read()).decode()}


@pytest.fixture
def signer(tmp_path: Path) -> TokenSigner:
    # the key lives outside the served root, as it must
    return TokenSigner(load_or_create_key(tmp_path / "keys" / "gateway.key"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The served root: the user's repository with one commit and an executable hook."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "README.md").write_text("# project\n")
    subprocess.run(["git", "add", "README.md"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True)
    hook = root / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\nexit 0\n")  # a hook the user installed (husky and friends)
    hook.chmod(0o755)
    return root


@pytest.fixture
def served(signer: TokenSigner, repo: Path) -> Iterator[GatewayThread]:
    gateway = GatewayThread(signer, repo)
    try:
        yield gateway
    finally:
        gateway.close()


def tree_digest(top: Path) -> dict[str, str]:
    """Every path below ``top`` (``.git`` included, symlinks not followed) with its type, mode
    and content hash: equal digests mean nothing there changed."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            rel = os.path.relpath(full, top)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = "link:" + os.readlink(full)
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                out[rel] = f"{oct(info.st_mode)}:{digest}"
            else:
                out[rel] = oct(info.st_mode)
    return out
