"""``remote``: an environment on another machine's hub, reached as one of its team's users.

The user logs in to that hub once (``narrative hub login URL CODE --name NAME``: a credential
the hub issued, kept in the user's config directory). ``narrative env create far --provider
remote --config hub=NAME --config environment=box`` then asks that hub for a private clone of
its environment ``box`` (same provider, same settings, owned by this user alone, labelled with
this store's owner label so ``env sweep`` finds it); every operation of the environment —
commands, files, restore, collect, background processes — runs there, through the hub's
``team:env*`` calls (:mod:`gateway.hub.remote_envs`). Snapshots travel as bundles both ways,
and what comes back is imported like any result: only the thread being collected may move, and
a run's result is staged for screening first.

A run in a remote environment is delegated, not shipped: the hub here starts its runtime on
this machine, in a private directory, with ``sandbox=none`` (it is the runtime, not an agent:
nothing of the remote side runs here). That runtime receives the run's base as usual and hands
the agent command to the remote hub as a run of its own (:mod:`gateway.hub.delegated_agent`):
the base is pushed there, the remote run's output streams back as this run's output, and its
result comes home as a narrative on which this run's result is built. The remote hub may do the
same again, which is how a chain A → B → C works: each hop needs only to reach the next.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field

from gateway.errors import AuthError, GatewayError, TokenRevoked
from narrative.commits import snapshot_at
from narrative.errors import InvalidInput, NarrativeError
from narrative.models import Snapshot
from narrative.runs import incoming_ref
from narrative.store import DEFAULT_STORE_NAME
from providers.base import (
    SPAWN_LOG_LIMIT,
    BaseProvider,
    ExecResult,
    Health,
    HubSocket,
    OutputFn,
    ProviderConfig,
    ProviderContext,
    Signal,
    SpawnLog,
    check_relative_path,
)
from providers.errors import ExecFailed, ProviderError, ProviderUnavailable, ResourceGone
from providers.worktree import WorktreeConfig, WorktreeProvider

from .delegated_agent import delegated_run_path
from .narratives import fetch_bundle, have_commits
from .team_client import TeamSession, open_session, serve_bases
from .token_policy import result_scope

__all__ = ["DELEGATE_ENV_VAR", "DELEGATE_HUB_VAR", "RemoteConfig", "RemoteProvider"]

DELEGATE_HUB_VAR = "NARRATIVE_DELEGATE_HUB"
"""Names the login (``narrative hub login --name``) a runtime delegates its agent through."""
DELEGATE_ENV_VAR = "NARRATIVE_DELEGATE_ENV"
"""Names the environment on that hub the delegated runs go to."""

_REMOTE_HANDLE = "remote:"
_FAILURES: dict[str, type[NarrativeError]] = {
    "ExecFailed": ExecFailed,
    "ResourceGone": ResourceGone,
    "ProviderUnavailable": ProviderUnavailable,
    "InvalidInput": InvalidInput,
}
T = TypeVar("T")
log = logging.getLogger(__name__)


class RemoteConfig(ProviderConfig):
    type: Literal["remote"] = "remote"
    hub: str = Field(min_length=1)
    """The login of the hub the environment lives on (``narrative hub login URL CODE --name``)."""
    environment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """The environment of that hub this one is a private clone of."""


class RemoteProvider(BaseProvider):
    """Environments that are private clones of an environment on another hub."""

    name = "remote"
    category = "hybrid"
    capabilities: ClassVar[frozenset[str]] = frozenset({"remote", "exec", "files"})
    config_model = RemoteConfig
    preference = 90  # never a default: it needs a login and a remote environment
    spawn_log_on_host: ClassVar[bool] = True  # the runtime's; remote processes' logs stay there
    # a stop goes to the other hub, which stops its run and ships its result, which then comes
    # home here: more than one environment's stop, on two hubs' time
    extra_stop_time: ClassVar[float] = 120.0

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        super().__init__(context, config)
        assert isinstance(config, RemoteConfig)
        self.remote = config
        # the runtime's directory here: a worktree-like checkout the runtime works in
        self.bridge = WorktreeProvider(context, WorktreeConfig(sandbox="none"))

    # -- talking to the hub ---------------------------------------------------------------------

    def _run(self, work: Callable[[TeamSession], Awaitable[T]]) -> T:
        """``work`` on a fresh session of the environment's hub (provider calls are blocking:
        the hub runs them in worker threads, the CLI in its main thread)."""

        async def session_work() -> T:
            async with open_session(self.remote.hub) as session:
                return await work(session)

        try:
            return asyncio.run(session_work())
        except (AuthError, TokenRevoked) as exc:
            raise ProviderError(
                f"hub {self.remote.hub!r} refused this login ({exc}); log in again with "
                "`narrative hub login`"
            ) from None
        except (GatewayError, OSError) as exc:
            raise ProviderUnavailable(f"hub {self.remote.hub!r} cannot be reached: {exc}") from None

    def _call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        async def work(session: TeamSession) -> dict[str, Any]:
            return await _env_call(session, action, payload)

        return self._run(work)

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        answer = self._call(
            "envCreate", {"template": self.remote.environment, "label": self.context.owner}
        )
        name = answer.get("environment")
        if not isinstance(name, str) or not name:
            raise ProviderError(f"hub {self.remote.hub!r} answered no environment name")
        try:
            self.bridge.create()
        except NarrativeError:
            self.delete(name)
            raise
        return name

    def start(self, resource_id: str) -> None:
        self._call("envStart", {"environment": resource_id})

    def stop(self, resource_id: str) -> None:
        self._call("envStop", {"environment": resource_id})

    def delete(self, resource_id: str) -> None:
        self._call("envDelete", {"environment": resource_id})
        self.bridge.delete(self._bridge_dir())

    def reconnect(self, resource_id: str) -> None:
        if self.health(resource_id) is Health.GONE:
            raise ResourceGone(f"{resource_id} on hub {self.remote.hub!r}")

    def health(self, resource_id: str) -> Health:
        answer = self._call("envHealth", {"environment": resource_id})
        try:
            return Health(str(answer.get("health")))
        except ValueError:
            raise ProviderError(f"hub {self.remote.hub!r} answered health {answer!r}") from None

    def list_resources(self) -> list[str]:
        answer = self._call("envList", {"label": self.context.owner})
        return sorted(
            str(e["environment"])
            for e in answer.get("environments", [])
            if isinstance(e, dict) and e.get("state") != "archived"
        )

    # -- operations -----------------------------------------------------------------------------

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        """Run ``argv`` there; its output arrives when it ended (``on_output`` is called then,
        once per stream)."""
        if not argv:
            raise InvalidInput("no command given")
        payload = {
            "environment": resource_id,
            "argv": list(argv),
            "env": dict(env or {}),
            "timeout": timeout,
        }
        answer = self._call("envExec", payload)
        stdout, stderr = _decoded(answer, "stdout"), _decoded(answer, "stderr")
        if on_output is not None:
            for stream, data in (("stdout", stdout), ("stderr", stderr)):
                if data:
                    on_output(stream, data)
        return ExecResult(
            int(answer["exitCode"]), stdout, stderr, timed_out=bool(answer.get("timedOut"))
        )

    def read_file(self, resource_id: str, path: str) -> bytes:
        answer = self._call(
            "envReadFile", {"environment": resource_id, "path": check_relative_path(path)}
        )
        return _decoded(answer, "data")

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        payload = {
            "environment": resource_id,
            "path": check_relative_path(path),
            "data": base64.b64encode(data).decode(),
        }
        self._call("envWriteFile", payload)

    def delete_file(self, resource_id: str, path: str) -> None:
        self._call("envDeleteFile", {"environment": resource_id, "path": check_relative_path(path)})

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        """Push ``snapshot`` to the hub (that one snapshot only) and restore it there."""
        store = self.context.store

        async def work(session: TeamSession) -> None:
            serve_bases(session, store, {snapshot.id: snapshot.thread})
            payload = {"environment": resource_id, "snapshot": snapshot.id}
            await _env_call(session, "envRestore", {**payload, "thread": snapshot.thread})

        self._run(work)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        """Snapshot the workspace there onto ``thread_id`` (continuing this store's head of
        it, pushed first) and pull that snapshot home: only ``thread_id`` may move, and a
        run's result is staged for screening instead."""
        store = self.context.store
        head = store.thread_heads().get(thread_id)
        base = snapshot_at(store, head) if head is not None else None

        async def work(session: TeamSession) -> Snapshot:
            # the hub continues the thread from here: its records, and its head if it has one
            serve_bases(session, store, {base.id if base is not None else None: thread_id})
            payload = {
                "environment": resource_id,
                "thread": thread_id,
                "head": base.id if base is not None else None,
                "run": None,  # staged here, not there: the thread there is this user's
                "message": message,
            }
            made = (await _env_call(session, "envCollect", payload))["snapshot"]
            snapshot_id = str(made["id"])

            async def call(kind: str, action: str, spec: dict[str, Any]) -> Any:
                if action == "prepareBundle":
                    spec = {**spec, "environment": resource_id}
                    return await _env_call(session, "envPrepareSnapshot", spec)
                return await session.client.call(kind, action, spec, target=session.login.hub)

            have = await asyncio.to_thread(have_commits, store)
            spec = {"snapshot": snapshot_id, "threads": [thread_id], "have": have}
            stage = {thread_id: incoming_ref(run_id)} if run_id else None
            result, _size = await fetch_bundle(
                call,
                store,
                spec,
                _blocking,
                f"hub {self.remote.hub}",
                check_threads=result_scope(store, thread_id, f"environment {resource_id}"),
                max_bytes=self.config.max_result_bytes,
                stage=stage,
            )
            landed = store.thread_heads().get(thread_id) if run_id is None else None
            commit = bytes.fromhex(result.staged[thread_id]) if run_id else landed
            if commit is None:
                raise ProviderError(f"hub {self.remote.hub!r} sent no snapshot of {thread_id}")
            snap = snapshot_at(store, commit)
            if snap.id != snapshot_id:
                raise ProviderError(
                    f"hub {self.remote.hub!r} collected {snapshot_id} but sent {snap.id}"
                )
            return snap

        return self._run(work)

    # -- background processes -------------------------------------------------------------------

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` there (its output stays in the remote environment)."""
        if not argv:
            raise InvalidInput("no command given")
        payload = {"environment": resource_id, "argv": list(argv), "env": dict(env or {})}
        return _REMOTE_HANDLE + str(self._call("envSpawn", payload)["handle"])

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start the runtime here, in the environment's own directory; it delegates the
        agent to the remote environment."""
        delegate = {DELEGATE_HUB_VAR: self.remote.hub, DELEGATE_ENV_VAR: resource_id}
        bridge = self._bridge_dir()
        os.makedirs(bridge, exist_ok=True)
        return self.bridge.spawn(bridge, argv, env={**(env or {}), **delegate}, log_path=log_path)

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        if handle.startswith(_REMOTE_HANDLE):
            payload = {"environment": resource_id, "handle": _remote(handle), "signal": sig}
            self._call("envSignal", payload)
        else:
            if sig == "kill":  # the runtime dies at once: its delegated run goes with it
                self._kill_delegated_run()
            self.bridge.signal(self._bridge_dir(), handle, sig)

    def _kill_delegated_run(self) -> None:
        path = delegated_run_path(os.path.join(self._bridge_dir(), DEFAULT_STORE_NAME))
        try:
            with open(path, encoding="utf-8") as f:
                run_id = f.read().strip()
        except OSError:
            return
        try:
            self._call("runKill", {"run": run_id})
        except NarrativeError as exc:  # ended already, or the hub is away: its limits apply
            log.info("killing delegated run %s: %s", run_id, exc)

    def alive(self, resource_id: str, handle: str) -> bool:
        if handle.startswith(_REMOTE_HANDLE):
            payload = {"environment": resource_id, "handle": _remote(handle)}
            return bool(self._call("envAlive", payload)["alive"])
        return self.bridge.alive(self._bridge_dir(), handle)

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The runtime's log (here); a remote process's output is not fetched."""
        if handle.startswith(_REMOTE_HANDLE):
            _remote(handle)
            return SpawnLog(0, b"")
        return self.bridge.read_spawn_log(
            self._bridge_dir(), handle, log_path=log_path, since=since, limit=limit
        )

    def end_leftovers(self, resource_id: str) -> None:
        """What an earlier runtime left running here (what runs there ends with :meth:`reset`,
        and before each of the remote hub's own runs)."""
        self.bridge.end_leftovers(self._bridge_dir())

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Have the hub ready the environment there as for a run of its own (its processes
        killed, its workspace and temporary directories emptied), then restore ``snapshot``."""
        self._call("envReset", {"environment": resource_id})
        if snapshot is not None:
            self.restore(resource_id, snapshot)

    # -- the runtime, which runs here ----------------------------------------------------------

    def _bridge_dir(self) -> str:
        return self.bridge.checkout_dir()

    def runtime_command(self) -> list[str]:
        return self.bridge.runtime_command()

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        return self.bridge.hub_socket(self._bridge_dir())

    def check_runtime(self, resource_id: str) -> None:
        """The runtime's import check, here where it runs."""
        bridge = self._bridge_dir()
        os.makedirs(bridge, exist_ok=True)
        self.bridge.check_runtime(bridge)

    def warnings(self) -> list[str]:
        return [
            f"commands run on hub {self.remote.hub!r}, in a private clone of its environment "
            f"{self.remote.environment!r}: that hub's owner decides how it is isolated"
        ]


async def _env_call(session: TeamSession, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``team:<action>`` for an environment; a provider failure the hub reports comes back as
    the same class of error."""
    answer = await session.call(action, payload)
    if not isinstance(answer, dict):
        raise ProviderError(f"hub answered {action} with {type(answer).__name__}")
    failure = answer.get("failure")
    if isinstance(failure, dict):
        cls = _FAILURES.get(str(failure.get("type")), ProviderError)
        raise cls(str(failure.get("message", "failed")))
    return answer


def _decoded(answer: Mapping[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(str(answer.get(key) or ""), validate=True)
    except ValueError:
        raise ProviderError(f"the hub sent malformed {key}") from None


def _remote(handle: str) -> str:
    rest = handle[len(_REMOTE_HANDLE) :]
    if not rest:
        raise InvalidInput(f"not a process handle of a remote environment: {handle!r}")
    return rest


async def _blocking(func: Callable[[], T]) -> T:
    return await asyncio.to_thread(func)
