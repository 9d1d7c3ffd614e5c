"""The ProviderServer: a WebSocket server that admits peers with a run-scoped token and hands
each connection to a :class:`~gateway.node.Gateway`.

The token is checked during the HTTP upgrade (``Authorization: Bearer <token>``): a missing,
forged, expired, wrong-audience or wrong-run token, or one the gateway's
:class:`~gateway.access.TokenPolicy` refuses (its run ended), gets HTTP 401 and the WebSocket is
never opened, so no message from an unauthenticated client is ever parsed. After the upgrade
the peer must send a hello for the environment its token names, within the transport timeout;
from then on the gateway holds every call to the token and closes the connection when the
token expires or is revoked.

Besides its TCP port, the server may listen on unix sockets (:meth:`ProviderServer.listen_unix`,
addresses ``ws+unix://PATH``, see :mod:`gateway.unix`), with the same handshake and checks: how
a runtime in an environment without a network reaches its hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl as ssl_module
from http import HTTPStatus
from typing import Any
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from .errors import AuthError, ProtocolError, TokenExpired
from .node import Gateway
from .protocol import Hello, dump, parse_message
from .tokens import TokenClaims, TokenSigner, is_expired
from .unix import bind_unix, unix_url

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ProviderServer", "bearer_token"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3100


def bearer_token(headers: Headers) -> str | None:
    """The token in an ``Authorization: Bearer`` header, or None."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class ProviderServer:
    """Accepts peer gateways and providers for one :class:`Gateway`.

    Args:
        gateway: The node the connections are attached to.
        signer: Verifies the tokens connections present.
        host: Interface to listen on (default loopback).
        port: Port (0 picks a free one; see :attr:`port`).
        ssl: TLS context to serve ``wss://``.
        run_id: When set, only tokens for this run are accepted.
    """

    def __init__(
        self,
        gateway: Gateway,
        signer: TokenSigner,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        ssl: ssl_module.SSLContext | None = None,
        run_id: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.signer = signer
        self.host = host
        self.port = port
        self.ssl = ssl
        self.run_id = run_id
        self._server: Server | None = None
        self._unix: dict[str, Server] = {}
        #: claims verified at a connection's upgrade, until its handler takes them (the token
        #: is verified once per connection; gone with the connection if the handshake fails)
        self._admitted: WeakKeyDictionary[ServerConnection, TokenClaims] = WeakKeyDictionary()
        gateway.verify_token = lambda token: signer.verify(token, run_id=run_id)

    @property
    def url(self) -> str:
        """The URL peers connect to."""
        scheme = "wss" if self.ssl else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; with port 0, :attr:`port` becomes the port chosen."""
        self._server = await serve(self._handle, self.host, self.port, **self._options())
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("gateway %s listening on %s", self.gateway.environment_id, self.url)

    def _options(self) -> dict[str, Any]:
        limits = self.gateway.limits
        return {
            "ssl": self.ssl,
            "process_request": self._authorize,
            **limits.websocket_options(),
        }

    async def listen_unix(self, path: str) -> str:
        """Also listen on the unix socket ``path`` (replacing a stale socket there); its URL.
        Listening on a path already served is a no-op.

        Raises:
            OSError: the socket cannot be bound (missing directory, something else there).
        """
        if path not in self._unix:
            # plain WebSocket: the socket never leaves this machine
            options = {**self._options(), "ssl": None}
            self._unix[path] = await unix_serve(self._handle, sock=bind_unix(path), **options)
            log.info("gateway %s listening on %s", self.gateway.environment_id, unix_url(path))
        return unix_url(path)

    async def close_unix(self, path: str) -> None:
        """Stop listening on the unix socket ``path``, close its connections, remove it."""
        server = self._unix.pop(path, None)
        if server is None:
            return
        server.close()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def stop(self) -> None:
        """Stop listening and close every connection (unix sockets stay in place: a server
        started later, adopting the runs, listens on them again)."""
        for server in self._unix.values():
            server.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for server in self._unix.values():
            await server.wait_closed()
        self._unix.clear()

    def _verify(self, headers: Headers) -> TokenClaims:
        return self.signer.verify(bearer_token(headers), run_id=self.run_id)

    async def _authorize(self, conn: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        claims: TokenClaims | None = None
        try:
            claims = self._verify(request.headers)
            if self.gateway.token_policy is not None:
                await self.gateway.token_policy.admit(claims)
        except AuthError as exc:
            if claims is None:
                log.warning("refused a connection from %s: %s", conn.remote_address, exc)
            else:
                log.warning(
                    "refused a connection from %s: run %s, env %s: %s",
                    conn.remote_address,
                    claims.run_id,
                    claims.environment_id,
                    exc,
                )
            return conn.respond(HTTPStatus.UNAUTHORIZED, f"{exc}\n")
        self._admitted[conn] = claims
        return None

    async def _handle(self, conn: ServerConnection) -> None:
        gw = self.gateway
        try:
            claims = self._admitted.pop(conn, None)
            if claims is None:  # not through _authorize: cannot happen, but verify then
                assert conn.request is not None  # set once the handshake completed
                claims = self._verify(conn.request.headers)
            elif is_expired(claims.expires_at):  # expired since the upgrade
                raise TokenExpired(f"token for {claims.environment_id} expired")
            frame = await asyncio.wait_for(conn.recv(), gw.limits.transport_timeout)
            hello = parse_message(frame)
            if not isinstance(hello, Hello):
                raise ProtocolError(f"expected a hello, got {hello.type}")
            if hello.environmentId != claims.environment_id:
                raise AuthError(
                    f"hello from {hello.environmentId!r} with a token for {claims.environment_id!r}"
                )
            if hello.environmentId == gw.environment_id:
                raise ProtocolError(f"{hello.environmentId!r} is this gateway's own id")
        except (AuthError, ProtocolError) as exc:
            log.warning("closing connection from %s: %s", conn.remote_address, exc)
            await conn.close(1008, str(exc)[:120])
            return
        except (TimeoutError, ConnectionClosed):
            await conn.close(1008, "no hello in time")
            return
        with contextlib.suppress(ConnectionClosed):
            await conn.send(dump(gw.welcome()))
            await gw.run_connection(conn, hello.environmentId, hello.capabilities, claims=claims)
