"""The gateway node: the thin asyncio shell around :class:`~gateway.state.GatewayState`.

It owns the WebSocket connections (accepted by :mod:`gateway.server` or dialled by
:meth:`Gateway.connect`), keeps the one timer the state asks for, and turns the state's actions
into I/O. Every decision is the state's; this module only moves bytes and schedules work, with
its parts in their own modules: :mod:`gateway.dispatch` (reading a connection and dispatching
each message), :mod:`gateway.access` (token claims of accepted connections),
:mod:`gateway.calls` (this process's own calls), :mod:`gateway.local` (handlers at work),
:mod:`gateway.provider_calls` (provider messages to neighbours), :mod:`gateway.connections`
and :mod:`gateway.observe`.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl as ssl_module
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.connection import Connection

from narrative.errors import validation_problem

from .access import ConnectionAccess, TokenPolicy
from .actions import (
    Action,
    CancelLocal,
    Deliver,
    DeliverNotification,
    DeliverPartial,
    NotifyLocal,
    RunLocal,
    Send,
)
from .calls import NotificationListener, OwnCalls
from .config import ProxyExecutionConfig
from .connections import Connections
from .dispatch import Dispatcher
from .errors import ClaimError, ProtocolError, Unavailable
from .handlers import Handler, HandlerContext, HandlerRegistry
from .limits import Limits
from .link import Link
from .local import LocalHandlers
from .observe import PeerEvents, PeerListener, RouteObserver, RouteTracker
from .protocol import Hello, Notification, ProviderMessage, ProviderResponse, Reply, Welcome
from .provider_calls import ProviderRequests
from .router import Router
from .state import GatewayState
from .stream import CallStream
from .tokens import TokenClaims

__all__ = ["Gateway"]


class Gateway:
    """One gateway node: local handlers, routing, and connections to peer gateways.

    Args:
        environment_id: This environment's id (what peers route to).
        runtime_id: This process's id (default: random).
        config: Routing rules (default: everything local).
        capabilities: Capabilities this environment declares to peers.
        limits: Timeouts and bounds.

    Raises:
        ProtocolError: a malformed environment id or capability name.

    Example::

        gw = Gateway("laptop")

        @gw.handler("math", "add")
        async def add(ctx, payload):
            return payload["a"] + payload["b"]

        assert await gw.call("math", "add", {"a": 1, "b": 2}) == 3
    """

    def __init__(
        self,
        environment_id: str,
        *,
        runtime_id: str | None = None,
        config: ProxyExecutionConfig | None = None,
        capabilities: Iterable[str] = (),
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.capabilities = sorted(set(capabilities))
        self.state = GatewayState(
            environment_id,
            runtime_id or f"rt-{secrets.token_hex(6)}",
            Router(config),
            self.limits,
        )
        try:  # what this node says in hello/welcome: refuse a bad identity now, not on connect
            self._hello = Hello(
                environmentId=environment_id,
                runtimeId=self.state.runtime_id,
                capabilities=self.capabilities,
            )
        except ValidationError as exc:
            raise ProtocolError(f"invalid gateway identity: {validation_problem(exc)}") from None
        self.handlers = HandlerRegistry()
        self._owner: object | None = None
        #: open connections to peers, by peer environment id
        self.connections = Connections()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._links: list[Link] = []
        #: token claims of accepted connections, and the checks calls from them pass
        self.access = ConnectionAccess(environment_id, self._spawn)
        #: route observers, and the requests watched for them
        self.routes = RouteTracker(self.state)
        #: provider messages sent to neighbours, waiting for their responses
        self.provider_requests = ProviderRequests(environment_id)
        self._peer_events = PeerEvents()
        self._calls = OwnCalls(self.state, self._apply, self.limits.max_pending)
        self._local = LocalHandlers(self.state, self.handlers, self._apply, self._spawn)
        self._dispatcher = Dispatcher(
            self.state,
            self.limits,
            self.access,
            self.routes,
            self.provider_requests,
            self._calls,
            self._apply,
            self._spawn,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self.handlers.register_inline("gateway", "echo", _echo)
        self.handlers.register_inline("gateway", "whoami", self._whoami)

    @property
    def token_policy(self) -> TokenPolicy | None:
        """Checks every call from an accepted connection (see :class:`~gateway.access.TokenPolicy`;
        None: any valid token may make any call)."""
        return self.access.policy

    @token_policy.setter
    def token_policy(self, policy: TokenPolicy | None) -> None:
        self.access.policy = policy

    @property
    def verify_token(self) -> Callable[[str], TokenClaims] | None:
        """Verifies the fresh token a peer presents with ``gateway:refresh`` (set by the server)."""
        return self.access.verify_token

    @verify_token.setter
    def verify_token(self, verify: Callable[[str], TokenClaims] | None) -> None:
        self.access.verify_token = verify

    # ------------------------------------------------------------------ identity and config

    @property
    def environment_id(self) -> str:
        return self.state.environment_id

    @property
    def runtime_id(self) -> str:
        return self.state.runtime_id

    def set_config(self, config: ProxyExecutionConfig) -> None:
        """Replace the routing rules (calls already routed are unaffected)."""
        self.state.router = Router(config)

    def route_from(self, peer: str, config: ProxyExecutionConfig | None) -> None:
        """Route the calls arriving from ``peer`` by ``config`` instead of this node's own rules
        (None: by its own rules again). A hub gives one run's runtime rules of its own so."""
        if config is None:
            self.state.peer_routers.pop(peer, None)
        else:
            self.state.peer_routers[peer] = Router(config)

    def handler(self, kind: str, action: str) -> Callable[[Handler], Handler]:
        """Decorator: register an ``async (ctx, payload) -> result`` handler for ``kind:action``
        (``action`` may be ``"*"``)."""
        return self.handlers.handler(kind, action)

    def peers(self) -> dict[str, list[str]]:
        """Reachable peer environments and the capabilities each declared."""
        return {p: sorted(c) for p, c in self.state.peers().items()}

    def peer_claims(self, peer: str) -> TokenClaims | None:
        """The verified token claims ``peer`` connected with.

        Returns:
            The claims of the peer's most recent accepted connection that is still open; None
            when the peer is not connected, or only by connections this node dialled (those
            present no token to us). Claims are forgotten when the connection closes.
        """
        for ws in reversed(self.connections.of(peer)):
            claims = self.access.claims_of(ws)
            if claims is not None:
                return claims
        return None

    # ------------------------------------------------------------------ claims

    @property
    def claimed_by(self) -> str | None:
        """The name of the plugin holding the gateway, or None."""
        if self._owner is None:
            return None
        return self._owner if isinstance(self._owner, str) else getattr(self._owner, "name", "?")

    def claim(self, owner: object) -> None:
        """Claim the gateway exclusively for ``owner`` (a plugin object, or a name); proxying is
        on while it is claimed. Claiming again with the same owner is a no-op.

        Raises:
            ClaimError: another owner holds it.
        """
        if self._owner is not None and self._owner is not owner:
            raise ClaimError(
                f"gateway {self.environment_id} is already claimed by {self.claimed_by}"
            )
        self._owner = owner
        self.state.proxying = True

    def relinquish(self, owner: object) -> None:
        """Give the claim back; proxying stops (calls already proxied finish).

        Raises:
            ClaimError: ``owner`` does not hold the claim.
        """
        if self._owner is None or self._owner is not owner:
            held = f"claimed by {self.claimed_by}" if self._owner is not None else "not claimed"
            raise ClaimError(f"cannot relinquish gateway {self.environment_id}: {held}")
        self._owner = None
        self.state.proxying = False

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        target: str | None = None,
        via: str | None = None,
    ) -> Any:
        """Make a capability call and return its final result.

        Args:
            kind: Capability family, e.g. ``"fs"``.
            action: Action, e.g. ``"readFile"``.
            payload: The handler's input (JSON-serializable).
            timeout: Execution budget in seconds, for the whole path (default
                ``limits.execution_timeout``).
            target: Run in exactly this environment.
            via: Send to this peer first, whatever the rules say.

        Raises:
            GatewayError: the subclass for the error code the call failed with (for example
                :class:`~gateway.errors.TargetNotFound`, :class:`~gateway.errors.GatewayTimeout`,
                :class:`~gateway.errors.Unavailable`); ``environment_id`` says where.
        """
        calls = self._calls
        async with calls.slots:
            request_id, pending, actions = calls.start(
                kind, action, payload, timeout, target, via, None
            )
            await self._apply(actions)
            return (await calls.wait(request_id, pending)).unwrap()

    def stream(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        target: str | None = None,
        via: str | None = None,
    ) -> CallStream:
        """Make a call whose partial results are iterated before its final result.

        Example::

            async with gw.stream("exec", "run", {"argv": ["make"]}) as call:
                async for part in call:
                    print(part["data"], end="")
            print(call.result["exitCode"])
        """
        return CallStream(self._calls, kind, action, payload, timeout, target, via)

    async def notify(self, kind: str, result: Any, *, peer: str | None = None) -> None:
        """Send a notification to one neighbour (or every connected one)."""
        note = Notification(originalType=kind, result=result, environmentId=self.environment_id)
        for name in [peer] if peer else self.connections.peers():
            await self.connections.send(name, note)

    def add_listener(self, listener: NotificationListener) -> None:
        """Receive notifications from neighbours and about this process's own calls."""
        self._calls.listeners.append(listener)

    def new_request_id(self) -> str:
        """A fresh request id, unique to this node (for :meth:`provider_request` messages)."""
        return self.state.new_id()

    async def provider_request(
        self, peer: str, message: ProviderMessage, *, timeout: float | None = None
    ) -> ProviderResponse:
        """Send a provider message to a connected neighbour and wait for its response.

        The message is sent as given; its ``requestId`` (see :meth:`new_request_id`) must not
        be waiting for an answer from ``peer`` already. The neighbour answers with the
        ``<type>Response`` carrying the same ``requestId`` (a gateway node maps the message to
        its ``provider:*`` / ``fs:*`` handlers, see the provider-facing messages in
        :mod:`gateway.protocol`).

        Args:
            peer: The neighbour's environment id.
            message: The provider message (``providerStart``, ``providerReadFile``, ...,
                ``heartbeat``).
            timeout: Seconds to wait for the response (default ``limits.execution_timeout``).

        Returns:
            The successful response (``result`` holds the handler's result).

        Raises:
            Unavailable: ``peer`` is not connected, or its connection closed before it answered.
            GatewayTimeout: no response within ``timeout``.
            ProtocolError: the id is already waiting for ``peer``, or the peer answered with a
                response of another type.
            GatewayError: the subclass for the error code of a response with ``success`` false
                (e.g. :class:`~gateway.errors.TargetNotFound`); ``environment_id`` is ``peer``.
        """
        ws = self.connections.latest(peer)
        if ws is None or self._closed:
            raise Unavailable(
                f"{peer} is not connected to {self.environment_id}",
                environment_id=self.environment_id,
            )
        budget = self.limits.execution_timeout if timeout is None else timeout
        return await self.provider_requests.ask(peer, ws, message, budget)

    def add_peer_listener(self, listener: PeerListener) -> None:
        """Learn when peers come and go: ``listener(peer, True)`` when a peer's first
        connection is up (after hello/welcome, accepted or dialled), ``listener(peer, False)``
        when its last connection closes. Nothing is reported for the connections that
        :meth:`close` itself shuts down. Exceptions are logged and otherwise ignored.
        """
        self._peer_events.add(listener)

    def remove_peer_listener(self, listener: PeerListener) -> None:
        """Stop calling ``listener`` (no error if it is not registered)."""
        self._peer_events.remove(listener)

    def add_route_observer(self, observer: RouteObserver) -> None:
        """Receive a :class:`~gateway.observe.RouteRecord` for every request a peer sends here,
        once, when its reply is sent back (refusals, timeouts and errors included; a cancel
        from the caller yields a record with ``error_code`` ``"cancelled"``). Only requests
        received while an observer is registered are recorded; calls made in this process
        (including provider messages relayed to local handlers) are not. Exceptions are
        logged and otherwise ignored.
        """
        self.routes.add(observer)

    def remove_route_observer(self, observer: RouteObserver) -> None:
        """Stop calling ``observer`` (no error if it is not registered)."""
        self.routes.remove(observer)

    # ------------------------------------------------------------------ connections

    async def connect(
        self,
        url: str,
        token: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        wait: bool = True,
    ) -> Link:
        """Dial a peer gateway and keep the connection up (reconnecting with backoff).

        Unanswered requests to that peer are resent on every reconnect; the peer answers each
        request id once.

        Args:
            url: ``ws://`` or ``wss://`` URL of the peer's server, or ``ws+unix://PATH`` of
                its unix socket (see :mod:`gateway.unix`).
            token: This environment's run-scoped token for that server.
            ssl: TLS context for ``wss://`` (default: the system's).
            wait: Wait until the first connection is up (or refused).

        Raises:
            AuthError: the peer refused the token.
            Unavailable: no connection within ``limits.transport_timeout`` (with ``wait``).
        """
        link = Link(self, url, token, ssl)
        self._links.append(link)
        link.start()
        if wait:
            await link.wait_connected(self.limits.transport_timeout)
        return link

    async def run_connection(
        self,
        ws: Connection,
        peer: str,
        capabilities: Iterable[str],
        *,
        claims: TokenClaims | None = None,
    ) -> None:
        """Serve one established connection to ``peer`` until it closes (hello done).

        Args:
            ws: The open connection.
            peer: The environment on the other end.
            capabilities: What it declared in its hello/welcome.
            claims: The verified token it connected with (accepted connections), for
                :meth:`peer_claims`.
        """
        first = self.connections.add(peer, ws)
        if claims is not None:
            self.access.admit(ws, claims)
        try:
            if first:
                await self._apply(self.state.peer_up(peer, capabilities))
                self._peer_events.report(peer, True)
            await self._dispatcher.read(ws, peer)
        finally:
            last = self.connections.remove(peer, ws)
            self.access.forget(ws)
            self.provider_requests.fail(ws, f"connection to {peer} closed before it answered")
            if last and not self._closed:
                await self._apply(self.state.peer_down(peer, self._now()))
                self._peer_events.report(peer, False)

    def hello(self) -> Hello:
        """This node's hello (what it says when it dials)."""
        return self._hello

    def welcome(self) -> Welcome:
        """This node's welcome (what it answers to a hello)."""
        return Welcome(
            environmentId=self.environment_id,
            runtimeId=self.runtime_id,
            capabilities=self.capabilities,
        )

    async def revoke(
        self,
        reason: str,
        *,
        run_id: str | None = None,
        token_id: str = "",
        subjects: frozenset[str] = frozenset(),
    ) -> int:
        """Close every accepted connection whose token is for ``run_id``, or is the token
        ``token_id``, or was issued to one of ``subjects`` (close code 1008, reason
        ``token revoked: <reason>``). The policy must refuse those tokens from now on too, or
        the peer simply reconnects.

        Returns:
            How many connections were closed.
        """
        return await self.access.revoke(reason, run_id=run_id, token_id=token_id, subjects=subjects)

    async def close(self) -> None:
        """Stop links, handlers and timers; fail the calls still waiting as unavailable."""
        self._closed = True
        self.access.close()
        for link in self._links:
            await link.close()
        for ws in self.connections.all():
            await ws.close()
        self._local.cancel_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._calls.fail_all(self.environment_id)
        self.provider_requests.fail(None, "gateway closed")
        self.routes.tracked.clear()
        if self._timer is not None:
            self._timer.cancel()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ the I/O shell

    async def _apply(self, actions: list[Action]) -> None:
        """Perform the actions the state returned (sends, local handlers, deliveries), then
        re-arm the timer for the state's next deadline."""
        for action in actions:
            if isinstance(action, Send):
                await self.connections.send(action.peer, action.message)
                if self.routes.tracked and type(action.message) is Reply:
                    self.routes.replied(action.peer, action.message)
            elif isinstance(action, Deliver):
                self._calls.deliver(action)
            elif isinstance(action, RunLocal):
                # an inline handler's reply: sent by this same loop (the list grows under it)
                actions.extend(self._local.run(action.key, action.request))
            elif isinstance(action, DeliverPartial):
                self._calls.deliver_partial(action)
            elif isinstance(action, CancelLocal):
                self._local.cancel(action.key)
            elif isinstance(action, NotifyLocal):
                self._local.notify(action.key, action.notification)
            elif isinstance(action, DeliverNotification):
                self._calls.deliver_notification(action)
        self._rearm()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as one of this node's tasks (cancelled by :meth:`close`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _rearm(self) -> None:
        # The earliest entry may be stale (its call finished); firing for it is harmless and
        # cheaper than cleaning the heap on every call.
        when = self.state.earliest_deadline()
        if when is None or (self._timer_at is not None and self._timer_at <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        actions = self.state.tick(self._now())
        if actions:
            self._spawn(self._apply(actions))
        else:
            self._rearm()

    def _whoami(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "environmentId": self.environment_id,
            "runtimeId": self.runtime_id,
            "routePath": ctx.route_path,
            "capabilities": self.capabilities,
        }


def _echo(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
    return payload
