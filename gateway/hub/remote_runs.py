"""Runs of a team hub's users: started from a user's session, owned by that user.

``team:runStart`` pulls the user's base snapshot from their CLI (the CLI serves that one
snapshot as a bundle, :mod:`gateway.hub.narratives`; the hub imports it, creating threads it
does not have or moving only threads that user brought in before, never another's) and starts
the run like any other (:meth:`gateway.hub.server.Hub.submit`). The run belongs to the user
(``runs.json`` in the store's team directory): ``team:runs``, ``team:runEvents`` (the run's
events after a sequence number), ``team:runStop``, ``team:runKill`` and ``team:prepareResult``
(the finished run's records and result as a bundle, which the CLI pulls with
``narrative:readBundle``) refuse any run that is not the caller's, unless the caller is an
admin. A run in another user's private environment (:mod:`gateway.hub.remote_envs`) is
refused. Every start, stop and kill, and every refusal, goes to the audit log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import AccessDenied, OutOfScope
from gateway.handlers import HandlerContext, HandlerRegistry
from narrative.errors import InvalidInput, NarrativeError
from narrative.fsutil import write_atomic
from narrative.hierarchy import get_run
from narrative.history import resolve_snapshot
from narrative.jsonio import load_json
from narrative.models import AgentRun
from transfer.thread_updates import ImportResult

from .events import RunEventLog
from .narratives import fetch_bundle, have_commits
from .run_request import RunRequest
from .team import Caller
from .users import team_dir

if TYPE_CHECKING:
    from .server import Hub

__all__ = ["MAX_EVENTS", "RemoteRuns"]

#: Events ``team:runEvents`` answers at most per call (the CLI asks again from the last).
MAX_EVENTS = 500
_PULL_TIMEOUT = 120.0


class RemoteRuns:
    """The ``team:run*`` calls of a hub, and who owns which run and thread."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.team = hub.team
        self.path = os.path.join(team_dir(hub.store), "runs.json")
        self._owners: dict[str, Any] | None = None
        #: the user whose private environment a name or id is (None: the hub's own); set by
        #: the hub (:class:`gateway.hub.remote_envs.RemoteEnvironments`)
        self.environment_owner: Callable[[str], str | None] = lambda environment: None

    def install(self, registry: HandlerRegistry) -> None:
        for action, handler in (
            ("runStart", self._start),
            ("runs", self._runs),
            ("runEvents", self._events),
            ("runStop", self._stop),
            ("runKill", self._kill),
            ("prepareResult", self._prepare_result),
        ):
            registry.register("team", action, handler)

    # -- ownership ------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if self._owners is None:
            try:
                with open(self.path, "rb") as f:
                    data = load_json(f)
            except FileNotFoundError:
                data = {}
            data = data if isinstance(data, dict) else {}
            self._owners = {"runs": data.get("runs", {}), "threads": data.get("threads", {})}
        return self._owners

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self._load(), indent=1, sort_keys=True).encode())
        os.chmod(self.path, 0o600)

    def owner(self, run_id: str) -> str | None:
        """The user who started ``run_id`` (None: not a user's run)."""
        record = self._load()["runs"].get(run_id)
        return str(record["user"]) if record else None

    async def _owned(self, caller: Caller, action: str, payload: dict[str, Any]) -> str:
        run_id = payload.get("run")
        if not isinstance(run_id, str) or not run_id:
            raise InvalidInput("'run' must be a run id")
        owner = await self.hub.blocking(lambda: self.owner(run_id))
        if owner is None or (owner != caller.user and not caller.admin):
            exc = AccessDenied(f"run {run_id} is not one of yours on this hub")
            await self.team.refuse(caller.user, action, run_id, exc)
            raise exc
        return run_id

    async def _audit_ok(self, caller: Caller, action: str, run_id: str) -> None:
        await self.hub.blocking(lambda: self.team.audit.record(caller.user, action, run_id, "ok"))

    def _thread_check(self, user: str) -> Callable[[dict[str, bytes]], None]:
        """An upload of ``user`` may create threads and move the threads they brought before,
        never a thread of the hub's own or of another user."""
        store = self.hub.store

        def check(threads: dict[str, bytes]) -> None:
            existing = set(store.meta.ids("threads"))
            owners = self._load()["threads"]
            for thread_id in sorted(threads):
                if thread_id in existing and owners.get(thread_id) != user:
                    raise OutOfScope(f"{user}'s snapshot would move thread {thread_id}")

        return check

    def thread_owner(self, thread_id: str) -> str | None:
        """The user who brought ``thread_id`` to the hub (None: the hub's own, or unknown)."""
        owner = self._load()["threads"].get(thread_id)
        return str(owner) if owner is not None else None

    async def pull_from_user(
        self, ctx: HandlerContext, user: str, thread: str, snapshot: str | None
    ) -> ImportResult:
        """Import from the CLI making the call (``ctx``) the records of ``thread`` and, when
        given, ``snapshot`` (which the CLI serves as a bundle): the import may create threads
        and move those ``user`` brought before, never another's; ``thread`` and every thread
        the import moved are ``user``'s from then on."""
        hub = self.hub
        peer = ctx.route_path[0]

        async def call(kind: str, action: str, spec: dict[str, Any]) -> Any:
            return await hub.gateway.call(kind, action, spec, target=peer, timeout=_PULL_TIMEOUT)

        check = self._thread_check(user)

        def ask() -> dict[str, Any]:
            # the thread named is recorded as the user's below, even when the bundle leaves
            # its head out: it must be new or theirs already
            check({thread: b""})
            return {"threads": [thread], "have": have_commits(hub.store)}

        spec = await hub.blocking(ask)
        if snapshot is not None:
            spec["snapshot"] = snapshot
        imported, _ = await fetch_bundle(
            call,
            hub.store,
            spec,
            hub.blocking,
            f"user {user}",
            check_threads=check,
            max_bytes=hub.store.config.max_import_size,
        )

        def own_threads() -> None:
            owners = self._load()["threads"]
            for thread_id in [thread, *imported.updated]:
                owners.setdefault(thread_id, user)
            self._save()

        await hub.blocking(own_threads)
        return imported

    def _check_environment(self, caller: Caller, environment: str) -> None:
        """Refuse a run in another user's private environment."""
        owner = self.environment_owner(environment)
        if owner is not None and owner != caller.user and not caller.admin:
            raise AccessDenied(f"environment {environment} is not one of yours on this hub")

    # -- handlers -------------------------------------------------------------------------------

    async def _start(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        snapshot, thread = payload.get("snapshot"), payload.get("thread")
        if not isinstance(snapshot, str) or not isinstance(thread, str):
            raise InvalidInput("'snapshot' and 'thread' must name the base the CLI serves")
        request = RunRequest.from_payload({**payload, "thread": None})
        hub = self.hub
        try:
            if request.environment is not None:
                named = request.environment
                await hub.blocking(lambda: self._check_environment(caller, named))
            await self.pull_from_user(ctx, caller.user, thread, snapshot)
            run = await hub.submit(request)
        except NarrativeError as exc:
            await self.team.refuse(caller.user, "runStart", request.environment, exc)
            raise

        # owned before the driver's first step (no await since submit returned): the run's
        # runtime is held to its user's limits from its first call
        self._load()["runs"][run.id] = {"user": caller.user, "thread": run.thread_id}

        def persist() -> None:
            self._save()
            self.team.audit.record(caller.user, "runStart", run.id, "ok")

        await hub.blocking(persist)
        return {**run.to_dict(), "user": caller.user}

    async def _runs(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)

        def listing() -> list[dict[str, Any]]:
            found = []
            for run_id, record in sorted(self._load()["runs"].items()):
                if record["user"] != caller.user and not caller.admin:
                    continue
                try:
                    run = get_run(self.hub.store, run_id)
                except NarrativeError:
                    continue
                found.append({**run.to_dict(), "user": record["user"]})
            return found

        if payload.get("run") is not None:
            run_id = await self._owned(caller, "runs", payload)
            run = await self.hub.blocking(lambda: get_run(self.hub.store, run_id))
            return {"runs": [{**run.to_dict(), "user": self.owner(run_id)}]}
        return {"runs": await self.hub.blocking(listing)}

    async def _events(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        run_id = await self._owned(caller, "runEvents", payload)
        since = payload.get("since", 0)
        if not isinstance(since, int) or since < 0:
            raise InvalidInput("'since' must be a non-negative event number")
        events = await self.hub.blocking(lambda: RunEventLog(self.hub.store, run_id).read(since))
        return {"events": events[:MAX_EVENTS]}

    async def _stop(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        run_id = await self._owned(caller, "runStop", payload)
        grace = payload.get("grace")
        if grace is not None and (not isinstance(grace, int | float) or grace < 0):
            raise InvalidInput("'grace' must be a non-negative number of seconds")
        await self.hub.stop_run(run_id, grace)
        await self._audit_ok(caller, "runStop", run_id)
        return {"run": run_id}

    async def _kill(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        run_id = await self._owned(caller, "runKill", payload)
        await self.hub.kill_run(run_id)
        await self._audit_ok(caller, "runKill", run_id)
        return {"run": run_id}

    async def _prepare_result(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        run_id = await self._owned(caller, "prepareResult", payload)

        def result() -> tuple[AgentRun, str | None]:
            run = get_run(self.hub.store, run_id)
            if run.status == "running":
                raise InvalidInput(f"run {run_id} is still running")
            if not run.result_snapshot:
                return run, None  # its records travel all the same
            # a run that changed nothing has its base as its result: that thread is the
            # user's, and only the run's own thread travels
            snap = resolve_snapshot(self.hub.store, run.result_snapshot)
            return run, snap.id if snap.thread == run.thread_id else None

        run, snapshot = await self.hub.blocking(result)
        prepare = self.hub.gateway.handlers.lookup("narrative", "prepareBundle")
        if prepare is None:
            raise NarrativeError("this hub serves no bundles")
        spec = {"threads": [run.thread_id], "have": payload.get("have", [])}
        if snapshot is not None:
            spec["snapshot"] = snapshot
        prepared: dict[str, Any] = await prepare(ctx, spec)
        return prepared
