"""A developer's side of a shared team hub: logging in with an invite, the login records kept
in the user's config directory, and the session connections every team command opens.

Login records live in ``platformdirs.user_config_dir("narrative")/hubs.json`` (directory mode
0700, file mode 0600, replaced atomically): ``{name: {url, user, role, credential, hub,
fingerprint}}``. Every connection to a team hub is made by :func:`dial`, the one place where
transport options (the TLS fingerprint pinned at login) are applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import platformdirs

from gateway.client import GatewayClient
from gateway.errors import AuthError, OutOfScope, Unavailable
from gateway.handlers import HandlerContext
from gateway.tls import client_ssl_context, normalize_fingerprint
from narrative.errors import InvalidInput, NarrativeError
from narrative.fsutil import write_atomic
from narrative.hierarchy import get_run
from narrative.jsonio import load_json
from narrative.models import AgentRun, Snapshot
from narrative.store import Store
from providers.manager import EnvironmentManager

from .direct import pick_base
from .events import EventBudget, RunEventLog
from .narratives import BundleShelf, fetch_bundle, have_commits
from .run_request import RunRequest
from .team import team_bearer
from .token_policy import result_scope

__all__ = [
    "HubLogin",
    "TeamSession",
    "bring_home",
    "control_team_run",
    "dial",
    "hubs_file",
    "load_logins",
    "login",
    "logout",
    "open_session",
    "run_events",
    "run_on_team_hub",
    "serve_bases",
    "team_runs",
    "transport_security",
]

DEFAULT_NAME = "default"
T = TypeVar("T")


def hubs_file() -> str:
    """Where this user's hub logins are kept."""
    return os.path.join(platformdirs.user_config_dir("narrative"), "hubs.json")


@dataclass(frozen=True, slots=True)
class HubLogin:
    """One login record: which hub, as whom, with which credential."""

    name: str
    url: str
    user: str
    role: str
    credential: str
    hub: str
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "user": self.user,
            "role": self.role,
            "credential": self.credential,
            "hub": self.hub,
            "fingerprint": self.fingerprint,
        }


def load_logins() -> dict[str, HubLogin]:
    """Every login record of this user, by name.

    Raises:
        InvalidInput: the file is not a valid login file.
    """
    try:
        with open(hubs_file(), "rb") as f:
            data = load_json(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {hubs_file()}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{hubs_file()} is not a hub login file")
    try:
        return {name: HubLogin(name=name, **record) for name, record in data.items()}
    except TypeError:
        raise InvalidInput(f"{hubs_file()} is not a hub login file") from None


def _save(logins: dict[str, HubLogin]) -> None:
    path = hubs_file()
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    data = {name: login.to_dict() for name, login in sorted(logins.items())}
    write_atomic(path, json.dumps(data, indent=1).encode())  # mkstemp: created 0600
    os.chmod(path, 0o600)


def find_login(name: str | None) -> HubLogin:
    """The login record ``name`` (None: the only one there is).

    Raises:
        InvalidInput: no such login, or several and no name given.
    """
    logins = load_logins()
    if name is None:
        if len(logins) == 1:
            return next(iter(logins.values()))
        if not logins:
            raise InvalidInput("not logged in to any hub (narrative hub login URL CODE)")
        raise InvalidInput(f"logged in to several hubs ({', '.join(sorted(logins))}): name one")
    if name not in logins:
        raise InvalidInput(f"no hub login named {name!r} (narrative hub login URL CODE)")
    return logins[name]


def transport_security(url: str, fingerprint: str | None) -> ssl_module.SSLContext | None:
    """The TLS context for dialling ``url`` (None for plain ``ws://``): the hub's certificate
    pinned by ``fingerprint`` (the one given at login), else verified against the system's
    roots."""
    return client_ssl_context(url, fingerprint=fingerprint)


@contextlib.asynccontextmanager
async def dial(
    url: str, bearer: str, fingerprint: str | None = None
) -> AsyncIterator[GatewayClient]:
    """A connection to the hub at ``url`` presenting ``bearer`` (a token or a team bearer):
    every connection to a team hub is made here."""
    client = GatewayClient(url, bearer, ssl=transport_security(url, fingerprint))
    async with client:
        yield client


async def login(url: str, code: str, name: str | None, fingerprint: str | None = None) -> HubLogin:
    """Trade the invite ``code`` at the hub ``url`` for a credential and keep it as the login
    record ``name`` (default ``default``), replacing one of that name. ``fingerprint`` pins
    the hub's certificate (as ``narrative serve`` printed it) for this and every later
    connection; without it a ``wss://`` hub's certificate is verified against the system's
    roots.

    Raises:
        AuthError: the code was refused (unknown, used, expired, rate-limited).
        Unavailable: the hub cannot be reached.
    """
    name = name or DEFAULT_NAME
    async with dial(url, team_bearer("invite", code), fingerprint) as client:
        answer = await client.call("team", "login", {"code": code}, target=client.server)
    record = HubLogin(
        name=name,
        url=url,
        user=answer["user"],
        role=answer["role"],
        credential=answer["credential"],
        hub=answer["hub"],
        # what this connection was pinned with; what the hub says of itself proves nothing
        fingerprint=normalize_fingerprint(fingerprint) if fingerprint else None,
    )
    logins = load_logins()
    logins[name] = record
    _save(logins)
    return record


async def logout(name: str | None) -> tuple[HubLogin, str | None]:
    """Void the credential of login ``name`` at its hub and delete the record; the record
    and, when the hub could not be told, why (the record is deleted all the same)."""
    record = find_login(name)
    problem = None
    try:
        async with dial(
            record.url, team_bearer("credential", record.credential), record.fingerprint
        ) as client:
            await client.call("team", "logout", {}, target=record.hub)
    except (AuthError, Unavailable) as exc:
        problem = str(exc)
    logins = load_logins()
    logins.pop(record.name, None)
    _save(logins)
    return record, problem


@dataclass(frozen=True, slots=True)
class TeamSession:
    """An open session on a team hub: the connection, the hub's id and who we are there."""

    client: GatewayClient
    login: HubLogin
    user: str
    role: str

    async def call(self, action: str, payload: dict[str, Any]) -> Any:
        """Call ``team:<action>`` at the hub."""
        return await self.client.call("team", action, payload, target=self.login.hub)


@contextlib.asynccontextmanager
async def open_session(name: str | None) -> AsyncIterator[TeamSession]:
    """A session on the hub of login ``name``: the credential buys a short-lived session
    token, and the session's connection presents that.

    Raises:
        InvalidInput: no such login. AuthError: the credential was refused (revoked).
    """
    record = find_login(name)
    answer = await _new_session(record, {})
    async with dial(record.url, answer["token"], record.fingerprint) as client:
        renewal = asyncio.create_task(_renew(client, record, answer))
        try:
            yield TeamSession(client, record, answer["user"], answer["role"])
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal


async def _new_session(record: HubLogin, payload: dict[str, Any]) -> Any:
    """A session token bought with the credential of ``record`` (``team:session``)."""
    bearer = team_bearer("credential", record.credential)
    async with dial(record.url, bearer, record.fingerprint) as client:
        return await client.call("team", "session", payload, target=record.hub)


async def _renew(client: GatewayClient, record: HubLogin, answer: dict[str, Any]) -> None:
    """Keep the session's connection alive: halfway through each token's life, buy a fresh
    token for the same session and present it on the connection (``gateway:refresh``)."""
    environment = client.gateway.environment_id
    while True:
        await asyncio.sleep(float(answer["expiresIn"]) / 2)
        try:
            answer = await _new_session(record, {"environment": environment})
            token = {"token": answer["token"]}
            await client.call("gateway", "refresh", token, target=record.hub, timeout=10)
        except NarrativeError:
            # revoked, or the hub is gone: the connection ends with its token, and the next
            # call says why
            return


# -- runs on a team hub ---------------------------------------------------------------------------

EventFn = Callable[[AgentRun, dict[str, Any]], None]
_POLL = 0.1
_NOT_COPIED = frozenset({"seq", "type", "hub", "handle"})
"""Fields of a team hub's events its local copy leaves out: the numbering is the local log's,
and what names a hub or a process is the remote side's, never one of this machine's (local
readers look for the hub driving a run, or its runtime's handle, there)."""


def serve_bases(
    session: TeamSession, store: Store, bases: Mapping[str | None, str | Sequence[str]]
) -> None:
    """Let the hub pull ``bases`` from ``store`` and nothing else of it: each maps a snapshot
    id to its thread (the hub pulls that snapshot with that thread's records), or None to the
    threads whose records alone it may pull; the session's bundle shelf refuses any other
    request."""
    registry = session.client.gateway.handlers
    shelf = BundleShelf(store, _blocking)
    shelf.install(registry)
    prepare = registry.lookup("narrative", "prepareBundle")
    assert prepare is not None
    allowed = {
        (snapshot, thread)
        for snapshot, threads in bases.items()
        for thread in ([threads] if isinstance(threads, str) else threads)
    }

    async def guarded(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
        snapshot, threads = payload.get("snapshot"), payload.get("threads")
        if (
            payload.get("changed")
            or not isinstance(threads, list)
            or len(threads) != 1
            or (snapshot, threads[0]) not in allowed
        ):
            raise OutOfScope("the hub may only pull what this CLI offered it")
        return await prepare(ctx, payload)

    registry.register("narrative", "prepareBundle", guarded, replace=True)


async def _blocking(func: Callable[[], T]) -> T:
    return await asyncio.to_thread(func)


async def bring_home(session: TeamSession, store: Store, run: AgentRun) -> AgentRun:
    """The run's final record, imported into ``store`` with its result (on the run's own
    thread, forked from the user's base) when it has one."""
    answer = await session.call("runs", {"run": run.id})
    final = AgentRun.from_dict(answer["runs"][0])

    async def call(kind: str, action: str, payload: dict[str, Any]) -> Any:
        if action == "prepareBundle":
            return await session.call("prepareResult", {"run": run.id, **payload})
        return await session.client.call(kind, action, payload, target=session.login.hub)

    spec = {"have": await _blocking(lambda: have_commits(store))}
    scope = result_scope(store, final.thread_id, f"run {run.id}")
    await fetch_bundle(call, store, spec, _blocking, session.login.url, check_threads=scope)
    return await _blocking(lambda: get_run(store, run.id))


async def run_events(session: TeamSession, run_id: str) -> AsyncIterator[dict[str, Any]]:
    """The events of run ``run_id`` on the session's hub as they come, up to and including
    its ``run.finished``."""
    since = 0
    while True:
        answer = await session.call("runEvents", {"run": run_id, "since": since})
        events: list[dict[str, Any]] = answer["events"]
        for event in events:
            since = int(event["seq"])
            yield event
            if event["type"] == "run.finished":
                return
        if not events:
            await asyncio.sleep(_POLL)


async def _follow(
    session: TeamSession, store: Store, runs: list[AgentRun], on_event: EventFn
) -> None:
    """Pass the runs' events on as they arrive until each finished, and keep a copy of each
    run's log in ``store`` (held to the default caps of a run's log: the hub is not trusted to
    send a bounded one), so that ``run show`` tells its story here too."""

    async def follow(run: AgentRun) -> None:
        log, budget = RunEventLog(store, run.id), EventBudget()
        async for event in run_events(session, run.id):
            on_event(run, event)
            fields = {k: v for k, v in event.items() if k not in _NOT_COPIED}
            for kind, kept in budget.admit(str(event["type"]), fields):
                await _blocking(partial(log.append, kind, **kept))

    await asyncio.gather(*(follow(run) for run in runs))


async def run_on_team_hub(
    store: Store, name: str | None, requests: Sequence[RunRequest], on_event: EventFn
) -> list[AgentRun]:
    """Start ``requests`` on the team hub of login ``name`` from bases in ``store`` (a fresh
    snapshot of the workspace unless a request names a snapshot or thread), follow their
    events, and bring each result home into ``store``; the runs' final records."""
    manager = EnvironmentManager(store)

    def base_of(request: RunRequest) -> Snapshot:
        return pick_base(manager, request.snapshot, request.thread)

    bases = [await asyncio.to_thread(base_of, request) for request in requests]
    async with open_session(name) as session:
        serve_bases(session, store, {base.id: base.thread for base in bases})
        runs = []
        for request, base in zip(requests, bases, strict=True):
            payload = {**request.to_payload(), "snapshot": base.id, "thread": base.thread}
            runs.append(AgentRun.from_dict(await session.call("runStart", payload)))
        await _follow(session, store, runs, on_event)
        return [await bring_home(session, store, run) for run in runs]


async def team_runs(name: str | None) -> list[dict[str, Any]]:
    """The runs the user of login ``name`` may see on its hub (an admin: everyone's)."""
    async with open_session(name) as session:
        return list((await session.call("runs", {}))["runs"])


async def control_team_run(name: str | None, action: str, payload: dict[str, Any]) -> None:
    """``runStop`` or ``runKill`` a run on the hub of login ``name``."""
    async with open_session(name) as session:
        await session.call(action, payload)
