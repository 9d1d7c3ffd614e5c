"""The Proxy Execution Gateway: decides per capability call whether it runs here or in another
environment, and chains environments in any topology (linear, fan-out, tree, mesh, hub).

Layers, bottom up: :mod:`gateway.protocol` (wire messages), :mod:`gateway.config`
(``proxyExecution.json``), :mod:`gateway.router` and :mod:`gateway.state` (every decision,
free of I/O, returned as :mod:`gateway.actions`; bounds in :mod:`gateway.limits`),
:mod:`gateway.tokens` (run-scoped HMAC tokens), :mod:`gateway.handlers` and
:mod:`gateway.builtins` (local work), then the asyncio shell: :mod:`gateway.node`
(with :mod:`gateway.observe`: route records and peer events), :mod:`gateway.server`,
:mod:`gateway.plugins` and :mod:`gateway.client`.

Every error is a :class:`GatewayError` (the tree is in :mod:`gateway.errors`). Names are
imported lazily, so ``import gateway.errors`` stays cheap. The control plane that coordinates
environments through the gateway is :mod:`gateway.hub`, the only part that knows providers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from narrative.lazy import lazy_exports

if TYPE_CHECKING:
    from .builtins import Confined, install_builtins
    from .client import GatewayClient
    from .config import ProxyExecutionConfig, load_config
    from .errors import GatewayError
    from .handlers import HandlerContext
    from .limits import Limits
    from .link import Link
    from .node import Gateway
    from .observe import RouteRecord
    from .plugins import RemoteExecutionPlugin
    from .router import Router
    from .server import ProviderServer
    from .stream import CallStream
    from .tokens import TokenClaims, TokenSigner, load_or_create_key

__all__ = [
    "CallStream",
    "Confined",
    "Gateway",
    "GatewayClient",
    "GatewayError",
    "HandlerContext",
    "Limits",
    "Link",
    "ProviderServer",
    "ProxyExecutionConfig",
    "RemoteExecutionPlugin",
    "RouteRecord",
    "Router",
    "TokenClaims",
    "TokenSigner",
    "install_builtins",
    "load_config",
    "load_or_create_key",
]

_HOME = {
    "CallStream": "stream",
    "Confined": "builtins",
    "Gateway": "node",
    "GatewayClient": "client",
    "GatewayError": "errors",
    "HandlerContext": "handlers",
    "Limits": "limits",
    "Link": "link",
    "ProviderServer": "server",
    "ProxyExecutionConfig": "config",
    "RemoteExecutionPlugin": "plugins",
    "RouteRecord": "observe",
    "Router": "router",
    "TokenClaims": "tokens",
    "TokenSigner": "tokens",
    "install_builtins": "builtins",
    "load_config": "config",
    "load_or_create_key": "tokens",
}


__getattr__ = lazy_exports(__name__, _HOME)
