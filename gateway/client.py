"""A small client for agents: connect to a gateway with a token and call capabilities.

The client is itself a gateway node (named by its token's environment), so it can also serve
calls the hub routes to it (register handlers with :meth:`GatewayClient.handler`); its own calls
all go to the hub first, which routes them by its rules or to an explicit ``target``.

Example::

    async with GatewayClient("ws://127.0.0.1:3100", token) as client:
        text = (await client.call("fs", "readFile", {"path": "README.md"}))["content"]
        async with client.stream("exec", "run", {"argv": ["pytest", "-q"]}) as run:
            async for part in run:
                print(part["data"], end="")
"""

from __future__ import annotations

import base64
import binascii
import ssl as ssl_module
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from narrative.jsonio import parse_json

from .calls import NotificationListener
from .errors import TokenInvalid
from .handlers import Handler
from .limits import Limits
from .node import Gateway
from .stream import CallStream
from .tls import client_ssl_context

__all__ = ["GatewayClient", "token_environment"]


def token_environment(token: str) -> str:
    """The environment a token names (read without verifying: only the server can verify).

    Raises:
        TokenInvalid: the token is not well-formed.
    """
    try:
        body = token.split(".")[1]
        data = parse_json(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        env = data["env"]
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        raise TokenInvalid("malformed token") from None
    if not isinstance(env, str):
        raise TokenInvalid("malformed token")
    return env


class GatewayClient:
    """A connection to one gateway, for making calls.

    Args:
        url: ``ws://`` or ``wss://`` URL of the gateway.
        token: A run-scoped token for this client's environment (``narrative gateway token``).
        capabilities: Capabilities this client declares (so the hub can route to it).
        ssl: TLS context for ``wss://`` (default: built by
            :func:`gateway.tls.client_ssl_context` from ``fingerprint`` and ``ca_file``).
        fingerprint: The server certificate's pinned SHA-256 fingerprint (``wss://`` only).
        ca_file: CA file to verify the server's certificate with, when none is pinned
            (default: the system's trust store).
        limits: Timeouts and bounds (``transport_timeout`` bounds connecting).
    """

    name = "client"

    def __init__(
        self,
        url: str,
        token: str,
        *,
        capabilities: Iterable[str] = (),
        ssl: ssl_module.SSLContext | None = None,
        fingerprint: str | None = None,
        ca_file: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.url = url
        self.gateway = Gateway(token_environment(token), capabilities=capabilities, limits=limits)
        self._token = token
        self._ssl = ssl or client_ssl_context(url, fingerprint=fingerprint, ca_file=ca_file)
        self.server: str | None = None

    async def connect(self) -> str:
        """Connect (and keep reconnecting); return the gateway's environment id.

        Raises:
            AuthError: the token was refused.
            TlsError: the server's certificate is not the pinned one, or does not verify.
            Unavailable: no connection within the transport timeout.
        """
        self.gateway.claim(self)
        link = await self.gateway.connect(self.url, self._token, ssl=self._ssl)
        self.server = link.peer
        return self.server or ""

    async def close(self) -> None:
        """Close the connection; calls still waiting fail as unavailable."""
        await self.gateway.close()

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        target: str | None = None,
    ) -> Any:
        """Call ``kind:action`` through the gateway and return the final result.

        Args:
            kind: Capability family, e.g. ``"fs"``.
            action: Action, e.g. ``"readFile"``.
            payload: The handler's input.
            timeout: Execution budget in seconds for the whole path.
            target: Run in exactly this environment.

        Raises:
            GatewayError: the subclass for the call's error code.
        """
        return await self.gateway.call(
            kind, action, payload, timeout=timeout, target=target, via=self.server
        )

    def stream(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        target: str | None = None,
    ) -> CallStream:
        """Like :meth:`call`, iterating partial results first (see :meth:`Gateway.stream`)."""
        return self.gateway.stream(
            kind, action, payload, timeout=timeout, target=target, via=self.server
        )

    def handler(self, kind: str, action: str) -> Callable[[Handler], Handler]:
        """Register a handler for calls the hub routes to this client."""
        return self.gateway.handler(kind, action)

    def add_listener(self, listener: NotificationListener) -> None:
        """Receive notifications from the gateway."""
        self.gateway.add_listener(listener)

    async def notify(self, kind: str, result: Any) -> None:
        """Send a notification to the gateway."""
        await self.gateway.notify(kind, result)
