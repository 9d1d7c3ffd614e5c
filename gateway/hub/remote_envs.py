"""Private environments of a team hub's users: clones of the owner's templates, each driven
through ``team:env*`` calls by the user who made it (the server side of the ``remote``
provider, whose every operation runs here).

A *template* is an environment the hub's owner made (not archived, not a user's clone, no
``path`` in its config and not ``hybrid``: its clones would share that directory or those
environments). ``team:envCreate`` clones one, with its
provider and config exactly, under a fresh name ``u-<8 hex>``, and records who owns it in
``envs.json`` in the store's team directory (mode 0600, replaced atomically)::

    {name: {"user", "template", "label", "id"}}

Every other call names the environment and refuses (``AccessDenied``, audited) one that is not
the caller's (an admin reaches every user's clones; nobody reaches a template through these
calls). ``envReset`` readies a clone for a run as the hub readies its own environments.
Snapshots travel as in :mod:`gateway.hub.remote_runs`: ``envRestore`` and
``envCollect`` pull from the caller's CLI over its own connection, with the same per-user
thread ownership; ``envPrepareSnapshot`` prepares a snapshot ``envCollect`` made as a bundle
the CLI pulls with ``narrative:readBundle``.

A provider's failure that the client re-raises as the same class (:data:`RELAYED`) is answered
as ``{"failure": {"type", "message"}}`` instead of an error: the gateway's error codes do not
carry the class. Every create and delete, and every refusal, goes to the audit log.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import AccessDenied
from gateway.handlers import HandlerContext, HandlerRegistry
from narrative.errors import InvalidInput, NarrativeError
from narrative.fsutil import write_atomic
from narrative.history import resolve_snapshot
from narrative.jsonio import load_json
from narrative.models import Snapshot
from narrative.runs import incoming_ref
from providers.base import Health, Signal
from providers.errors import EnvironmentNotFound, ExecFailed, ProviderUnavailable, ResourceGone
from providers.lifecycle import EnvState
from providers.records import EnvironmentRecord
from providers.registry import get_provider_class
from transfer.thread_updates import ImportResult, fast_forward

from .remote_runs import RemoteRuns
from .team import Caller
from .users import team_dir

if TYPE_CHECKING:
    from .server import Hub

__all__ = ["CLONE_PREFIX", "RELAYED", "RemoteEnvironments"]

#: Names of users' clones start so (then 8 lowercase hex digits).
CLONE_PREFIX = "u-"
#: Failures answered as ``{"failure": ...}`` (the first class the error is an instance of).
RELAYED: tuple[type[NarrativeError], ...] = (
    ResourceGone,
    ExecFailed,
    ProviderUnavailable,
    InvalidInput,
)
_SIGNALS: dict[str, Signal] = {"term": "term", "kill": "kill"}


def _string(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{key!r} must be a non-empty string")
    return value


def _optional_string(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{key!r} must be a string or null")
    return value


def _argv(payload: dict[str, Any]) -> list[str]:
    # an empty one is the provider's to refuse (relayed as its InvalidInput)
    argv = payload.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise InvalidInput("'argv' must be a list of strings")
    return list(argv)


def _env(payload: dict[str, Any]) -> dict[str, str]:
    env = payload.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidInput("'env' must map names to strings")
    return dict(env)


def _data(payload: dict[str, Any]) -> bytes:
    data = payload.get("data")
    if not isinstance(data, str):
        raise InvalidInput("'data' must be base64")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidInput("'data' must be base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class RemoteEnvironments:
    """The ``team:env*`` calls of a hub, and who owns which private environment.

    Args:
        hub: The hub (its manager, store, gateway and team).
        runs: The hub's team runs: their thread ownership and pulls from a user's CLI.
    """

    def __init__(self, hub: Hub, runs: RemoteRuns) -> None:
        self.hub = hub
        self.runs = runs
        self.team = hub.team
        self.manager = hub.manager
        self.path = os.path.join(team_dir(hub.store), "envs.json")
        self._clones: dict[str, dict[str, Any]] | None = None
        # Commands, files and processes of a user's clones run in that user's lane of the hub
        # (:mod:`gateway.hub.lanes`), not on its store thread: a long command of one user must
        # not hold up every run and every other user's calls (the store thread serializes the
        # store, which these do not write but through the environment records' own lock).

    def install(self, registry: HandlerRegistry) -> None:
        for action, handler in (
            ("envCreate", self._create),
            ("envList", self._list),
            ("envDelete", self._delete),
            ("envStart", self._start),
            ("envStop", self._stop),
            ("envHealth", self._health),
            ("envExec", self._exec),
            ("envReadFile", self._read_file),
            ("envWriteFile", self._write_file),
            ("envDeleteFile", self._delete_file),
            ("envSpawn", self._spawn),
            ("envSignal", self._signal),
            ("envAlive", self._alive),
            ("envReset", self._reset),
            ("envRestore", self._restore),
            ("envCollect", self._collect),
            ("envPrepareSnapshot", self._prepare_snapshot),
        ):
            registry.register("team", action, handler)

    # -- ownership ------------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._clones is None:
            try:
                with open(self.path, "rb") as f:
                    data = load_json(f)
            except FileNotFoundError:
                data = {}
            self._clones = data if isinstance(data, dict) else {}
        return self._clones

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self._load(), indent=1, sort_keys=True).encode())
        os.chmod(self.path, 0o600)

    def _entry(self, environment: str) -> tuple[str, dict[str, Any]] | None:
        """The clone named (or with the id) ``environment``: its name and ownership record."""
        clones = self._load()
        if environment in clones:
            return environment, clones[environment]
        for name, entry in clones.items():
            if entry.get("id") == environment:
                return name, entry
        return None

    def owner(self, environment: str) -> str | None:
        """The user whose clone ``environment`` (a name or id) is; None: the hub's own."""
        found = self._entry(environment)
        return str(found[1]["user"]) if found is not None else None

    def private_ids(self) -> frozenset[str]:
        """The ids of every user's clone (which the hub never selects for a run)."""
        clones = self._load()
        ids = {str(e["id"]) for e in clones.values() if e.get("id")}
        # a creation cut short before its id was written down: found by its name
        pending = {name for name, e in clones.items() if not e.get("id")}
        if pending:
            ids |= {r.id for r in self.manager.environments() if r.name in pending}
        return frozenset(ids)

    def _record(self, name: str, entry: dict[str, Any]) -> EnvironmentRecord:
        """The clone's record (by its id, so an archived one is found too)."""
        return self.manager.get(str(entry.get("id") or name))

    async def _owned(
        self, caller: Caller, action: str, payload: dict[str, Any]
    ) -> tuple[str, EnvironmentRecord]:
        """The caller's clone that ``payload`` names (its name and record); anything else is
        refused, audited. An admin's call on a user's clone moves that user's threads
        (:meth:`_user_of`)."""
        environment = _string(payload, "environment")
        found = await self.hub.blocking(lambda: self._entry(environment))
        if found is None or (found[1]["user"] != caller.user and not caller.admin):
            exc = AccessDenied(f"environment {environment} is not one of yours on this hub")
            await self.team.refuse(caller.user, action, environment, exc)
            raise exc
        name, entry = found
        return name, await self.hub.blocking(lambda: self._record(name, entry))

    async def _audit_ok(self, caller: Caller, action: str, target: str) -> None:
        await self.hub.blocking(lambda: self.team.audit.record(caller.user, action, target, "ok"))

    async def _relay(
        self,
        func: Callable[[], dict[str, Any]],
        live: EnvironmentRecord | None = None,
        *,
        user: str | None = None,
    ) -> dict[str, Any]:
        """``func``'s answer, run off the loop (in ``user``'s lane when given, else on
        the store thread); a :data:`RELAYED` failure as an answer. With ``live``, a deleted
        environment fails as ``ResourceGone`` first (as a provider's operation on a resource
        that is gone does)."""

        def checked() -> dict[str, Any]:
            if live is not None:
                current = self.manager.get(live.id)
                if current.state is EnvState.ARCHIVED or current.resource_id is None:
                    raise ResourceGone(current.resource_id or current.name)
            return func()

        try:
            if user is None:
                return await self.hub.blocking(checked)
            return await self.hub.lanes.run(f"user:{user}", checked)
        except RELAYED as exc:
            kind = next(cls for cls in RELAYED if isinstance(exc, cls))
            return {"failure": {"type": kind.__name__, "message": str(exc)}}

    # -- lifecycle ------------------------------------------------------------------------------

    def _template(self, name: str) -> EnvironmentRecord:
        record = self.manager.get(name)
        if record.state is EnvState.ARCHIVED:
            raise EnvironmentNotFound(name)
        if self._entry(record.name) is not None or self._entry(record.id) is not None:
            raise InvalidInput(f"environment {name} is a user's environment, not a template")
        if record.provider == "hybrid":  # made of two others, which its clones would share
            raise InvalidInput(
                f"environment {name} is made of other environments, which its clones would "
                "share, so it cannot be a template"
            )
        if record.config.get("path"):
            raise InvalidInput(
                f"environment {name} has a fixed path: its clones would share it, so it "
                "cannot be a template"
            )
        return record

    def _fresh_name(self) -> str:
        taken = set(self._load()) | {r.name for r in self.manager.environments()}
        while True:
            name = f"{CLONE_PREFIX}{secrets.token_hex(4)}"
            if name not in taken:
                return name

    async def _create(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        template = payload.get("template")
        label = payload.get("label", "")
        try:
            if not isinstance(template, str) or not template:
                raise InvalidInput("'template' must name an environment of the hub")
            if not isinstance(label, str):
                raise InvalidInput("'label' must be a string")
            record = await self.hub.blocking(lambda: self._clone(caller, template, label))
        except NarrativeError as exc:
            await self.team.refuse(caller.user, "envCreate", str(template), exc)
            raise
        await self._audit_ok(caller, "envCreate", record.name)
        return {
            "environment": record.name,
            "provider": record.provider,
            "state": record.state.value,
        }

    def _clone(self, caller: Caller, template: str, label: str) -> EnvironmentRecord:
        source = self._template(template)
        name = self._fresh_name()
        clones = self._load()
        # owned before it exists: a crash mid-creation never leaves an environment of
        # nobody's, which would pass for one of the owner's templates
        clones[name] = {"user": caller.user, "template": source.name, "label": label}
        self._save()
        model = get_provider_class(source.provider).config_model
        # every setting spelled out, so the project file's base config cannot change any
        config = model.model_validate(source.config).model_dump(mode="json", exclude={"type"})
        try:
            return self.manager.create(name, provider=source.provider, config=config)
        except BaseException:
            live = [r for r in self.manager.environments() if r.name == name]
            if live:  # created but not started: theirs to delete
                clones[name]["id"] = live[0].id
            else:
                del clones[name]
            raise
        finally:
            if name in clones and "id" not in clones[name]:
                clones[name]["id"] = self.manager.get(name).id
            self._save()

    async def _list(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        label = _optional_string(payload, "label")

        def listing() -> list[dict[str, Any]]:
            found = []
            for name, entry in sorted(self._load().items()):
                if entry["user"] != caller.user and not caller.admin:
                    continue
                if label is not None and entry["label"] != label:
                    continue
                try:
                    record = self._record(name, entry)
                    state, provider = record.state.value, record.provider
                except EnvironmentNotFound:
                    state, provider = EnvState.ARCHIVED.value, ""
                found.append(
                    {
                        "environment": name,
                        "template": entry["template"],
                        "label": entry["label"],
                        "state": state,
                        "provider": provider,
                        "user": entry["user"],
                    }
                )
            return found

        return {"environments": await self.hub.blocking(listing)}

    async def _delete(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        name, record = await self._owned(caller, "envDelete", payload)

        def delete() -> dict[str, Any]:
            self.manager.delete(record.id)  # an archived one is deleted already
            return {}

        answer = await self._relay(delete)
        if "failure" not in answer:
            await self._audit_ok(caller, "envDelete", name)
        return answer

    async def _start(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envStart", payload)
        return await self._relay(
            lambda: {"state": self.manager.start(record.id).state.value}, record
        )

    async def _stop(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envStop", payload)
        return await self._relay(
            lambda: {"state": self.manager.stop(record.id).state.value}, record
        )

    async def _health(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envHealth", payload)

        def probe() -> dict[str, Any]:
            current = self.manager.get(record.id)
            if current.state is EnvState.ARCHIVED or current.resource_id is None:
                return {"health": Health.GONE.value, "state": current.state.value}
            reports = self.manager.check_health([current.id])
            if reports:  # the check moved the state as its result says
                return {"health": reports[0].health, "state": reports[0].state}
            # mid-transition: probed, the state left to the transition under way
            health = self.manager.provider(current).health(current.resource_id)
            return {"health": health.value, "state": current.state.value}

        return await self._relay(probe)

    # -- commands and files ---------------------------------------------------------------------

    async def _exec(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envExec", payload)
        argv, env = _argv(payload), _env(payload)
        timeout = payload.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise InvalidInput("'timeout' must be a positive number of seconds or null")

        def run() -> dict[str, Any]:
            result = self.manager.exec(record.id, argv, env=env, timeout=timeout)
            return {
                "exitCode": result.exit_code,
                "timedOut": result.timed_out,
                "stdout": _b64(result.stdout),
                "stderr": _b64(result.stderr),
            }

        return await self._relay(run, record, user=caller.user)

    async def _read_file(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envReadFile", payload)
        path = _string(payload, "path")

        def read() -> dict[str, Any]:
            _, provider, resource = self.manager.require_active(record.id)
            return {"data": _b64(provider.read_file(resource, path))}

        return await self._relay(read, record, user=caller.user)

    async def _write_file(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envWriteFile", payload)
        path, data = _string(payload, "path"), _data(payload)

        def write() -> dict[str, Any]:
            _, provider, resource = self.manager.require_active(record.id)
            provider.write_file(resource, path, data)
            return {}

        return await self._relay(write, record, user=caller.user)

    async def _delete_file(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envDeleteFile", payload)
        path = _string(payload, "path")

        def delete() -> dict[str, Any]:
            _, provider, resource = self.manager.require_active(record.id)
            provider.delete_file(resource, path)
            return {}

        return await self._relay(delete, record, user=caller.user)

    async def _spawn(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envSpawn", payload)
        argv, env = _argv(payload), _env(payload)
        return await self._relay(
            lambda: {"handle": self.manager.spawn(record.id, argv, env)}, record, user=caller.user
        )

    async def _signal(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envSignal", payload)
        handle, sig = _string(payload, "handle"), payload.get("signal")
        if sig not in _SIGNALS:
            raise InvalidInput(f"'signal' must be one of {', '.join(_SIGNALS)}")

        def send() -> dict[str, Any]:
            self.manager.signal(record.id, handle, _SIGNALS[sig])
            return {}

        return await self._relay(send, record, user=caller.user)

    async def _reset(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        """Make the clone ready for a new run: what runs there is killed, the workspace and
        temporary directories emptied (:meth:`EnvironmentManager.prepare_run`)."""
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envReset", payload)

        def reset() -> dict[str, Any]:
            self.manager.prepare_run(record.id, None)
            return {}

        return await self._relay(reset, record, user=caller.user)

    async def _alive(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        _, record = await self._owned(caller, "envAlive", payload)
        handle = _string(payload, "handle")
        return await self._relay(
            lambda: {"alive": self.manager.alive(record.id, handle)}, record, user=caller.user
        )

    # -- snapshots ------------------------------------------------------------------------------

    def _snapshot(self, snapshot_id: str) -> Snapshot:
        """The snapshot with exactly this id (no prefix, thread or run name)."""
        snap = resolve_snapshot(self.hub.store, snapshot_id)
        if snap.id != snapshot_id:
            raise InvalidInput(f"'snapshot' must be a snapshot id, not {snapshot_id!r}")
        return snap

    async def _restore(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        name, record = await self._owned(caller, "envRestore", payload)
        snapshot, thread = _string(payload, "snapshot"), _string(payload, "thread")
        user = self._user_of(name)
        try:
            await self.runs.pull_from_user(ctx, user, thread, snapshot)
        except NarrativeError as exc:
            await self.team.refuse(caller.user, "envRestore", name, exc)
            raise

        def restore() -> dict[str, Any]:
            snap = self._snapshot(snapshot)
            _, provider, resource = self.manager.require_active(record.id)
            provider.restore(resource, snap)
            return {"snapshot": snap.id}

        return await self._relay(restore, record)

    def _user_of(self, name: str) -> str:
        """The user whose threads a call on clone ``name`` (found by :meth:`_owned`) moves:
        its owner's, whoever calls."""
        return str(self._load()[name]["user"])

    async def _collect(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        name, record = await self._owned(caller, "envCollect", payload)
        thread = _string(payload, "thread")
        head = _optional_string(payload, "head")
        run = _optional_string(payload, "run")
        message = payload.get("message", "")
        if not isinstance(message, str):
            raise InvalidInput("'message' must be a string")
        user = self._user_of(name)
        try:
            # the thread's records (a run's, with the run) and head come from the CLI
            await self.runs.pull_from_user(ctx, user, thread, head)
        except NarrativeError as exc:
            await self.team.refuse(caller.user, "envCollect", name, exc)
            raise

        def collect() -> dict[str, Any]:
            _, provider, resource = self.manager.require_active(record.id)
            snap = provider.collect(resource, thread, run, message)
            if run is not None:
                self._land(thread, run, snap)
            return {"snapshot": snap.to_dict()}

        return await self._relay(collect, record)

    def _land(self, thread: str, run: str, snap: Snapshot) -> None:
        """Put a run's result that the provider staged onto its thread: it is screened where
        it lands (the caller's store), this hub only relays it."""
        store = self.hub.store
        commit = bytes.fromhex(snap.commit)
        result = ImportResult(f"environment:{snap.id}", "collect", "collect")
        fast_forward(store, thread, commit, "collect", result)
        if thread not in result.updated and thread not in result.unchanged:
            raise NarrativeError(f"thread {thread} moved while its snapshot was collected")
        staged = incoming_ref(run)
        if store.refs.read(staged) == commit:
            store.refs.update(staged, None, expected=commit)

    async def _prepare_snapshot(
        self, ctx: HandlerContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        caller = self.team.caller(ctx)
        name, _ = await self._owned(caller, "envPrepareSnapshot", payload)
        snapshot = _string(payload, "snapshot")
        user = self._user_of(name)

        def find() -> tuple[Snapshot, bool]:
            snap = self._snapshot(snapshot)
            return snap, self.runs.thread_owner(snap.thread) == user

        snap, theirs = await self.hub.blocking(find)
        if not theirs:
            exc = AccessDenied(f"snapshot {snapshot} is not one of yours on this hub")
            await self.team.refuse(caller.user, "envPrepareSnapshot", snapshot, exc)
            raise exc
        prepare = self.hub.gateway.handlers.lookup("narrative", "prepareBundle")
        if prepare is None:
            raise NarrativeError("this hub serves no bundles")
        spec = {"snapshot": snap.id, "threads": [snap.thread], "have": payload.get("have", [])}
        prepared: dict[str, Any] = await prepare(ctx, spec)
        return prepared
