"""The tools side of a run in a hybrid environment (:mod:`providers.hybrid`).

The agent of such a run runs in the hybrid environment's ``agent`` environment, like any run;
the capability calls its ``route`` names are served in its ``tools`` environment. For as long as
the run lasts the hub

* leases both component environments (no other run uses them meanwhile: :func:`lease_components`);
* starts in the tools environment a gateway node (``narrative gateway serve --connect HUB``)
  that dials the hub with a token of the run that grants nothing but the connection (no
  snapshot, no thread) and serves the built-in handlers there, confined to that environment's
  workspace (:class:`ToolsNode`);
* routes the routed calls there: the run's runtime sends them to the hub (rules merged into the
  run's routing) and the hub sends those from that runtime on to the tools node (rules for calls
  from that one peer, :meth:`gateway.node.Gateway.route_from`), so each call's recorded route
  reads ``<env>.agent → <env> → hub → <tools>``; and the run's event log records both rule sets;
* stops the node when the run ends (before the run's tokens are voided).

The hub is the relay rather than a direct link between the two environments because it is the
one node both can always reach (a container without a network reaches it through a unix socket;
a remote host by dialling out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from gateway.config import LocalRule, ProxyRule, Rule, parse_config, with_rules
from gateway.errors import ConfigError
from gateway.router import Router
from gateway.unix import unix_url
from narrative.errors import NarrativeError
from narrative.jsonio import parse_json
from narrative.objects import MODE_EXEC, MODE_FILE, parse_tree
from providers.errors import ProviderError
from providers.hybrid import HybridProvider, route_types
from providers.lifecycle import EnvState
from providers.manager import EnvironmentManager

from .events import RunEventLog
from .leases import EnvironmentBusy
from .leases import EnvironmentLease as Lease

if TYPE_CHECKING:
    from narrative.models import Snapshot
    from narrative.store import Store

    from .server import Hub

__all__ = ["ToolsNode", "lease_components", "snapshot_routing"]

log = logging.getLogger(__name__)

_STOP_WAIT = 5.0
_ROUTING_FILE = "proxyExecution.json"
#: Runs ``gateway serve`` with its (unused) listening key in the environment's temporary
#: directory and the workspace (the working directory) as the root of its handlers: both paths
#: are only known inside the environment.
_WRAPPER = (
    'NARRATIVE_GATEWAY_KEY="${TMPDIR:-/tmp}/narrative-tools-$$.key"; '
    'export NARRATIVE_GATEWAY_KEY; exec "$@" --root "$PWD"'
)


def lease_components(manager: EnvironmentManager, name: str, lease: Lease) -> None:
    """When ``name`` is a hybrid environment, lease its agent and tools environments too
    (``lease`` releases them with its own) and start them if they are not running.

    Raises:
        EnvironmentBusy: a run holds one of them (nothing stays leased then but ``lease``).
    """
    record = manager.get(name)
    provider = manager.provider(record)
    if not isinstance(provider, HybridProvider):
        return
    for component in (provider.component("agent"), provider.component("tools")):
        held = Lease.acquire(manager.store, component.id)
        if held is None:  # the caller releases ``lease``, and with it those taken so far
            raise EnvironmentBusy(component.name, Lease.holder(manager.store, component.id))
        lease.hold_too(held)
        if component.state is not EnvState.RUNNING:
            manager.start(component.id)


def snapshot_routing(store: Store, snapshot: Snapshot) -> dict[str, Any] | None:
    """The routing rules at the top of ``snapshot`` (its ``proxyExecution.json``, which a
    runtime restoring it would load), or None when it has none.

    Raises:
        ConfigError: the file is not JSON.
    """
    _kind, data = store.odb.read(bytes.fromhex(snapshot.tree))
    for name, mode, oid in parse_tree(data):
        if name == _ROUTING_FILE.encode() and mode in (MODE_FILE, MODE_EXEC):
            _kind, blob = store.odb.read(oid)
            where = f"{_ROUTING_FILE} of {snapshot.id}"
            try:
                document = parse_json(blob.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(where, f"not valid JSON: {exc}") from None
            if not isinstance(document, dict):
                raise ConfigError(where, "not a JSON object")
            return document
    return None


class ToolsNode:
    """The gateway node of one run in its hybrid environment's tools environment."""

    def __init__(self, hub: Hub, environment: str, run_id: str, events: RunEventLog) -> None:
        self.hub = hub
        self.environment = environment
        self.run_id = run_id
        self.events = events
        self.tools = ""
        """The tools environment's name (also the node's id on the gateway)."""
        self.route: list[str] = []
        self.handlers: list[str] = []
        self.handle: str | None = None
        self._socket: str | None = None
        self._runtime_peer: str | None = None

    @classmethod
    async def of(
        cls, hub: Hub, environment: str, run_id: str, events: RunEventLog
    ) -> ToolsNode | None:
        """The tools node a run in ``environment`` needs (None: not a hybrid environment)."""

        def find() -> tuple[str, list[str], list[str]] | None:
            provider = hub.manager.provider(hub.manager.get(environment))
            if not isinstance(provider, HybridProvider):
                return None
            config = provider.hybrid
            return provider.component("tools").name, list(config.route), list(config.handlers)

        found = await hub.blocking(find)
        if found is None:
            return None
        node = cls(hub, environment, run_id, events)
        node.tools, node.route, node.handlers = found
        return node

    async def start(
        self, runtime_peer: str, routing: dict[str, Any] | None, base: Snapshot, ttl: float
    ) -> dict[str, Any]:
        """Start the node (its token lives ``ttl`` seconds at most, and no longer than the
        run), wait for it to connect and route the calls of the run's runtime
        (``runtime_peer``) to it; returns the run's routing for its runtime: the given
        ``routing`` (None: the ``proxyExecution.json`` of ``base``, as a runtime would load
        it) with the routed keys sent to the hub.

        Raises:
            ProviderError: the node did not start or connect in time.
        """
        hub = self.hub
        manager = hub.manager

        def prepare() -> tuple[list[str], str | None, str | None]:
            _record, provider, resource = manager.require_active(self.tools)
            provider.end_leftovers(resource)  # an earlier run's node, say; the files stay
            found = provider.hub_socket(resource)
            argv = [*provider.runtime_command(), "gateway", "serve", "--port", "0"]
            argv += ["--env", self.tools]
            for kind in sorted(route_types(self.route)):
                argv += ["--capability", kind]
            for spec in self.handlers:
                argv += ["--handlers", spec]
            if found is None:
                return argv, None, None
            return argv, found.host_path, found.environment_path

        argv, host_path, env_path = await hub.blocking(prepare)
        url = await self._listen(host_path, env_path)
        argv = ["sh", "-c", _WRAPPER, "sh", *argv, "--connect", url]
        # scoped like a run's token, minus every read and write: it only lets the node connect
        token = hub.signer.issue(self.run_id, self.tools, ttl)
        env = {"NARRATIVE_TOKEN": token, "NARRATIVE_STORE": ""}
        self.handle = await hub.blocking(lambda: manager.spawn(self.tools, argv, env=env))
        self.events.append("tools.spawned", environment=self.tools, handle=self.handle, argv=argv)
        await self._await_connection()
        if routing is None:
            routing = await hub.blocking(lambda: snapshot_routing(hub.store, base))
        return self._install(runtime_peer, routing)

    async def _listen(self, host_path: str | None, env_path: str | None) -> str:
        """Listen on the tools environment's unix socket when it has one; the URL the node
        dials (that socket as the environment sees it, or the hub's TCP address)."""
        if host_path is None or env_path is None:
            return self.hub.url
        await self.hub.listen_unix(host_path)
        self._socket = host_path
        return unix_url(env_path)

    async def resume(self, runtime_peer: str, history: list[dict[str, Any]]) -> None:
        """Take over the node of an adopted run (an earlier hub started it): listen where it
        dials again and route the runtime's calls to it as that hub did. Its node keeps
        trying to reconnect; calls wait for it like for any peer that is away."""
        for event in history:
            if event.get("type") == "tools.spawned" and isinstance(event.get("handle"), str):
                self.handle = event["handle"]

        def socket() -> tuple[str | None, str | None]:
            _record, provider, resource = self.hub.manager.require_active(self.tools)
            found = provider.hub_socket(resource)
            return (found.host_path, found.environment_path) if found else (None, None)

        await self._listen(*(await self.hub.blocking(socket)))
        self._route(runtime_peer)
        self.events.append("tools.resumed", environment=self.tools, handle=self.handle)

    def _route(self, runtime_peer: str) -> dict[str, Rule]:
        """Send the routed calls from ``runtime_peer`` on to the node; the rules used."""
        hub = self.hub
        to_node: dict[str, Rule] = {
            key: ProxyRule(mode="proxy", environment=self.tools) for key in self.route
        }
        hub.gateway.route_from(runtime_peer, with_rules(hub.gateway.state.router.config, to_node))
        self._runtime_peer = runtime_peer
        # a call that names the node as its target is held to the route too
        routed: dict[str, Rule] = {key: LocalRule(mode="local") for key in self.route}
        hub.policy.route_to(self.tools, self.run_id, Router(parse_config({"rules": routed})))
        return to_node

    async def _await_connection(self) -> None:
        hub, handle = self.hub, self.handle
        assert handle is not None
        deadline = asyncio.get_running_loop().time() + hub.startup_timeout
        while not hub.gateway.state.connected(self.tools):
            if not await hub.blocking(lambda: hub.manager.alive(self.tools, handle)):
                tail = await hub.blocking(lambda: hub.manager.logs.runtime_tail(self.tools, handle))
                said = f": {tail[-1]}" if tail else ""
                raise ProviderError(f"the tools node in {self.tools!r} exited{said}")
            if asyncio.get_running_loop().time() > deadline:
                raise ProviderError(
                    f"the tools node in {self.tools!r} did not connect within "
                    f"{hub.startup_timeout:g}s"
                )
            await asyncio.sleep(0.1)

    def _install(self, runtime_peer: str, routing: dict[str, Any] | None) -> dict[str, Any]:
        hub = self.hub
        to_hub: dict[str, Rule] = {
            key: ProxyRule(mode="proxy", environment=hub.environment_id) for key in self.route
        }
        given = parse_config(routing or {}, "the run's routing rules")
        runtime_rules = with_rules(given, to_hub).model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_defaults=True
        )
        to_node = self._route(runtime_peer)
        self.events.append(
            "hybrid.routing",
            tools=self.tools,
            route=self.route,
            runtime=runtime_rules.get("rules", {}),
            hub={"from": runtime_peer, "rules": _dump_rules(to_node)},
        )
        return runtime_rules

    async def stop(self) -> None:
        """Stop routing to the node, end it (TERM, then KILL after a few seconds) and stop
        listening for it. Best effort: what fails is logged and recorded."""
        hub, handle = self.hub, self.handle
        if self._runtime_peer is not None:
            hub.gateway.route_from(self._runtime_peer, None)
            hub.policy.route_to(self.tools, self.run_id, None)
            self._runtime_peer = None
        if handle is not None:
            try:
                await self._end(handle)
                self.events.append("tools.stopped", environment=self.tools, handle=handle)
            except NarrativeError as exc:
                log.warning("cannot stop the tools node in %s: %s", self.tools, exc)
                self.events.append("tools.stop_failed", environment=self.tools, reason=str(exc))
            self.handle = None
        if self._socket is not None:
            with contextlib.suppress(OSError):
                await hub.close_unix(self._socket)
            self._socket = None

    async def _end(self, handle: str) -> None:
        hub, tools = self.hub, self.tools
        await hub.blocking(lambda: hub.manager.signal(tools, handle, "term"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOP_WAIT
        while await hub.blocking(lambda: hub.manager.alive(tools, handle)):
            if loop.time() > deadline:
                await hub.blocking(lambda: hub.manager.signal(tools, handle, "kill"))
                break
            await asyncio.sleep(0.1)


def _dump_rules(rules: dict[str, Rule]) -> dict[str, Any]:
    return {k: r.model_dump(exclude_none=True, exclude_defaults=True) for k, r in rules.items()}
