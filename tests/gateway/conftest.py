"""Fixtures for gateway tests: a signing key, in-process servers on 127.0.0.1 port 0, gateway
processes started through the real CLI, and a runner for async test bodies."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from gateway.builtins import install_builtins
from gateway.limits import Limits
from gateway.node import Gateway
from gateway.plugins import RemoteExecutionPlugin
from gateway.tokens import TokenSigner, load_or_create_key
from tests.conftest import NARRATIVE

P = ParamSpec("P")
#: Hard ceiling for one async test body: a hang fails fast instead of eating the suite's time.
ASYNC_TIMEOUT = 30.0


def async_test(func: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an ``async def`` test body in a fresh event loop, with a timeout."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        async def main() -> None:
            await asyncio.wait_for(func(*args, **kwargs), ASYNC_TIMEOUT)  # type: ignore[arg-type]

        asyncio.run(main())

    return wrapper


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "gateway.key"


@pytest.fixture
def signer(key_path: Path) -> TokenSigner:
    return TokenSigner(load_or_create_key(key_path))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "root"
    d.mkdir()
    (d / "hello.txt").write_text("hello\n")
    return d


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl CLI)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


FAST = Limits(transport_timeout=1.0, execution_timeout=10.0)


@asynccontextmanager
async def hub(
    signer: TokenSigner,
    root: Path | None = None,
    env: str = "hub",
    limits: Limits = FAST,
    **kw: Any,
) -> AsyncIterator[tuple[Gateway, RemoteExecutionPlugin]]:
    """A gateway with the built-ins, claimed and served on 127.0.0.1:0."""
    node = Gateway(env, limits=limits, **kw)
    if root is not None:
        install_builtins(node.handlers, root)
    plugin = RemoteExecutionPlugin(node, signer, port=0)
    await plugin.start()
    try:
        yield node, plugin
    finally:
        await plugin.stop()
        await node.close()


# ----------------------------------------------------------------------------- processes


@dataclass
class GatewayProcess:
    """One ``narrative gateway serve`` child."""

    env: str
    proc: subprocess.Popen[str]
    url: str
    root: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class Processes:
    """Starts gateway processes through the real CLI and kills them all afterwards."""

    def __init__(self, tmp_path: Path, key_path: Path) -> None:
        self.tmp = tmp_path
        self.key = key_path
        self.started: list[GatewayProcess] = []

    def start(self, *specs: tuple[Any, ...]) -> list[GatewayProcess]:
        """Start one process per ``(env, rules, peers-to-dial[, extra CLI args])``, all at
        once; wait for each to print its ready line (its --connect links are up by then)."""
        pending = []
        for env, rules, peers, *more in specs:
            extra: tuple[str, ...] = more[0] if more else ()
            root = self.tmp / f"root-{env}"
            root.mkdir()
            (root / "whoami.txt").write_text(env)
            argv = [NARRATIVE, "gateway", "serve", "--port", "0", "--json", "--env", env]
            argv += ["--key-file", str(self.key), "--root", str(root)]
            argv += ["--transport-timeout", "1.5", *extra]
            if rules is not None:
                config = self.tmp / f"{env}.json"
                config.write_text(json.dumps({"rules": rules}))
                argv += ["--config", str(config)]
            for peer in peers:
                argv += ["--connect", peer.url]
            # stderr to a file, not a pipe nobody reads: a chatty child must never block
            with open(self.tmp / f"{env}.log", "w") as log:
                proc = subprocess.Popen(
                    argv,
                    cwd=root,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            pending.append((env, proc, root))
        out = []
        for env, proc, root in pending:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                err = (self.tmp / f"{env}.log").read_text()
                raise AssertionError(f"gateway {env} died: {err}")
            ready = json.loads(line)
            gp = GatewayProcess(env, proc, ready["url"], root)
            self.started.append(gp)
            out.append(gp)
        return out

    def stop_all(self) -> None:
        for gp in self.started:
            if gp.proc.poll() is None:
                gp.proc.terminate()
        deadline = time.monotonic() + 5
        for gp in self.started:
            try:
                gp.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                gp.kill()
            if gp.proc.stdout is not None:
                gp.proc.stdout.close()


@pytest.fixture
def processes(tmp_path: Path, key_path: Path, signer: TokenSigner) -> Iterator[Processes]:
    procs = Processes(tmp_path, key_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def proxy(*targets: str) -> dict[str, Any]:
    """A proxy rule to one environment, or a fan-out to several."""
    if len(targets) == 1:
        return {"mode": "proxy", "environment": targets[0]}
    return {"mode": "proxy", "environments": list(targets)}
