"""What a run's token lets it do on a hub (or on a runtime, the hub of its agent and of the
nested runs it drives): the :class:`~gateway.access.TokenPolicy` every connection is held to.

A hub gives each run a token scoped to the run (see :func:`run_token`): it may fetch the run's
input (the base snapshot and the run's thread), write the run's result thread, and create new
threads (those of the runs it nests), nothing else. The gateway asks this policy at one place
for every call from a connection that presented a token (and at the connection's upgrade):

* tokens of runs that ended are refused (``revoked``): the run's record in the store says so,
  which a restarted hub reads too, and a hub that ends a run closes its connections;
* so are tokens revoked by id (a runtime's previous token once it holds a renewed one: the
  token in its process environment is void after the first renewal), kept in the store
  (``narrative/revoked-tokens.json``) until they would have expired anyway;
* ``narrative:prepareBundle`` only for the snapshots and threads of the token's read scope,
  never ``changed`` (every thread of the store);
* ``narrative:snapshot`` only onto a thread of the token's write scope;
* ``provider:*`` and ``runtime:*`` only from the upstream hub (a dialled connection carries
  no token), and no call aimed at the environment of another run, nor at a hybrid run's tools
  node unless it is one of the calls that run routes there;

and a result brought home is refused when it would move a thread that exists and is not the
run's own (:func:`result_scope`). Refusals are logged by the gateway: run, environment, reason.
The owner's ``control`` tokens are not held to a run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gateway.errors import OutOfScope, TokenRevoked
from gateway.router import Router
from gateway.tokens import TokenClaims, TokenSigner
from narrative.errors import NarrativeError
from narrative.fsutil import write_atomic
from narrative.hierarchy import get_run
from narrative.jsonio import load_json
from narrative.store import Store

__all__ = ["CONTROL_RUN", "RunTokenPolicy", "result_scope", "run_token"]

log = logging.getLogger(__name__)

#: The run claim of tokens allowed to make control calls (``hub:*``): the store's owner.
CONTROL_RUN = "control"
#: Capability families only the upstream hub may call on a runtime.
_UPSTREAM_ONLY = frozenset({"provider", "runtime"})


def run_token(
    signer: TokenSigner,
    run_id: str,
    environment_id: str,
    ttl: float,
    *,
    thread: str,
    base: str | None = None,
) -> str:
    """The token of one run's environment (or agent): it reads the run's input (``base`` and
    ``thread``), writes ``thread`` (the run's result) and may create its nested runs' threads."""
    return signer.issue(
        run_id,
        environment_id,
        ttl,
        read_snapshots=[base] if base else [],
        read_threads=[thread],
        write_threads=[thread],
        create_threads=True,
    )


def result_scope(
    store: Store, thread: str, who: str, writable: Iterable[str] = ()
) -> Callable[[dict[str, bytes]], None]:
    """A ``check_threads`` for importing the result of ``who`` (a run): it may move ``thread``
    (and ``writable``) and create threads the store does not have (its nested runs'), never an
    existing thread of another run or of the user.

    Raises (from the returned function):
        OutOfScope: the bundle moves an existing thread outside the scope.
    """
    allowed = {thread, *writable}

    def check(threads: dict[str, bytes]) -> None:
        existing = set(store.meta.ids("threads"))
        for thread_id in sorted(threads):
            if thread_id not in allowed and thread_id in existing:
                raise OutOfScope(
                    f"the result of {who} would write thread {thread_id}, which is not its own"
                )

    return check


class RunTokenPolicy:
    """The policy of a hub or runtime.

    Args:
        store: The store whose run records say which runs ended.
        environment_id: The node's own environment id.
        blocking: Runs store work off the event loop.
        snapshot_thread: The thread ``narrative:snapshot`` writes (None: the store's default).
        run_at: The run driven in an environment, if any (the environments of other runs are
            out of a token's reach).
    """

    def __init__(
        self,
        store: Store,
        environment_id: str,
        blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
        snapshot_thread: Callable[[], str | None],
        run_at: Callable[[str], str | None],
    ) -> None:
        self.store = store
        self.environment_id = environment_id
        self._blocking = blocking
        self._snapshot_thread = snapshot_thread
        self._run_at = run_at
        #: runs whose tokens are refused from now on (their record may not say so yet)
        self.ended: set[str] = set()
        #: a hybrid run's tools node -> (its run, the calls routed to it): only those reach it
        self._routed: dict[str, tuple[str, Router]] = {}
        self._revoked_file = os.path.join(store.git_dir, "narrative", "revoked-tokens.json")
        #: token id → its expiry, for tokens revoked before they expire
        self.revoked: dict[str, float] = self._load_revoked()

    def _load_revoked(self) -> dict[str, float]:
        try:
            with open(self._revoked_file, "rb") as f:
                data = load_json(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # refusing to start would leave every run stranded; the tokens expire soon anyway
            log.warning("ignoring unreadable %s: %s", self._revoked_file, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}

    async def revoke_token(self, claims: TokenClaims) -> None:
        """Refuse the token with ``claims`` from now on, also after a restart (kept in the
        store until it expires)."""
        self.revoked[claims.token_id] = claims.expires_at
        now = time.time()
        for token_id, expires in list(self.revoked.items()):
            if expires <= now:
                del self.revoked[token_id]
        data = json.dumps(self.revoked, sort_keys=True).encode()
        await self._blocking(lambda: write_atomic(self._revoked_file, data))

    def route_to(self, node: str, run_id: str, calls: Router | None) -> None:
        """Let only run ``run_id``'s ``calls`` (the keys its rules match) name ``node`` as
        their target (a hybrid run's tools node); None: forget the node."""
        if calls is None:
            self._routed.pop(node, None)
        else:
            self._routed[node] = (run_id, calls)

    def end(self, run_id: str) -> None:
        """Refuse the tokens of ``run_id`` from now on."""
        self.ended.add(run_id)

    async def admit(self, claims: TokenClaims) -> None:
        if claims.run_id == CONTROL_RUN:
            return
        self._check_live(claims)

        def status() -> str | None:
            try:
                return get_run(self.store, claims.run_id).status
            except NarrativeError:  # not a run of this store (a runtime's agent, say)
                return None

        recorded = await self._blocking(status)
        if recorded is not None and recorded != "running":
            self.ended.add(claims.run_id)
            raise TokenRevoked(f"run {claims.run_id} has ended ({recorded}); its token is void")

    def authorize(
        self,
        claims: TokenClaims,
        kind: str,
        action: str,
        payload: dict[str, Any],
        target: str | None,
    ) -> None:
        if claims.run_id == CONTROL_RUN:
            return
        self._check_live(claims)
        run = claims.run_id
        if target is not None and target != self.environment_id:
            other = self._run_at(target)
            if other is not None and other != run:
                raise OutOfScope(f"a token of run {run} cannot call {target}, the run {other}'s")
            routed = self._routed.get(target)
            if routed is not None and (
                routed[0] != run or routed[1].match(kind, action).key is None
            ):
                raise OutOfScope(f"{kind}:{action} of run {run} is not routed to {target}")
        if kind in _UPSTREAM_ONLY:
            raise OutOfScope(f"{kind}:{action} is only taken from the hub upstream")
        if kind != "narrative":
            return
        if action == "prepareBundle":
            _check_read(claims, payload)
        elif action == "snapshot":
            thread = self._snapshot_thread()
            if thread is None or thread not in claims.write_threads:
                where = thread or "the store's default thread"
                raise OutOfScope(f"run {run} may not write snapshots to {where}")

    def _check_live(self, claims: TokenClaims) -> None:
        if claims.run_id in self.ended:
            raise TokenRevoked(f"run {claims.run_id} has ended; its token is void")
        if claims.token_id in self.revoked:
            raise TokenRevoked(f"this token of run {claims.run_id} was revoked (renewed)")


def _check_read(claims: TokenClaims, spec: dict[str, Any]) -> None:
    run = claims.run_id
    if spec.get("changed"):
        raise OutOfScope(f"run {run} may not ask for every changed thread")
    snapshot = spec.get("snapshot")
    if snapshot is not None and (
        not isinstance(snapshot, str) or snapshot not in claims.read_snapshots
    ):
        raise OutOfScope(f"snapshot {snapshot!r} is not part of run {run}'s input")
    threads = spec.get("threads") or []
    for thread in threads if isinstance(threads, list) else [threads]:
        if not isinstance(thread, str) or thread not in claims.read_threads:
            raise OutOfScope(f"thread {thread!r} is not part of run {run}'s input")
