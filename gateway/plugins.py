"""Plugins that claim a gateway. The RemoteExecutionPlugin turns a node into a hub: it claims
the gateway (so proxying is on) and runs the ProviderServer other environments connect to.
"""

from __future__ import annotations

import contextlib
import ssl as ssl_module
from types import TracebackType

from .errors import ClaimError
from .node import Gateway
from .server import DEFAULT_HOST, DEFAULT_PORT, ProviderServer
from .tokens import TokenSigner

__all__ = ["RemoteExecutionPlugin"]


class RemoteExecutionPlugin:
    """Claims ``gateway`` and serves it over WebSocket (default ``ws://127.0.0.1:3100``).

    Args:
        gateway: The node to claim.
        signer: Verifies the tokens of connecting environments.
        host: Interface to listen on.
        port: Port (0 picks a free one).
        ssl: TLS context (serves ``wss://``).
        run_id: Only accept tokens for this run, when set.

    Example::

        async with RemoteExecutionPlugin(gw, TokenSigner(key), port=0) as plugin:
            print(plugin.url)
    """

    name = "remote-execution"

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
        self.server = ProviderServer(gateway, signer, host=host, port=port, ssl=ssl, run_id=run_id)

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        """Claim the gateway, then listen.

        Raises:
            ClaimError: another plugin holds the gateway.
            OSError: the address is in use or not available.
        """
        self.gateway.claim(self)
        try:
            await self.server.start()
        except BaseException:
            self.gateway.relinquish(self)
            raise

    async def stop(self) -> None:
        """Stop serving and relinquish the claim."""
        await self.server.stop()
        with contextlib.suppress(ClaimError):  # stopped twice, or never started
            self.gateway.relinquish(self)

    async def __aenter__(self) -> RemoteExecutionPlugin:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
