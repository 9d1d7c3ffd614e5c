"""Who may do what on a connection: the token claims of accepted connections.

A connection the server accepted presented a verified token (:class:`~gateway.tokens.TokenClaims`).
:class:`ConnectionAccess` keeps those claims per connection, closes each connection when its
token expires (``gateway:refresh`` with a renewed token moves the expiry), holds every call from
it to the token (expiry, then the node's :class:`TokenPolicy`), and closes the connections of a
revoked run or token. Connections the node dialled present no token to it and are not held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from websockets.asyncio.connection import Connection

from .errors import AuthError, GatewayError, TokenExpired, TokenInvalid
from .tokens import CLOCK_SKEW_TOLERANCE, TokenClaims, is_expired

__all__ = ["ConnectionAccess", "TokenPolicy"]

log = logging.getLogger(__name__)


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


class ConnectionAccess:
    """The token claims of one node's accepted connections, and the checks made against them.

    Args:
        environment_id: The node's environment id (for messages).
        spawn: Runs a coroutine as one of the node's tasks (closing an expired connection).
    """

    def __init__(
        self,
        environment_id: str,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.environment_id = environment_id
        self._spawn = spawn
        #: checks every call from an accepted connection (see :class:`TokenPolicy`)
        self.policy: TokenPolicy | None = None
        #: verifies the fresh token a peer presents with ``gateway:refresh`` (set by the server)
        self.verify_token: Callable[[str], TokenClaims] | None = None
        #: token claims of accepted connections (dialled ones have none)
        self._claims: dict[Connection, TokenClaims] = {}
        #: closes an accepted connection when its token expires (re-armed by :meth:`refresh`)
        self._expiry: dict[Connection, asyncio.TimerHandle] = {}

    @property
    def claims(self) -> Mapping[Connection, TokenClaims]:
        """The claims of every open accepted connection (a read-only view)."""
        return MappingProxyType(self._claims)

    def claims_of(self, ws: Connection) -> TokenClaims | None:
        """The claims ``ws`` connected with (or refreshed to); None for a dialled connection."""
        return self._claims.get(ws)

    def admit(self, ws: Connection, claims: TokenClaims) -> None:
        """Hold the accepted connection ``ws`` to ``claims`` and close it when they expire."""
        self._claims[ws] = claims
        self._arm_expiry(ws, claims)

    def forget(self, ws: Connection) -> None:
        """``ws`` closed: drop its claims and its expiry timer."""
        self._claims.pop(ws, None)
        if (timer := self._expiry.pop(ws, None)) is not None:
            timer.cancel()

    def refusal(
        self, ws: Connection, peer: str, kind: str, action: str, payload: Any, target: str | None
    ) -> GatewayError | None:
        """Why a call from ``ws`` is refused, or None: connections that presented a token are
        held to it (expiry, then the node's :class:`TokenPolicy`), at this one place."""
        claims = self._claims.get(ws)
        if claims is None:  # a connection this node dialled: its peer is our upstream
            return None
        try:
            if is_expired(claims.expires_at):
                raise TokenExpired(f"token for {claims.environment_id} expired")
            if self.policy is not None:
                self.policy.authorize(
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

    def refresh(self, ws: Connection, peer: str, token: object) -> TokenClaims:
        """``gateway:refresh {token}`` on the accepted connection ``ws``: the peer holds a renewed
        token; the connection lives until the new expiry (it is closed at the old one otherwise).
        Only a token for the same run and environment, verified here, extends it.

        Returns:
            The fresh claims, now in force.

        Raises:
            AuthError: the token is refused (logged here; the old claims stay).
        """
        claims = self._claims[ws]
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
            raise
        self._claims[ws] = fresh
        self._arm_expiry(ws, fresh)
        return fresh

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
        ``token revoked: <reason>``); returns how many."""
        doomed = [
            ws
            for ws, claims in self._claims.items()
            if claims.run_id == run_id
            or (token_id and claims.token_id == token_id)
            or (claims.subject and claims.subject in subjects)
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

    def close(self) -> None:
        """Stop every expiry timer (the node is closing its connections itself)."""
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()

    def _arm_expiry(self, ws: Connection, claims: TokenClaims) -> None:
        if (old := self._expiry.pop(ws, None)) is not None:
            old.cancel()
        delay = max(0.0, claims.expires_at + CLOCK_SKEW_TOLERANCE - time.time())
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
