"""A dialled connection to a peer gateway, kept up with reconnects (``Gateway.connect``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections.abc import Iterable
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .errors import GatewayError, ProtocolError, TokenInvalid, Unavailable
from .limits import Limits
from .protocol import Hello, Welcome, dump, parse_message
from .tls import tls_failure
from .unix import dialable_path, unix_socket_path

__all__ = ["Link", "LinkHost"]

log = logging.getLogger(__name__)


class LinkHost(Protocol):
    """What a link needs of the node it serves (a :class:`~gateway.node.Gateway`)."""

    limits: Limits

    def hello(self) -> Hello:
        """What the node says when it dials."""

    async def run_connection(
        self, ws: ClientConnection, peer: str, capabilities: Iterable[str]
    ) -> None:
        """Serve the established connection until it closes."""


class Link:
    """A dialled connection to a peer gateway, kept up with reconnects (see
    :meth:`Gateway.connect`)."""

    def __init__(
        self, gateway: LinkHost, url: str, token: str, ssl: ssl_module.SSLContext | None
    ) -> None:
        self.gateway = gateway
        self.url = url
        self._token = token
        self._ssl = ssl
        self.peer: str | None = None
        self.error: GatewayError | None = None
        self._last_failure = ""
        self._up = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None

    def set_token(self, token: str) -> None:
        """Use ``token`` from the next reconnect on (the current connection stays as it is)."""
        self._token = token

    async def drop(self) -> None:
        """Close the current connection (a reconnect follows): for a connection that looks
        open but no longer answers."""
        if self._ws is not None:
            await self._ws.close()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, timeout: float) -> str:
        """Wait for the connection; return the peer's environment id.

        Raises:
            AuthError: the peer refused the token (the link gives up).
            Unavailable: not connected within ``timeout`` seconds.
        """
        up = asyncio.ensure_future(self._up.wait())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({up, done}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            done.cancel()
        if self.error is not None:
            raise self.error
        if not self._up.is_set() or self.peer is None:
            why = f" (last attempt: {self._last_failure})" if self._last_failure else ""
            raise Unavailable(f"cannot connect to {self.url} within {timeout:g}s{why}")
        return self.peer

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._done.set()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        gw = self.gateway
        limits = gw.limits
        delay = 0.05
        while not self._done.is_set():
            try:
                # wss:// without a context of ours: websockets uses the system's trust store.
                tls: dict[str, Any] = (
                    {"ssl": self._ssl} if self._ssl and self.url.startswith("wss:") else {}
                )
                options: dict[str, Any] = {
                    "additional_headers": {"Authorization": f"Bearer {self._token}"},
                    **limits.websocket_options(),
                }
                async with contextlib.AsyncExitStack() as stack:
                    socket_path = unix_socket_path(self.url)
                    if socket_path is not None:
                        address = stack.enter_context(dialable_path(socket_path))
                        dial = unix_connect(address, "ws://localhost/", **options)
                    else:
                        dial = connect(self.url, **tls, proxy=None, **options)
                    ws = await stack.enter_async_context(dial)
                    self._ws = ws
                    await ws.send(dump(gw.hello()))
                    frame = await asyncio.wait_for(ws.recv(), limits.transport_timeout)
                    welcome = parse_message(frame)
                    if not isinstance(welcome, Welcome):
                        raise ProtocolError(f"expected a welcome, got {welcome.type}")
                    self.peer = welcome.environmentId
                    self._up.set()
                    delay = 0.05
                    log.info("connected to %s at %s", self.peer, self.url)
                    await gw.run_connection(ws, welcome.environmentId, welcome.capabilities)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    body = exc.response.body.decode("utf-8", "replace").strip()[:200]
                    self.error = TokenInvalid(f"{self.url} refused the token: {body}")
                    self._done.set()
                    return
                self._last_failure = f"HTTP {status}"
                log.warning("connecting to %s: HTTP %s", self.url, status)
            except ssl_module.SSLCertVerificationError as exc:
                # not the pinned certificate, or one that does not verify: retrying would
                # meet the same one (and a token must never go to it)
                self.error = tls_failure(self.url, exc)
                self._done.set()
                return
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, GatewayError) as exc:
                self._last_failure = _failure_text(self.url, exc)
                log.info("link to %s: %s", self.url, self._last_failure)
            finally:
                self._ws = None
                self._up.clear()
            if self._done.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), delay)
            delay = min(delay * 2, 2.0)


def _failure_text(url: str, exc: BaseException) -> str:
    """Why a connection attempt failed, in words (with a hint when the URL's scheme is
    likely the wrong one for the server)."""
    if isinstance(exc, ssl_module.SSLError):
        return str(tls_failure(url, exc))
    text = str(exc) or type(exc).__name__
    if isinstance(exc, InvalidHandshake) and url.startswith("ws://"):
        text += "; if the server serves TLS, dial wss://"
    return text
