"""The tokens a run's runtime holds: issued scoped to the run, renewed while it lasts.

Tokens stay short-lived (the hub's ``token_ttl``): a run that lasts longer gets a fresh one in
time, handed to its runtime over its connection, and the one it replaces is revoked at once.
Every token ever issued is remembered, because the run's result is screened for each of them
(see :func:`gateway.hub.direct.screen_result`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.errors import GatewayError
from gateway.node import Gateway
from gateway.tokens import TokenClaims, TokenSigner

from .token_policy import RunTokenPolicy, run_token

__all__ = ["RunTokens"]

log = logging.getLogger(__name__)


class RunTokens:
    """The tokens of one run's runtime (its gateway id ``gateway_id``)."""

    def __init__(
        self,
        signer: TokenSigner,
        ttl: float,
        gateway: Gateway,
        policy: RunTokenPolicy,
        *,
        run_id: str,
        gateway_id: str,
        thread: str,
        base: str,
    ) -> None:
        self.signer = signer
        self.ttl = ttl
        self.gateway = gateway
        self.policy = policy
        self.run_id = run_id
        self.gateway_id = gateway_id
        self.thread = thread
        self.base = base
        self.issued: list[str] = []
        """Every token handed to the runtime."""
        self._expires = 0.0  # unknown (an adopted run): renew at once
        self._claims: TokenClaims | None = None  # of the token the runtime holds
        self._renewal: asyncio.Task[None] | None = None

    def issue(self) -> str:
        """A fresh token for the run's runtime, scoped to the run (see
        :func:`gateway.hub.token_policy.run_token`)."""
        token = run_token(
            self.signer,
            self.run_id,
            self.gateway_id,
            self.ttl,
            thread=self.thread,
            base=self.base,
        )
        self._claims = self.signer.verify(token)
        self._expires = self._claims.expires_at
        self.issued.append(token)  # the result is screened for each of them
        return token

    def start_renewal(self) -> None:
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    def stop_renewal(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()

    async def _renew(self) -> None:
        """Hand the runtime a fresh token when a third of the current one's lifetime is left
        at most, so it can always reconnect while the run lasts (tokens stay short-lived); the
        runtime presents it on its connection (``gateway:refresh``), which is closed at the old
        token's expiry otherwise."""
        ttl = self.ttl
        while True:
            await asyncio.sleep(max(0.0, self._expires - ttl * 2 / 3 - time.time()))
            held, held_claims = self._expires, self._claims
            token = self.issue()
            try:
                await self.gateway.call(
                    "runtime", "setToken", {"token": token}, target=self.gateway_id, timeout=10
                )
            except GatewayError as exc:
                log.info("could not renew the token of %s: %s", self.gateway_id, exc)
                self._expires, self._claims = held, held_claims  # still the old one
                await asyncio.sleep(min(ttl / 10, 5.0))
                continue
            if held_claims is not None:
                # the runtime holds (and its connection presented) the new one: the old one,
                # which may be read from the runtime's environment, is void
                await self.policy.revoke_token(held_claims)
                await self.gateway.revoke("renewed", token_id=held_claims.token_id)
