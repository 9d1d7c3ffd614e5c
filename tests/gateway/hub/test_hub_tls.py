"""The hub's transport over TLS (issue 16): ``narrative serve`` with a self-signed or given
certificate, clients pinning its fingerprint or verifying it with a CA, plain ``ws://`` refused
off loopback. Real TLS handshakes on 127.0.0.1; stock ``openssl`` computes the fingerprints the
hub is checked against."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.client import GatewayClient
from gateway.errors import TlsError, Unavailable
from gateway.hub.events import RunEventLog
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub, control_token, find_hub, hub_tls_directory
from gateway.node import Gateway
from gateway.plugins import RemoteExecutionPlugin
from gateway.tls import ServerTls, self_signed_certificate
from gateway.tokens import TokenSigner
from narrative.errors import InvalidInput
from narrative.store import Store
from providers.manager import EnvironmentManager
from providers.registry import register, unregister
from providers.worktree import WorktreeProvider
from tests.conftest import NARRATIVE, Cli, store_dir_of
from tests.gateway.conftest import FAST, async_test

from .hub_support import types

# real servers and runtimes over TLS / in containers: make test-long (CI runs it), to keep
# make test under ten minutes
pytestmark = pytest.mark.long

PIN = re.compile(r"^sha256:[0-9a-f]{64}$")
WRONG = "sha256:" + "0" * 64


def openssl_fingerprint(cert: Path) -> str:
    """The certificate's SHA-256 fingerprint as stock openssl computes it, in our form."""
    out = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "sha256:" + out.strip().split("=", 1)[1].replace(":", "").lower()


@contextmanager
def serving(workspace: Path, *args: str) -> Iterator[tuple[dict[str, Any], Path]]:
    """``narrative serve --json ARGS`` in the background: its ready document and the file its
    stderr goes to."""
    err = workspace.parent / f"serve-{os.urandom(4).hex()}.err"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [NARRATIVE, "serve", "--port", "0", "--json", *args],
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    with proc.stdout:
        try:
            line = proc.stdout.readline()
            assert line, f"narrative serve exited: {err.read_text()}"
            yield json.loads(line), err
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def refused(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """``narrative ARGS``, which must end by itself (a server that starts instead is killed
    after a few seconds, failing the test rather than hanging it)."""
    try:
        return subprocess.run(
            [NARRATIVE, *args],
            cwd=cli.cwd,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"narrative {' '.join(args)} kept running") from None


@pytest.fixture
def hub_cli(cli: Cli) -> Cli:
    cli.run("init")
    cli.run("env", "create", "sandbox", "--provider", "worktree")
    return cli


async def _hub_runs(url: str, token: str, **trust: Any) -> Any:
    async with GatewayClient(url, token, limits=FAST, **trust) as client:
        return await client.call("hub", "runs", {}, target="hub")


def test_self_signed_hub_is_pinned_and_keeps_its_certificate(hub_cli: Cli, workspace: Path) -> None:
    store = Store.open(str(store_dir_of(workspace)))
    tls_dir = Path(hub_tls_directory(store))
    with serving(workspace, "--tls-self-signed") as (ready, _err):
        url, pin = ready["url"], ready["fingerprint"]
        assert url.startswith("wss://127.0.0.1:") and PIN.match(pin), ready
        assert pin == openssl_fingerprint(tls_dir / "cert.pem")
        assert (tls_dir / "key.pem").stat().st_mode & 0o777 == 0o600
        hub_file = find_hub(store)
        assert hub_file is not None
        assert (hub_file["url"], hub_file["fingerprint"]) == (url, pin)

        # the CLI dials the served hub over TLS, pinning what the hub file records
        run = json.loads(
            hub_cli.run(
                "run", "start", "--env", "sandbox", "--json", "--", "sh", "-c", "echo x > new.txt"
            ).stdout
        )
        assert run["status"] == "succeeded", run
        created = RunEventLog(store, run["id"]).read()[0]
        assert created["type"] == "run.created" and created["hub"]["url"] == url

        token = control_token(store, "test")
        assert asyncio.run(_hub_runs(url, token, fingerprint=pin)).keys() == {"runs"}
        # the AA:BB:.. form other tools print pins the same certificate
        colons = ":".join(re.findall("..", pin[7:].upper()))
        assert asyncio.run(_hub_runs(url, token, fingerprint=colons)).keys() == {"runs"}

        # a wrong pin: one line naming both fingerprints, exit 1
        res = hub_cli.run(
            "gateway", "call", "hub", "runs", "--url", url, "--token", token,
            "--target", "hub", "--fingerprint", WRONG, check=False,
        )  # fmt: skip
        assert res.returncode == 1, res
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert f"is {pin}, expected {WRONG}" in res.stderr
        # no pin, no CA that signed it: the certificate does not verify
        with pytest.raises(TlsError, match="cannot verify"):
            asyncio.run(_hub_runs(url, token))

    cert_bytes = (tls_dir / "cert.pem").read_bytes()
    with serving(workspace, "--tls-self-signed") as (again, _err):
        assert again["fingerprint"] == pin  # restarted: the same certificate
    assert (tls_dir / "cert.pem").read_bytes() == cert_bytes

    (tls_dir / "key.pem").chmod(0o644)
    res = refused(hub_cli, "serve", "--port", "0", "--tls-self-signed")
    assert res.returncode == 1 and "accessible to others" in res.stderr, res


def test_given_certificate_serves_wss_verified_by_its_ca(
    hub_cli: Cli, workspace: Path, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    store = Store.open(str(store_dir_of(workspace)))
    args = ("--tls-cert", str(cert), "--tls-key", str(key))
    with serving(workspace, *args) as (ready, _err):
        assert ready["url"].startswith("wss://") and ready["fingerprint"] == openssl_fingerprint(
            cert
        )
        token = control_token(store, "test")
        got = asyncio.run(_hub_runs(ready["url"], token, ca_file=str(cert)))
        assert got == {"runs": []}
        assert not (Path(hub_tls_directory(store)) / "key.pem").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "cannot load TLS"),
        (["--tls-cert", "README.md", "--tls-key", "README.md"], "cannot load TLS"),
        (["--host", "0.0.0.0"], "refusing to serve plain ws:// on 0.0.0.0"),
        (["--advertise-url", "http://x"], "must be a ws:// or wss:// URL"),
    ],
)
def test_serve_refuses_in_one_line(hub_cli: Cli, args: list[str], message: str) -> None:
    res = refused(hub_cli, "serve", "--port", "0", *args)
    assert res.returncode in (1, 2) and message in res.stderr, res
    assert "Traceback" not in res.stderr
    if res.returncode == 1:
        assert res.stderr.startswith("narrative: error:") and res.stderr.count("\n") == 1


def test_gateway_serve_refuses_plain_ws_off_loopback(cli: Cli) -> None:
    res = refused(cli, "gateway", "serve", "--host", "0.0.0.0", "--port", "0")
    assert res.returncode == 1 and "refusing to serve plain ws://" in res.stderr, res


def test_insecure_serves_plain_ws_off_loopback_with_a_warning(
    hub_cli: Cli, workspace: Path
) -> None:
    advertised = "ws://192.0.2.7:3100"
    with serving(workspace, "--host", "0.0.0.0", "--insecure", "--advertise-url", advertised) as (
        ready,
        err,
    ):
        assert ready["url"] == advertised and ready["fingerprint"] is None
        store = Store.open(str(store_dir_of(workspace)))
        hub_file = find_hub(store)
        assert hub_file is not None and hub_file["url"] == advertised
    assert "warning: serving plain ws:// on 0.0.0.0" in err.read_text()


@async_test
async def test_the_pin_is_checked_before_the_token_is_sent(tmp_path: Path) -> None:
    """A server that is not the pinned one never sees the upgrade request (which carries the
    token): the check fails the TLS handshake itself."""
    tls = ServerTls.load(*self_signed_certificate(str(tmp_path / "tls"), ["127.0.0.1"]))
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # called once a TLS handshake completed: never for a client that refused it
        received.append(await reader.read(4096))
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=tls.context)
    url = f"wss://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    token = TokenSigner(b"k" * 32).issue("run-1", "agent", 60)
    async with server:
        with pytest.raises(TlsError, match=f"is {tls.fingerprint}, expected {WRONG}"):
            await GatewayClient(url, token, fingerprint=WRONG, limits=FAST).connect()
        await asyncio.sleep(0.2)
        assert received == []
        # the pinned certificate: the upgrade request, token and all, goes through
        with pytest.raises(Unavailable):
            await GatewayClient(url, token, fingerprint=tls.fingerprint, limits=FAST).connect()
        assert received and received[0].startswith(b"GET ") and token.encode() in received[0]


@async_test
async def test_plain_ws_to_a_tls_server_fails_naming_the_likely_cause(tmp_path: Path) -> None:
    tls = ServerTls.load(*self_signed_certificate(str(tmp_path / "tls"), ["127.0.0.1"]))
    signer = TokenSigner(b"k" * 32)
    async with RemoteExecutionPlugin(Gateway("hub"), signer, port=0, ssl=tls.context) as plugin:
        plain = plugin.url.replace("wss://", "ws://")
        client = GatewayClient(plain, signer.issue("r", "agent", 60), limits=FAST)
        with pytest.raises(Unavailable, match="if the server serves TLS, dial wss://"):
            await client.connect()
        await client.close()


def test_malformed_fingerprint_is_one_clear_error() -> None:
    with pytest.raises(InvalidInput, match="not a SHA-256 certificate fingerprint"):
        GatewayClient("wss://127.0.0.1:1", TokenSigner(b"k" * 32).issue("r", "a", 60),
                      fingerprint="sha256:abc")  # fmt: skip


class TcpWorktreeProvider(WorktreeProvider):
    """The worktree provider without its unix socket: its runtime dials the hub's TCP address,
    as a runtime on another machine does."""

    def hub_socket(self, resource_id: str) -> None:
        return None


@pytest.fixture
def tcp_worktree() -> Iterator[str]:
    """The provider registered for one test only: left registered, it would be the default
    provider of later tests (it sorts before ``worktree``)."""
    register("tcp-worktree", TcpWorktreeProvider)
    yield "tcp-worktree"
    unregister("tcp-worktree")


def test_a_runtime_dials_a_tls_hub_over_tcp_pinning_its_certificate(
    store: Store, tmp_path: Path, tcp_worktree: str
) -> None:
    EnvironmentManager(store).create("far", provider="tcp-worktree", config={"sandbox": "none"})
    tls = ServerTls.load(*self_signed_certificate(str(tmp_path / "tls"), ["127.0.0.1"]))

    async def main() -> tuple[Any, list[dict[str, Any]], str]:
        async with Hub(store, tls=tls) as hub:
            run = await hub.submit(RunRequest("far", ["sh", "-c", "echo far > far.txt"]))
            final = await hub.wait(run.id)
            return final, RunEventLog(store, run.id).read(), hub.url

    final, events, url = asyncio.run(main())
    assert url.startswith("wss://127.0.0.1:")
    failure = [e for e in events if e["type"] in ("run.error", "runtime.log")]
    assert final.status == "succeeded", failure
    spawned = next(e for e in events if e["type"] == "runtime.spawned")
    assert spawned["argv"][-2:] == ["--connect", url]  # over TCP, with TLS
    assert tls.fingerprint not in json.dumps(spawned)  # the pin travels in the environment
    assert "runtime.connected" in types(events)
