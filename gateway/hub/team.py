"""A shared team hub: how developers' CLIs connect and what they may call.

Three kinds of connection carry a team bearer (:func:`team_bearer`, ``nteam1.<env>.<secret>``)
or a session token instead of a run's token:

* an **invite** connection presents a one-time invite code and may only call ``team:login``,
  which spends the code and answers a per-user credential (the hub keeps only its hash);
* a **credential** connection presents that credential and may only call ``team:session``
  (a short-lived session token, signed like every hub token, with the credential as its
  subject) and ``team:logout`` (void the credential);
* a **session** connection presents a session token and may call the team's run actions
  (:mod:`gateway.hub.remote_runs`) as its user.

:class:`TeamSigner` verifies the bearers in place of tokens (rate-limited: after
:data:`LOGIN_FAILURE_LIMIT` failures within :data:`LOGIN_FAILURE_WINDOW` seconds every team
bearer is refused until the window passes); :class:`TeamPolicy` holds those connections to
their calls, refuses them as soon as the credential or user is revoked, and hands every other
token to the hub's :class:`~gateway.hub.token_policy.RunTokenPolicy`.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.access import TokenPolicy
from gateway.errors import AccessDenied, AuthError, OutOfScope, TokenInvalid
from gateway.handlers import HandlerContext, HandlerRegistry
from gateway.node import Gateway
from gateway.tokens import TokenClaims, TokenSigner
from narrative.errors import InvalidInput
from narrative.jsonio import parse_json

from .token_policy import CONTROL_RUN
from .users import OWNER, AuditLog, Credential, UserRegistry, check_user_name

__all__ = [
    "CREDENTIAL_RUN",
    "INVITE_RUN",
    "LOGIN_FAILURE_LIMIT",
    "LOGIN_FAILURE_WINDOW",
    "SESSION_RUN",
    "SESSION_TTL",
    "Caller",
    "TeamHandlers",
    "TeamPolicy",
    "TeamSigner",
    "revoke_user",
    "team_bearer",
]

#: The run claim of a connection that presented an invite code.
INVITE_RUN = "team-invite"
#: The run claim of a connection that presented a user's credential.
CREDENTIAL_RUN = "team-credential"
#: The run claim of a user's session token.
SESSION_RUN = "team-session"
#: Seconds a session token lives (a CLI renews it on its open connection before then).
SESSION_TTL = 900.0
#: Failed team logins (bad invite codes or credentials) tolerated per window, hub-wide.
LOGIN_FAILURE_LIMIT = 10
LOGIN_FAILURE_WINDOW = 60.0
_BEARER_PREFIX = "nteam1"
_USES = {"invite": INVITE_RUN, "credential": CREDENTIAL_RUN}
_BEARER_TTL = 120.0
_ENV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: What each kind of team connection may call (``team:<action>``).
_ALLOWED = {
    INVITE_RUN: frozenset({"login"}),
    CREDENTIAL_RUN: frozenset({"session", "logout"}),
}
#: What a session may call to pull a bundle ``team:prepareResult`` prepared.
_CHUNK_ACTIONS = frozenset({"readBundle", "dropBundle"})
#: Capabilities that reach the hub's own workspace, which a team user's run never may.
_OWNER_WORKSPACE = frozenset({"fs", "exec"})
#: Actions only the store's owner (a control token) may call.
_OWNER_ONLY = frozenset({"revoke"})


def team_bearer(use: str, secret: str) -> str:
    """What a CLI presents instead of a token to log in (``use``: ``invite``, with the invite
    code) or to open a session (``credential``): a fresh gateway id and the secret."""
    env = f"{use}-{secrets.token_hex(6)}"
    body = base64.urlsafe_b64encode(json.dumps({"env": env, "use": use}).encode())
    return f"{_BEARER_PREFIX}.{body.decode().rstrip('=')}.{secret}"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a team call: the user (:data:`~gateway.hub.users.OWNER` for the store's key)
    and whether they may see and control every user's runs."""

    user: str
    admin: bool


class TeamSigner(TokenSigner):
    """The hub's token signer, which also takes team bearers (invite codes and credentials)
    where a token is expected, rate-limited and audited when refused."""

    def __init__(self, key: bytes, registry: UserRegistry, audit: AuditLog) -> None:
        super().__init__(key, "hub")
        self.registry = registry
        self.audit = audit
        self._failures: collections.deque[float] = collections.deque()

    def verify(
        self, token: str | None, *, run_id: str | None = None, now: float | None = None
    ) -> TokenClaims:
        if not token or not token.startswith(_BEARER_PREFIX + "."):
            return super().verify(token, run_id=run_id, now=now)
        clock = time.monotonic()
        while self._failures and self._failures[0] < clock - LOGIN_FAILURE_WINDOW:
            self._failures.popleft()
        if len(self._failures) >= LOGIN_FAILURE_LIMIT:
            raise TokenInvalid("too many failed logins on this hub; try again in a minute")
        try:
            return self._verify_bearer(token)
        except AuthError as exc:
            self._failures.append(clock)
            self.audit.record("-", "connect", None, f"refused: {exc}")
            raise

    def _verify_bearer(self, token: str) -> TokenClaims:
        parts = token.split(".")
        try:
            if len(parts) != 3:
                raise ValueError
            body = parse_json(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            env, use = body["env"], body["use"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise TokenInvalid("malformed team bearer") from None
        if not isinstance(env, str) or not _ENV_RE.match(env) or use not in _USES:
            raise TokenInvalid("malformed team bearer")
        expires = time.time() + _BEARER_TTL
        if use == "invite":
            self.registry.check_invite(parts[2])
            invite_id = parts[2].split("_")[1]
            return TokenClaims(INVITE_RUN, env, expires, "hub", invite_id)
        credential = self.registry.check_credential(parts[2])
        return TokenClaims(CREDENTIAL_RUN, env, expires, "hub", credential.id)


class TeamPolicy:
    """The hub's token policy: team connections held to their calls (and refused once their
    credential or user is revoked), every other token to ``runs``."""

    def __init__(self, runs: TokenPolicy, registry: UserRegistry, environment_id: str) -> None:
        self.runs = runs
        self.registry = registry
        self.environment_id = environment_id
        #: the user who started a run (None: the hub owner's run); set by the hub
        self.run_owner: Callable[[str], str | None] = lambda run_id: None

    def credential_of(self, claims: TokenClaims) -> Credential:
        """The credential in force behind team ``claims`` (raises TokenRevoked if void)."""
        cred_id = claims.subject if claims.run_id == SESSION_RUN else claims.token_id
        return self.registry.active(cred_id)

    async def admit(self, claims: TokenClaims) -> None:
        if claims.run_id in (SESSION_RUN, CREDENTIAL_RUN):
            self.credential_of(claims)
        elif claims.run_id != INVITE_RUN:
            await self.runs.admit(claims)

    def authorize(
        self,
        claims: TokenClaims,
        kind: str,
        action: str,
        payload: dict[str, Any],
        target: str | None,
    ) -> None:
        if claims.run_id not in (SESSION_RUN, CREDENTIAL_RUN, INVITE_RUN):
            if kind == "team" and claims.run_id != CONTROL_RUN:
                raise OutOfScope(f"a token of run {claims.run_id} may not call team:{action}")
            if kind in _OWNER_WORKSPACE and self.run_owner(claims.run_id) is not None:
                raise OutOfScope(
                    f"run {claims.run_id} is a team user's: the hub's workspace is not theirs "
                    f"({kind}:{action})"
                )
            self.runs.authorize(claims, kind, action, payload, target)
            return
        if claims.run_id != INVITE_RUN:
            self.credential_of(claims)
        what = f"a team {claims.run_id[5:]} connection may not call {kind}:{action}"
        if target is not None and target != self.environment_id:
            raise OutOfScope(what + " on another node")
        if claims.run_id == SESSION_RUN and (
            (kind == "narrative" and action in _CHUNK_ACTIONS)
            or (kind, action) == ("gateway", "refresh")
        ):
            return  # a result bundle its user prepared (bundle ids are secrets); a renewal
        allowed = _ALLOWED.get(claims.run_id)
        if (
            kind != "team"
            or (allowed is not None and action not in allowed)
            or (allowed is None and (action in _OWNER_ONLY or action in _ALL_LIMITED))
        ):
            raise OutOfScope(what)


_ALL_LIMITED = frozenset().union(*_ALLOWED.values())


class TeamHandlers:
    """The ``team:*`` calls of a hub: login, session, logout and revoke; and who is calling
    (:meth:`caller`) for the run actions of :mod:`gateway.hub.remote_runs`.

    Args:
        gateway: The hub's gateway (whose connections' claims say who calls).
        signer: Issues session tokens.
        policy: Says which credential stands behind a connection.
        blocking: Runs store work off the event loop.
        fingerprint: The TLS certificate fingerprint the hub announces at login, if it serves
            TLS (stored in the user's login record, for the CLI to pin).
    """

    def __init__(
        self,
        gateway: Gateway,
        signer: TeamSigner,
        policy: TeamPolicy,
        blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
        fingerprint: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.signer = signer
        self.policy = policy
        self.registry = signer.registry
        self.audit = signer.audit
        self.blocking = blocking
        self.fingerprint = fingerprint
        #: seconds a session token lives (its CLI renews it on the open connection)
        self.session_ttl = SESSION_TTL

    def install(self, registry: HandlerRegistry) -> None:
        for action, handler in (
            ("login", self._login),
            ("session", self._session),
            ("logout", self._logout),
            ("revoke", self._revoke),
        ):
            registry.register("team", action, handler)

    def claims(self, ctx: HandlerContext) -> TokenClaims:
        """The claims of the direct peer making the call (a dialled or forwarded call has
        none and is refused)."""
        path = ctx.route_path
        claims = self.gateway.peer_claims(path[0]) if len(path) == 1 else None
        if claims is None:
            raise AccessDenied("team calls are only taken from a directly connected client")
        return claims

    def caller(self, ctx: HandlerContext) -> Caller:
        """Who makes the call: a session's user, or the store's owner (a control token).

        Raises:
            AccessDenied: neither.
        """
        claims = self.claims(ctx)
        if claims.run_id == CONTROL_RUN:
            return Caller(OWNER, True)
        if claims.run_id != SESSION_RUN:
            raise AccessDenied("this call needs a user's session")
        credential = self.policy.credential_of(claims)
        return Caller(credential.user, credential.role == "admin")

    async def refuse(self, caller: str, action: str, target: str | None, exc: Exception) -> None:
        """Audit a refused call."""
        await self.blocking(lambda: self.audit.record(caller, action, target, f"refused: {exc}"))

    async def _login(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        claims = self.claims(ctx)
        code = payload.get("code")
        if not isinstance(code, str) or code.split("_")[1:2] != [claims.token_id]:
            raise InvalidInput("'code' must be the invite code this connection presented")
        try:
            credential, secret = await self.blocking(lambda: self.registry.redeem(code))
        except AuthError as exc:
            await self.refuse("-", "login", None, exc)
            raise
        await self.blocking(lambda: self.audit.record(credential.user, "login", None, "ok"))
        return {
            "user": credential.user,
            "role": credential.role,
            "credential": secret,
            "hub": self.gateway.environment_id,
            "fingerprint": self.fingerprint,
        }

    async def _session(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        credential = self.policy.credential_of(self.claims(ctx))
        prefix = f"u-{credential.user}-"
        env = payload.get("environment")  # renewing the session of an open connection
        if env is None:
            env = prefix + secrets.token_hex(4)
        elif not isinstance(env, str) or not env.startswith(prefix) or not _ENV_RE.match(env):
            raise InvalidInput(f"'environment' must be a session of {credential.user}")
        token = self.signer.issue(SESSION_RUN, env, self.session_ttl, subject=credential.id)
        await self.blocking(lambda: self.registry.seen(credential))
        return {
            "token": token,
            "user": credential.user,
            "role": credential.role,
            "expiresIn": self.session_ttl,
        }

    async def _logout(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        credential = self.policy.credential_of(self.claims(ctx))
        await self.blocking(lambda: self.registry.revoke_credential(credential.id))
        await self.gateway.revoke("logged out", subjects=frozenset({credential.id}))
        await self.blocking(lambda: self.audit.record(credential.user, "logout", None, "ok"))
        return {"user": credential.user}

    async def _revoke(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.caller(ctx)
        user = payload.get("user")
        if not isinstance(user, str):
            raise InvalidInput("'user' must be a user name")
        check_user_name(user)
        credentials = await self.blocking(
            lambda: revoke_user(self.registry, self.audit, user, caller.user)
        )
        closed = await self.gateway.revoke(f"user {user} revoked", subjects=credentials)
        return {"user": user, "closed": closed}


def revoke_user(registry: UserRegistry, audit: AuditLog, user: str, by: str) -> frozenset[str]:
    """Revoke ``user`` (every credential of theirs) and audit it; the credential ids (a
    serving hub closes the connections that stem from them)."""
    try:
        credentials = registry.revoke_user(user)
    except InvalidInput as exc:
        audit.record(by, "revoke", user, f"refused: {exc}")
        raise
    audit.record(by, "revoke", user, "ok")
    return credentials
