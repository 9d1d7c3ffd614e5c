"""The hub: the environment manager and the gateway in one process, the single authority for
run state (``narrative serve``; a ``narrative run start`` with no hub serving embeds one).

A run through the hub: the hub creates the run's thread and record, has the provider start
``narrative runtime`` in the environment with a run-scoped token and the hub's URL, waits for
the runtime to connect back, ships the base snapshot in as a bundle (``providerStart``), starts
the agent (``providerAgentStart``), records the runtime's events (output, routes, exit) in the
run's event log, and pulls the result snapshot back as a bundle. See :mod:`gateway.hub.runs`.

The hub also serves capabilities to the environments it drives: files (and, when allowed,
commands) in its workspace, ``narrative:snapshot``, the bundle capabilities of
:mod:`gateway.hub.narratives`, and whatever handler plugins the user loads (an ``inference``
handler only the hub can serve is the canonical example). Control calls (``hub:*``) are only
taken from a direct peer holding a ``control`` token, which only the owner of the store's key
can mint. Every other token is held to its run by :class:`gateway.hub.token_policy.RunTokenPolicy`,
except a team's users (invite codes, credentials and their sessions: :mod:`gateway.hub.team`),
whose runs are :mod:`gateway.hub.remote_runs` and private environments
:mod:`gateway.hub.remote_envs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.builtins import install_builtins
from gateway.config import ProxyExecutionConfig
from gateway.errors import AccessDenied, TargetNotFound
from gateway.handlers import HandlerContext, HandlerRegistry
from gateway.limits import Limits
from gateway.node import Gateway
from gateway.plugins import RemoteExecutionPlugin
from gateway.protocol import Notification
from gateway.server import DEFAULT_HOST
from gateway.tls import ServerTls
from gateway.tokens import TokenSigner, load_or_create_key
from narrative.entrypoints import entry_points_in
from narrative.errors import InvalidInput
from narrative.fsutil import write_atomic
from narrative.hierarchy import get_run
from narrative.jsonio import load_json
from narrative.models import AgentRun, now_iso
from narrative.processes import pid_alive
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.keys import key_path
from providers.manager import EnvironmentManager

from .lanes import Lanes
from .narratives import Blocking, BundleShelf
from .remote_envs import RemoteEnvironments
from .remote_runs import RemoteRuns
from .team import TeamHandlers, TeamPolicy, TeamSigner
from .token_policy import CONTROL_RUN, RunTokenPolicy
from .users import OWNER, AuditLog, UserRegistry

if TYPE_CHECKING:
    from .run_request import RunRequest
    from .runs import RunDriver

__all__ = [
    "CONTROL_RUN",
    "HANDLER_GROUP",
    "Hub",
    "control_token",
    "find_hub",
    "hub_files",
    "hub_tls_directory",
    "load_handler_plugin",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Entry-point group of handler plugins: ``register(registry: HandlerRegistry) -> None``.
HANDLER_GROUP = "narrative.handlers"
_CONTROL_TTL = 24 * 3600.0
_RETIRE_WAIT = 10.0


def control_token(store: Store, name: str) -> str:
    """A token that lets the holder of the store's key drive the store's hub."""
    signer = TokenSigner(load_or_create_key(key_path(store)), "hub")
    return signer.issue(CONTROL_RUN, name, _CONTROL_TTL)


def hub_tls_directory(store: Store) -> str:
    """Where ``narrative serve --tls-self-signed`` keeps its certificate and key (in the
    store's private state, hidden from environments like the signing key)."""
    return os.path.join(store.git_dir, "narrative", "hub-tls")


def hub_files(store: Store) -> str:
    return os.path.join(store.git_dir, "narrative", "hubs")


def find_hub(store: Store, pid: int | None = None) -> dict[str, Any] | None:
    """The serving hub of ``store`` (a daemon one), or the hub with ``pid``; None if none
    is alive."""
    directory = hub_files(store)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                info = load_json(f)
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            continue
        if pid is not None and info["pid"] != pid:
            continue
        if pid is None and not info.get("daemon"):
            continue
        if pid_alive(info["pid"]):
            return info
    return None


def load_handler_plugin(spec: str, registry: HandlerRegistry) -> None:
    """Load ``module`` or ``module:function`` and let it register handlers.

    The function (default ``register``) is called with the hub's handler registry.

    Raises:
        InvalidInput: the module or function cannot be loaded.
    """
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        register = getattr(module, func_name or "register")
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"cannot load handler plugin {spec!r}: {exc}") from None
    register(registry)


class Hub:
    """Environments, gateway and runs of one store.

    Args:
        store: The store (its workspace is what the hub's file handlers serve).
        environment_id: This node's id on the gateway.
        host: Interface to listen on (loopback by default).
        port: Port (0: a free one).
        config: Routing rules for calls that pass through the hub.
        limits: Gateway timeouts and bounds.
        allow_exec: Serve ``exec:run`` in the hub's workspace (off: environments never run
            commands on it).
        allow_writes: Serve ``fs:writeFile``/``fs:deleteFile`` in the hub's workspace (off:
            environments may only read its files through the hub).
        plugins: Handler plugins to load (``module[:function]``); entry points of the group
            ``narrative.handlers`` are loaded as well.
        daemon: Announce the hub as the store's serving hub (``narrative serve``).
        token_ttl: Lifetime of a runtime's token; the hub renews it while the run lasts.
        startup_timeout: Seconds for a runtime to connect back.
        reconnect_grace: Seconds a runtime may stay disconnected before its run fails.
        unreachable_grace: Seconds a runtime may stay disconnected while its environment
            cannot be asked whether it still runs (its host unreachable) before its run fails.
        stop_grace: Seconds between asking an agent to stop and killing it.
        tls: Serve ``wss://`` with this certificate (runtimes the hub starts pin it).
        advertise_url: The URL runtimes and clients are told to dial (default: the one the
            hub listens on), for a hub behind a name or address of its own.
    """

    def __init__(
        self,
        store: Store,
        *,
        environment_id: str = "hub",
        host: str = DEFAULT_HOST,
        port: int = 0,
        config: ProxyExecutionConfig | None = None,
        limits: Limits | None = None,
        allow_exec: bool = False,
        allow_writes: bool = False,
        plugins: Iterable[str] = (),
        daemon: bool = False,
        token_ttl: float = 900.0,
        startup_timeout: float = 60.0,
        reconnect_grace: float = 30.0,
        unreachable_grace: float = 600.0,
        stop_grace: float = 10.0,
        capabilities: Iterable[str] = (),
        tls: ServerTls | None = None,
        advertise_url: str | None = None,
    ) -> None:
        self.store = store
        self.tls = tls
        self.advertise_url = advertise_url
        self.manager = EnvironmentManager(store)
        self.daemon = daemon
        self.token_ttl = token_ttl
        self.startup_timeout = startup_timeout
        self.reconnect_grace = reconnect_grace
        self.unreachable_grace = unreachable_grace
        self.stop_grace = stop_grace
        self.users = UserRegistry(store)
        self.audit = AuditLog(store)
        self.signer = TeamSigner(load_or_create_key(key_path(store)), self.users, self.audit)
        self.gateway = Gateway(
            environment_id, config=config, limits=limits, capabilities=capabilities
        )
        self.policy = RunTokenPolicy(
            store, environment_id, self.blocking, self.snapshot_thread, self.driven_run
        )
        team_policy = TeamPolicy(self.policy, self.users, environment_id)
        self.gateway.token_policy = team_policy
        self.team = TeamHandlers(self.gateway, self.signer, team_policy, self.blocking)
        self.plugin = RemoteExecutionPlugin(
            self.gateway,
            self.signer,
            host=host,
            port=port,
            ssl=tls.context if tls is not None else None,
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hub-store")
        self.lanes = Lanes()
        """Provider work of one environment (or one team user) at a time, in parallel across
        them, off the store thread (:mod:`gateway.hub.lanes`)."""
        self.shelf = BundleShelf(store, self.blocking, on_read=self._bundle_read)
        self.drivers: dict[str, RunDriver] = {}
        """run id → :class:`gateway.hub.runs.RunDriver` of the runs this hub drives."""
        self._by_env: dict[str, RunDriver] = {}
        self._hub_file: str | None = None
        self.web_url: str | None = None
        """The URL of the hub's web view (:mod:`gateway.hub.web`), announced with the hub."""
        self.private_environments: Callable[[], frozenset[str]] = frozenset
        """The ids of the team users' private environments, which the hub never selects."""
        self._install(allow_exec, allow_writes, plugins)

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL to dial the hub at (the advertised one, else the one it listens on)."""
        return self.advertise_url or self.plugin.url

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the hub's TLS certificate (None: plain ``ws://``)."""
        return self.tls.fingerprint if self.tls is not None else None

    async def listen_unix(self, path: str) -> str:
        """Serve on the unix socket ``path`` too (a runtime without a network reaches the hub
        there, see :meth:`providers.base.BaseProvider.hub_socket`)."""
        return await self.plugin.server.listen_unix(path)

    async def close_unix(self, path: str) -> None:
        """Stop serving on the unix socket ``path`` and remove it."""
        await self.plugin.server.close_unix(path)

    @property
    def environment_id(self) -> str:
        return self.gateway.environment_id

    async def blocking(self, func: Callable[[], T]) -> T:
        """Run store or provider work on the hub's one store thread (the store is not
        thread-safe, and the event loop must not block)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, func)

    def environment_lane(self, environment: str) -> Blocking:
        """Run provider work of ``environment`` (that writes nothing to the store) in that
        environment's lane, in parallel with other environments' (see :mod:`.lanes`)."""

        async def run(func: Callable[[], T]) -> T:
            return await self.lanes.run(f"env:{environment}", func)

        return run

    def _install(self, allow_exec: bool, allow_writes: bool, plugins: Iterable[str]) -> None:
        registry = self.gateway.handlers
        install_builtins(
            registry,
            self.workspace_root(),
            deny=[self.store.git_dir, key_path(self.store)],
            commands=allow_exec,
            writes=allow_writes,
        )
        self.shelf.install(registry)
        self.team.install(registry)
        remote_runs = RemoteRuns(self)
        remote_runs.install(registry)
        self.team.policy.run_owner = remote_runs.owner
        remote_envs = self.remote_envs = RemoteEnvironments(self, remote_runs)
        remote_envs.install(registry)
        remote_runs.environment_owner = remote_envs.owner
        self.private_environments = remote_envs.private_ids
        registry.register("narrative", "snapshot", self._snapshot)
        for action, handler in (
            ("runStart", self._control_start),
            ("runWait", self._control_wait),
            ("runStop", self._control_stop),
            ("runKill", self._control_kill),
            ("runs", self._control_runs),
        ):
            registry.register("hub", action, handler)
        for entry in entry_points_in(HANDLER_GROUP):
            entry.load()(registry)
        for spec in plugins:
            load_handler_plugin(spec, registry)
        self.gateway.add_listener(self._on_notification)
        self.gateway.add_peer_listener(self._on_peer)

    def workspace_root(self) -> str:
        """The directory the hub's file handlers serve."""
        return self.store.workspace

    async def start(self) -> None:
        """Listen, announce the hub, reconnect environments and adopt interrupted runs."""
        await self.plugin.start()
        if self.daemon:  # a hub embedded in one command reconnects lazily, as commands do
            await self.blocking(self.manager.reconnect_all)
        self._announce()
        from .adoption import adopt_interrupted

        await adopt_interrupted(self)

    def _announce(self) -> None:
        info = {
            "url": self.url,
            "fingerprint": self.fingerprint,
            "pid": os.getpid(),
            "environment": self.environment_id,
            "daemon": self.daemon,
            "started": now_iso(),
            **({"web": self.web_url} if self.web_url else {}),
        }
        self._hub_file = os.path.join(hub_files(self.store), f"{os.getpid()}.json")
        write_atomic(self._hub_file, json.dumps(info).encode())

    async def close(self) -> None:
        """Stop serving. Runs still going keep their runtimes; a hub started later adopts them.
        Runs already finished get their runtimes retired first (a few seconds at most)."""
        retiring = [d.finished.wait() for d in self.drivers.values() if d.retiring]
        if retiring:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*retiring), _RETIRE_WAIT)
        for driver in list(self.drivers.values()):
            driver.detach()
        await self.plugin.stop()
        await self.gateway.close()
        if self._hub_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._hub_file)
        self.lanes.close()
        self._pool.shutdown(wait=True)

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- runs -----------------------------------------------------------------------------------

    async def submit(self, request: RunRequest) -> AgentRun:
        """Start a run (see :class:`.run_request.RunRequest`); returns once it is recorded.

        Raises:
            NarrativeError: the request is invalid or the environment cannot run it (nothing
                is recorded then).
        """
        from .runs import RunDriver

        driver = await RunDriver.create(self, request)
        return driver.run

    async def wait(self, run_id: str) -> AgentRun:
        """Wait until a run this hub drives has finished; its final record."""
        driver = self.drivers.get(run_id)
        if driver is not None:
            await asyncio.shield(driver.finished.wait())
        return await self.blocking(lambda: get_run(self.store, run_id))

    async def stop_run(self, run_id: str, grace: float | None = None) -> None:
        """Ask the run's agent to stop; kill it if it has not after ``grace`` seconds."""
        await self._driver(run_id).stop(self.stop_grace if grace is None else grace)

    async def kill_run(self, run_id: str) -> None:
        """Kill the run's runtime and agent at once."""
        await self._driver(run_id).kill()

    def _driver(self, run_id: str) -> RunDriver:
        driver = self.drivers.get(run_id)
        if driver is None:
            raise TargetNotFound(f"run {run_id} is not driven by this hub")
        return driver

    def driven_run(self, environment: str) -> str | None:
        """The run this hub drives in ``environment``, if any."""
        driver = self._by_env.get(environment)
        return driver.run.id if driver is not None else None

    async def end_tokens(self, run_id: str, reason: str) -> None:
        """Void the tokens of ``run_id``: refuse them from now on and close their connections."""
        self.policy.end(run_id)
        await self.gateway.revoke(reason, run_id=run_id)

    def register(self, driver: RunDriver) -> None:
        self.drivers[driver.run.id] = driver
        self._by_env[driver.gateway_id] = driver

    def _bundle_read(self, peer: str, size: int) -> None:
        driver = self._by_env.get(peer)
        if driver is not None:
            driver.bytes_to_environment += size

    def unregister(self, driver: RunDriver) -> None:
        self.drivers.pop(driver.run.id, None)
        if self._by_env.get(driver.gateway_id) is driver:
            del self._by_env[driver.gateway_id]

    # -- events from runtimes -------------------------------------------------------------------

    def _on_notification(self, peer: str | None, note: Notification) -> None:
        if peer is None or note.originalType != "runtime.event":
            return
        driver = self._by_env.get(peer)
        if driver is not None and isinstance(note.result, dict):
            driver.on_event(note.result)

    def _on_peer(self, peer: str, up: bool) -> None:
        driver = self._by_env.get(peer)
        if driver is not None:
            driver.on_connection(up)

    # -- handlers -------------------------------------------------------------------------------

    def snapshot_thread(self) -> str | None:
        """The thread ``narrative:snapshot`` snapshots onto (None: the store's default)."""
        return None

    async def _snapshot(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        message = payload.get("message", f"snapshot requested by {ctx.route_path[0]}")
        if not isinstance(message, str):
            raise InvalidInput("'message' must be a string")
        thread = self.snapshot_thread()
        result = await self.blocking(lambda: take_snapshot(self.store, thread, message=message))
        snap = result.snapshot
        return {"snapshot": snap.id, "commit": snap.commit, "created": result.created}

    def check_control(
        self, ctx: HandlerContext, audited: str | None = None, target: str | None = None
    ) -> None:
        """Refuse the call unless it comes with the owner's control token; an ``audited``
        action goes to the team's audit log (refused or not)."""
        path = ctx.route_path
        claims = self.gateway.peer_claims(path[0]) if len(path) == 1 else None
        if claims is None or claims.run_id != CONTROL_RUN:
            exc = AccessDenied("hub control calls need a control token from the store's owner")
            if audited is not None:
                self.audit.record("-", audited, target, f"refused: {exc}")
            raise exc
        if audited is not None:
            self.audit.record(OWNER, audited, target, "ok")

    async def _control_start(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        from .run_request import RunRequest

        environment = payload.get("environment")
        self.check_control(ctx, "runStart", environment if isinstance(environment, str) else None)
        run = await self.submit(RunRequest.from_payload(payload))
        return run.to_dict()

    async def _control_wait(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.check_control(ctx)
        return (await self.wait(_run_id(payload))).to_dict()

    async def _control_stop(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.check_control(ctx, "runStop", str(payload.get("run")))
        grace = payload.get("grace")
        if grace is not None and (not isinstance(grace, int | float) or grace < 0):
            raise InvalidInput("'grace' must be a non-negative number of seconds")
        await self.stop_run(_run_id(payload), grace)
        return {}

    async def _control_kill(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.check_control(ctx, "runKill", str(payload.get("run")))
        await self.kill_run(_run_id(payload))
        return {}

    async def _control_runs(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.check_control(ctx)
        return {"runs": sorted(self.drivers)}


def _run_id(payload: dict[str, Any]) -> str:
    run_id = payload.get("run")
    if not isinstance(run_id, str) or not run_id:
        raise InvalidInput("'run' must be a run id")
    return run_id
