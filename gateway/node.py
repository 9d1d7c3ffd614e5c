"""The gateway node: the thin asyncio shell around :class:`~gateway.state.GatewayState`.

It owns the WebSocket connections (accepted by :mod:`gateway.server` or dialled by
:meth:`Gateway.connect`), runs local handlers as tasks, keeps the one timer the state asks for,
and turns the state's actions into I/O. Every decision is the state's; this module only moves
bytes and schedules work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_json
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from narrative.errors import validation_problem

from .actions import (
    Action,
    CancelLocal,
    Deliver,
    DeliverNotification,
    DeliverPartial,
    Key,
    NotifyLocal,
    Outcome,
    RunLocal,
    Send,
)
from .config import ProxyExecutionConfig
from .errors import (
    AuthError,
    ClaimError,
    GatewayError,
    GatewayTimeout,
    ProtocolError,
    TokenExpired,
    TokenInvalid,
    Unavailable,
    error_from_wire,
)
from .handlers import Handler, HandlerContext, HandlerRegistry, error_body
from .limits import Limits
from .observe import PeerListener, RouteObserver, RouteRecord
from .protocol import (
    PROVIDER_TYPES,
    Cancel,
    ErrorBody,
    Heartbeat,
    Hello,
    Notification,
    Partial,
    ProviderAgentStart,
    ProviderDeleteFile,
    ProviderMessage,
    ProviderReadFile,
    ProviderResponse,
    ProviderStart,
    ProviderStop,
    ProviderWriteFile,
    Reply,
    Request,
    Welcome,
    dump,
    parse_message,
)
from .router import Router
from .state import GatewayState
from .tokens import TokenClaims

__all__ = [
    "CallStream",
    "Gateway",
    "Link",
    "NotificationListener",
    "PeerListener",
    "RouteObserver",
    "RouteRecord",
    "TokenPolicy",
]

# Re-exported: they are part of this module's API (Gateway.stream / Gateway.connect return them).
from .link import Link
from .stream import CallStream

log = logging.getLogger(__name__)

#: ``listener(peer or None, notification)``; peer is None for notifications about own calls.
NotificationListener = Callable[[str | None, Notification], None]

_PARTIAL_QUEUE = 1024


class TokenPolicy(Protocol):
    """What the holder of a verified token may do on this node, beyond the token itself.

    A node without a policy lets any valid token make any call; a hub installs one that keeps
    each run to its own threads and refuses the tokens of runs that ended.
    """

    async def admit(self, claims: TokenClaims) -> None:
        """Raise an :class:`~gateway.errors.AuthError` to refuse a connection at its upgrade
        (may look at the store: a run that ended stays refused after a restart)."""

    def authorize(
        self,
        claims: TokenClaims,
        kind: str,
        action: str,
        payload: dict[str, Any],
        target: str | None,
    ) -> None:
        """Raise an :class:`~gateway.errors.AuthError` to refuse one call (``kind:action`` with
        ``payload``, for ``target``) from a connection that presented ``claims``."""


@dataclass(eq=False)
class _Pending:
    """A call this process is waiting on."""

    future: asyncio.Future[Outcome]
    partials: asyncio.Queue[Partial] | None = None
    notes: asyncio.Queue[Notification] | None = None


@dataclass(eq=False, slots=True)
class _Asked:
    """A provider message sent to a neighbour, waiting for its ``<type>Response``."""

    ws: Connection
    future: asyncio.Future[Any]
    response: type[Any]


@dataclass(eq=False, slots=True)
class _Track:
    """A request from a peer being watched for route observers, until its reply is sent."""

    request: Request
    start: float
    hops: list[str]


@dataclass(eq=False, slots=True)
class _Running:
    """A local handler at work, and the notifications its caller sent down to it."""

    task: asyncio.Task[None] | None = None
    #: made on first use: most calls never see a notification from their caller
    _inbox: asyncio.Queue[Notification] | None = None

    def inbox(self) -> asyncio.Queue[Notification]:
        if self._inbox is None:
            self._inbox = asyncio.Queue(_PARTIAL_QUEUE)
        return self._inbox


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
        self._conns: dict[str, list[Connection]] = {}
        self._pending: dict[str, _Pending] = {}
        self._running: dict[Key, _Running] = {}
        self._listeners: list[NotificationListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._links: list[Link] = []
        #: token claims of accepted connections (dialled ones have none)
        self._claims: dict[Connection, TokenClaims] = {}
        #: closes an accepted connection when its token expires (re-armed by :meth:`refresh`)
        self._expiry: dict[Connection, asyncio.TimerHandle] = {}
        #: checks every call from an accepted connection (see :class:`TokenPolicy`)
        self.token_policy: TokenPolicy | None = None
        #: verifies the fresh token a peer presents with ``gateway:refresh`` (set by the server)
        self.verify_token: Callable[[str], TokenClaims] | None = None
        self._peer_listeners: list[PeerListener] = []
        self._observers: list[RouteObserver] = []
        #: requests from peers awaiting their reply, only while route observers are registered
        self._tracked: dict[Key, _Track] = {}
        #: (peer, requestId) -> provider message awaiting its response
        self._asked: dict[tuple[str, str], _Asked] = {}
        # Bounds this process's outstanding calls (the caller waits: backpressure, not errors).
        self._slots = asyncio.Semaphore(self.limits.max_pending)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self.handlers.register("gateway", "echo", _echo)
        self.handlers.register("gateway", "whoami", self._whoami)

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
        for ws in reversed(self._conns.get(peer, ())):
            claims = self._claims.get(ws)
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
        async with self._slots:
            request_id, pending, actions = self._start(
                kind, action, payload, timeout, target, via, None
            )
            await self._apply(actions)
            return (await self._wait(request_id, pending)).unwrap()

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
        return CallStream(self, kind, action, payload, timeout, target, via)

    async def notify(self, kind: str, result: Any, *, peer: str | None = None) -> None:
        """Send a notification to one neighbour (or every connected one)."""
        note = Notification(originalType=kind, result=result, environmentId=self.environment_id)
        for name in [peer] if peer else list(self._conns):
            await self._send(name, note)

    def add_listener(self, listener: NotificationListener) -> None:
        """Receive notifications from neighbours and about this process's own calls."""
        self._listeners.append(listener)

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
        conns = self._conns.get(peer)
        if not conns or self._closed:
            raise Unavailable(
                f"{peer} is not connected to {self.environment_id}",
                environment_id=self.environment_id,
            )
        key = (peer, message.requestId)
        if key in self._asked:
            raise ProtocolError(
                f"{message.type} {message.requestId}: that request id is already waiting for "
                f"an answer from {peer}",
                request_id=message.requestId,
            )
        # Registered before the send, with no await in between: if the connection closes
        # from here on, run_connection's cleanup fails this future as unavailable.
        asked = _Asked(
            conns[-1], asyncio.get_running_loop().create_future(), PROVIDER_TYPES[message.type]
        )
        self._asked[key] = asked
        budget = self.limits.execution_timeout if timeout is None else timeout
        try:
            await _send_ws(asked.ws, message)
            async with asyncio.timeout(budget):
                response: ProviderResponse = await asked.future
        except TimeoutError:
            raise GatewayTimeout(
                f"{peer} did not answer {message.type} {message.requestId} within {budget:g}s",
                environment_id=self.environment_id,
            ) from None
        finally:
            if self._asked.get(key) is asked:
                del self._asked[key]
        if not response.success:
            error = response.error or ErrorBody(code="internal", message="failed without an error")
            raise error_from_wire(error.code, error.message, peer)
        return response

    def add_peer_listener(self, listener: PeerListener) -> None:
        """Learn when peers come and go: ``listener(peer, True)`` when a peer's first
        connection is up (after hello/welcome, accepted or dialled), ``listener(peer, False)``
        when its last connection closes. Nothing is reported for the connections that
        :meth:`close` itself shuts down. Exceptions are logged and otherwise ignored.
        """
        self._peer_listeners.append(listener)

    def remove_peer_listener(self, listener: PeerListener) -> None:
        """Stop calling ``listener`` (no error if it is not registered)."""
        with contextlib.suppress(ValueError):
            self._peer_listeners.remove(listener)

    def add_route_observer(self, observer: RouteObserver) -> None:
        """Receive a :class:`~gateway.observe.RouteRecord` for every request a peer sends here,
        once, when its reply is sent back (refusals, timeouts and errors included; a cancel
        from the caller yields a record with ``error_code`` ``"cancelled"``). Only requests
        received while an observer is registered are recorded; calls made in this process
        (including provider messages relayed to local handlers) are not. Exceptions are
        logged and otherwise ignored.
        """
        self._observers.append(observer)

    def remove_route_observer(self, observer: RouteObserver) -> None:
        """Stop calling ``observer`` (no error if it is not registered)."""
        with contextlib.suppress(ValueError):
            self._observers.remove(observer)

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
        conns = self._conns.setdefault(peer, [])
        conns.append(ws)
        if claims is not None:
            self._claims[ws] = claims
            self._arm_expiry(ws, claims)
        first = len(conns) == 1
        try:
            if first:
                await self._apply(self.state.peer_up(peer, capabilities))
                self._peer_event(peer, True)
            await self._read(ws, peer)
        finally:
            conns.remove(ws)
            self._claims.pop(ws, None)
            if (timer := self._expiry.pop(ws, None)) is not None:
                timer.cancel()
            if self._asked:
                self._fail_asked(ws, f"connection to {peer} closed before it answered")
            if not conns:
                if self._conns.get(peer) is conns:
                    del self._conns[peer]
                if not self._closed:
                    await self._apply(self.state.peer_down(peer, self._now()))
                    self._peer_event(peer, False)

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

    async def revoke(self, reason: str, *, run_id: str | None = None, token_id: str = "") -> int:
        """Close every accepted connection whose token is for ``run_id``, or is the token
        ``token_id`` (close code 1008, reason ``token revoked: <reason>``). The policy must
        refuse those tokens from now on too, or the peer simply reconnects.

        Returns:
            How many connections were closed.
        """
        doomed = [
            ws
            for ws, claims in self._claims.items()
            if claims.run_id == run_id or (token_id and claims.token_id == token_id)
        ]
        for ws in doomed:
            claims = self._claims[ws]
            log.warning(
                "closing connection: run %s, env %s: token revoked (%s)",
                claims.run_id,
                claims.environment_id,
                reason,
            )
            await ws.close(1008, f"token revoked: {reason}"[:120])
        return len(doomed)

    async def close(self) -> None:
        """Stop links, handlers and timers; fail the calls still waiting as unavailable."""
        self._closed = True
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        for link in self._links:
            await link.close()
        for conns in list(self._conns.values()):
            for ws in list(conns):
                await ws.close()
        for running in list(self._running.values()):
            if running.task is not None:
                running.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(
                    Outcome(
                        False,
                        error=ErrorBody(code="unavailable", message="gateway closed"),
                        environment_id=self.environment_id,
                    )
                )
        self._fail_asked(None, "gateway closed")
        self._tracked.clear()
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

    # ------------------------------------------------------------------ internals: calls

    def _start(
        self,
        kind: str,
        action: str,
        payload: dict[str, Any] | None,
        timeout: float | None,
        target: str | None,
        via: str | None,
        route_path: list[str] | None,
        *,
        streaming: bool = False,
    ) -> tuple[str, _Pending, list[Action]]:
        loop = asyncio.get_running_loop()
        request_id, actions = self.state.call(
            kind,
            action,
            payload or {},
            loop.time(),
            timeout=timeout,
            target=target,
            via=via,
            route_path=route_path,
        )
        pending = _Pending(loop.create_future())
        if streaming:
            pending.partials = asyncio.Queue(_PARTIAL_QUEUE)
            pending.notes = asyncio.Queue(_PARTIAL_QUEUE)
        self._pending[request_id] = pending
        return request_id, pending, actions

    async def _wait(self, request_id: str, pending: _Pending) -> Outcome:
        try:
            return await pending.future
        except asyncio.CancelledError:
            if self._pending.pop(request_id, None) is not None:
                await asyncio.shield(self._apply(self.state.cancel(request_id)))
            raise
        finally:
            self._pending.pop(request_id, None)

    # ------------------------------------------------------------------ internals: I/O

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _read(self, ws: Connection, peer: str) -> None:
        bad = 0
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                try:
                    message = parse_message(frame)
                except ProtocolError as exc:
                    bad += 1
                    log.warning("bad frame from %s: %s", peer, exc)
                    await self._send_error(ws, exc)
                    if bad > self.limits.max_bad_frames:
                        await ws.close(1008, "too many malformed messages")
                        return
                    continue
                handler = _DISPATCH.get(type(message))
                if handler is None:
                    await self._send_error(
                        ws, ProtocolError(f"unexpected {message.type} on an open connection")
                    )
                    continue
                await handler(self, peer, ws, message)

    def _arm_expiry(self, ws: Connection, claims: TokenClaims) -> None:
        if (old := self._expiry.pop(ws, None)) is not None:
            old.cancel()
        delay = max(0.0, claims.expires_at - time.time())
        self._expiry[ws] = asyncio.get_running_loop().call_later(delay, self._expire, ws)

    def _expire(self, ws: Connection) -> None:
        self._expiry.pop(ws, None)
        claims = self._claims.get(ws)
        if claims is None:
            return
        log.warning(
            "closing connection: run %s, env %s: token expired",
            claims.run_id,
            claims.environment_id,
        )
        self._spawn(ws.close(1008, "token expired"))

    def _refusal(
        self, ws: Connection, peer: str, kind: str, action: str, payload: Any, target: str | None
    ) -> GatewayError | None:
        """Why a call from ``ws`` is refused, or None: connections that presented a token are
        held to it (expiry, then the node's :class:`TokenPolicy`), at this one place."""
        claims = self._claims.get(ws)
        if claims is None:  # a connection this node dialled: its peer is our upstream
            return None
        try:
            if time.time() >= claims.expires_at:
                raise TokenExpired(f"token for {claims.environment_id} expired")
            if self.token_policy is not None:
                self.token_policy.authorize(
                    claims, kind, action, payload if isinstance(payload, dict) else {}, target
                )
        except AuthError as exc:
            log.warning(
                "refused %s:%s from %s: run %s, env %s: %s",
                kind,
                action,
                peer,
                claims.run_id,
                claims.environment_id,
                exc,
            )
            return exc
        return None

    async def _on_request(self, peer: str, ws: Connection, message: Any) -> None:
        refused = self._refusal(
            ws,
            peer,
            message.originalType,
            message.originalAction,
            message.originalMessage,
            message.target,
        )
        if refused is not None:
            await self._send_error(ws, refused, message.requestId)
            return
        if (message.originalType, message.originalAction) == ("gateway", "refresh") and (
            ws in self._claims
        ):
            await self._refresh(ws, peer, message)
            return
        if self._observers:
            await self._apply(self._track(peer, message))
            return
        await self._apply(self.state.receive_request(peer, message, self._now()))

    async def _refresh(self, ws: Connection, peer: str, message: Request) -> None:
        """``gateway:refresh {token}``: the peer holds a renewed token; this connection lives
        until the new expiry (it is closed at the old one otherwise). Only a token for the same
        run and environment, verified here, extends it."""
        claims = self._claims[ws]
        token = message.originalMessage.get("token")
        try:
            if self.verify_token is None:
                raise AuthError(f"{self.environment_id} does not verify tokens")
            if not isinstance(token, str):
                raise TokenInvalid("'token' must be a token")
            fresh = self.verify_token(token)
            if (fresh.run_id, fresh.environment_id) != (claims.run_id, claims.environment_id):
                raise TokenInvalid("a refreshed token must be for the same run and environment")
        except AuthError as exc:
            log.warning(
                "refused a token refresh from %s: run %s, env %s: %s",
                peer,
                claims.run_id,
                claims.environment_id,
                exc,
            )
            await self._send_error(ws, exc, message.requestId)
            return
        self._claims[ws] = fresh
        self._arm_expiry(ws, fresh)
        reply = Reply(
            requestId=self.state.new_id(),
            replyRequestId=message.requestId,
            success=True,
            result={"expiresAt": fresh.expires_at},
            environmentId=self.environment_id,
        )
        await _send_ws(ws, reply)

    async def _on_reply(self, peer: str, ws: Connection, message: Any) -> None:
        await self._apply(self.state.receive_reply(peer, message))

    async def _on_partial(self, peer: str, ws: Connection, message: Any) -> None:
        await self._apply(self.state.receive_partial(peer, message))

    async def _on_notification(self, peer: str, ws: Connection, message: Any) -> None:
        await self._apply(self.state.receive_notification(peer, message))

    async def _on_cancel(self, peer: str, ws: Connection, message: Any) -> None:
        if self._tracked:
            track = self._tracked.pop((peer, message.requestId), None)
            if track is not None:  # no reply will be sent: the record is made here
                self._observe(peer, track, False, "cancelled", self.environment_id)
        await self._apply(self.state.receive_cancel(peer, message))

    async def _on_provider(self, peer: str, ws: Connection, message: Any) -> None:
        # Provider messages are answered out of line, so a slow file read does not stall the
        # connection's other traffic.
        self._spawn(self._provider(peer, ws, message))

    async def _on_response(self, peer: str, ws: Connection, message: Any) -> None:
        asked = self._asked.get((peer, message.requestId))
        if asked is None or asked.future.done():
            log.debug(
                "%s %s from %s ignored: nothing waits for it", message.type, message.requestId, peer
            )
            return
        if type(message) is asked.response:
            asked.future.set_result(message)
        else:
            asked.future.set_exception(
                ProtocolError(
                    f"{peer} answered {message.requestId} with {message.type}, "
                    f"expected {asked.response.__name__}",
                    request_id=message.requestId,
                )
            )

    async def _provider(self, peer: str, ws: Connection, message: Any) -> None:
        response = PROVIDER_TYPES[message.type]
        if isinstance(message, Heartbeat):
            result: Any = {"environmentId": self.environment_id, "timestamp": message.timestamp}
            await _send_ws(ws, response(requestId=message.requestId, success=True, result=result))
            return
        kind, action, payload = _provider_call(message)
        refused = self._refusal(ws, peer, kind, action, payload, None)
        if refused is not None:
            body = ErrorBody(code=refused.code, message=str(refused)[:4096])
            await _send_ws(ws, response(requestId=message.requestId, success=False, error=body))
            return
        async with self._slots:
            request_id, pending, actions = self._start(
                kind, action, payload, None, None, None, [peer]
            )
            await self._apply(actions)
            outcome = await self._wait(request_id, pending)
        await _send_ws(
            ws,
            response(
                requestId=message.requestId,
                success=outcome.success,
                result=outcome.result,
                error=outcome.error,
            ),
        )

    async def _send_error(
        self, ws: Connection, exc: GatewayError, request_id: str | None = None
    ) -> None:
        if request_id is None and isinstance(exc, ProtocolError):
            request_id = exc.request_id
        reply = Reply(
            requestId=self.state.new_id(),
            replyRequestId=request_id,
            success=False,
            error=ErrorBody(code=exc.code, message=str(exc)[:4096]),
            environmentId=self.environment_id,
        )
        await _send_ws(ws, reply)

    async def _send(self, peer: str, message: Any) -> None:
        conns = self._conns.get(peer)
        if not conns:
            log.debug("%s not connected; %s held or dropped", peer, message.type)
            return
        await _send_ws(conns[-1], message)

    async def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.peer, action.message)
                if self._tracked and type(action.message) is Reply:
                    self._replied(action.peer, action.message)
            elif isinstance(action, Deliver):
                pending = self._pending.get(action.request_id)
                if pending is not None and not pending.future.done():
                    pending.future.set_result(action.outcome)
            elif isinstance(action, RunLocal):
                self._run_local(action.key, action.request)
            elif isinstance(action, DeliverPartial):
                pending = self._pending.get(action.request_id)
                if pending is not None and pending.partials is not None:
                    _offer(pending.partials, action.partial, "partial result")
            elif isinstance(action, CancelLocal):
                running = self._running.pop(action.key, None)
                if running is not None and running.task is not None:
                    running.task.cancel()
            elif isinstance(action, NotifyLocal):
                running = self._running.get(action.key)
                if running is not None:
                    _offer(running.inbox(), action.notification, "notification")
            elif isinstance(action, DeliverNotification):
                self._deliver_note(action)
        self._rearm()

    # ------------------------------------------------------------------ internals: observers

    def _peer_event(self, peer: str, up: bool) -> None:
        for listener in list(self._peer_listeners):
            try:
                listener(peer, up)
            except Exception:
                log.exception("peer listener failed for %s (%s)", peer, "up" if up else "down")

    def _fail_asked(self, ws: Connection | None, why: str) -> None:
        """Fail the provider messages waiting on ``ws`` (None: all of them) as unavailable."""
        for asked in list(self._asked.values()):
            if (ws is None or asked.ws is ws) and not asked.future.done():
                asked.future.set_exception(Unavailable(why, environment_id=self.environment_id))

    def _track(self, peer: str, request: Request) -> list[Action]:
        """Hand ``request`` to the state and note where it went (route observers only).

        The state's actions for a new request say it all: a RunLocal (runs here), Sends of
        fresh Requests (forwarded to those peers) or a Send of the Reply (refused here).
        """
        now = self._now()
        rid = request.requestId
        resend = self.state.seen(peer, rid)
        actions = self.state.receive_request(peer, request, now)
        if resend:  # answered (or being answered) once: recorded once
            return actions
        hops: list[str] = []
        for action in actions:
            if isinstance(action, RunLocal):
                hops = [self.environment_id]
                break
            if isinstance(action, Send):
                if type(action.message) is Reply:
                    hops = []
                    break
                if type(action.message) is Request:
                    hops.append(action.peer)
        else:
            # legs for a peer that is away are held, not sent: the state still knows them
            targets = self.state.forwarded_to(peer, rid)
            if len(hops) < len(targets):
                hops = list(targets)
        self._tracked[(peer, rid)] = _Track(request, now, hops)
        return actions

    def _replied(self, peer: str, reply: Reply) -> None:
        rid = reply.replyRequestId
        track = self._tracked.pop((peer, rid), None) if rid is not None else None
        if track is not None:
            code = reply.error.code if reply.error is not None else None
            self._observe(peer, track, reply.success, code, reply.environmentId)

    def _observe(
        self, peer: str, track: _Track, success: bool, code: str | None, ran_in: str | None
    ) -> None:
        request = track.request
        path = list(request.routePath)
        record = RouteRecord(
            kind=request.originalType,
            action=request.originalAction,
            route_path=path,
            origin=path[0] if path else peer,
            from_peer=peer,
            next_hop=track.hops[0] if track.hops else None,
            next_hops=list(track.hops),
            ran_in=ran_in,
            success=success,
            error_code=code,
            duration_ms=(self._now() - track.start) * 1000,
            request_id=request.requestId,
        )
        for observer in list(self._observers):
            try:
                observer(record)
            except Exception:
                log.exception("route observer failed")

    def _deliver_note(self, action: DeliverNotification) -> None:
        if action.request_id is not None:
            pending = self._pending.get(action.request_id)
            if pending is not None and pending.notes is not None:
                _offer(pending.notes, action.notification, "notification")
        for listener in self._listeners:
            try:
                listener(action.peer, action.notification)
            except Exception:
                log.exception("notification listener failed")

    def _run_local(self, key: Key, request: Request) -> None:
        handler = self.handlers.lookup(request.originalType, request.originalAction)
        running = _Running()
        self._running[key] = running
        running.task = self._spawn(self._execute(key, request, handler, running))

    async def _execute(
        self, key: Key, request: Request, handler: Handler | None, running: _Running
    ) -> None:
        env = self.environment_id
        if handler is None:
            name = f"{request.originalType}:{request.originalAction}"
            outcome = Outcome(
                False,
                error=ErrorBody(code="no_handler", message=f"no handler for {name} in {env}"),
                environment_id=env,
            )
        else:

            async def partial(result: Any) -> None:
                await self._apply(self.state.local_partial(key, result))

            async def notify(kind: str, result: Any) -> None:
                await self._apply(self.state.local_notify(key, kind, result))

            ctx = HandlerContext(request, env, partial, notify, running.inbox)
            try:
                result = await handler(ctx, request.originalMessage)
                # Checked here, once, so a bad result fails this call instead of the send of
                # its reply (and so a handler behaves the same for local and remote callers).
                to_json(result)
                outcome = Outcome(True, result, None, env)
            except asyncio.CancelledError:
                self._running.pop(key, None)
                raise
            except PydanticSerializationError as exc:
                log.error(
                    "%s:%s returned non-JSON data: %s",
                    request.originalType,
                    request.originalAction,
                    exc,
                )
                failure = ErrorBody(code="handler_error", message="handler returned non-JSON data")
                outcome = Outcome(False, None, failure, env)
            except Exception as exc:
                outcome = Outcome(False, error=error_body(exc, env), environment_id=env)
        self._running.pop(key, None)
        await self._apply(self.state.local_done(key, outcome))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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

    async def _whoami(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "environmentId": self.environment_id,
            "runtimeId": self.runtime_id,
            "routePath": ctx.route_path,
            "capabilities": self.capabilities,
        }


_DISPATCH: dict[type, Callable[[Gateway, str, Connection, Any], Awaitable[None]]] = {
    Request: Gateway._on_request,
    Reply: Gateway._on_reply,
    Partial: Gateway._on_partial,
    Notification: Gateway._on_notification,
    Cancel: Gateway._on_cancel,
    **{
        cls: Gateway._on_provider
        for cls in (
            ProviderStart,
            ProviderAgentStart,
            ProviderStop,
            ProviderReadFile,
            ProviderWriteFile,
            ProviderDeleteFile,
            Heartbeat,
        )
    },
    **{cls: Gateway._on_response for cls in PROVIDER_TYPES.values()},
}


async def _echo(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
    return payload


def _provider_call(message: Any) -> tuple[str, str, dict[str, Any]]:
    """The capability call a provider-facing message stands for."""
    if isinstance(message, ProviderReadFile):
        return "fs", "readFile", {"path": message.path, "encoding": message.encoding}
    if isinstance(message, ProviderWriteFile):
        payload = {"path": message.path, "content": message.content, "encoding": message.encoding}
        return "fs", "writeFile", payload
    if isinstance(message, ProviderDeleteFile):
        return "fs", "deleteFile", {"path": message.path}
    if isinstance(message, ProviderAgentStart):
        return "provider", "agentStart", {"agent": message.agent, "options": message.options}
    if isinstance(message, ProviderStart):
        return "provider", "start", {"options": message.options}
    if isinstance(message, ProviderStop):
        return "provider", "stop", {}
    raise ProtocolError(f"not a provider message: {message.type}")


async def _send_ws(ws: Connection, message: Any) -> None:
    try:  # noqa: SIM105 - per message: contextlib.suppress costs more than the send's framing
        await ws.send(dump(message))
    except ConnectionClosed:
        pass  # the state learns of it from the reader; resends happen on reconnect


def _offer(queue: asyncio.Queue[Any], item: Any, what: str) -> None:
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        log.warning("%s dropped: its reader is %d behind", what, queue.qsize())
