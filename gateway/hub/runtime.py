"""``narrative runtime``: the process a hub starts inside an environment.

It dials the hub with its run-scoped token (reconnecting with backoff when the connection
drops), answers the provider messages — ``providerStart`` pulls the base snapshot as a bundle
into the environment's own store and restores the workspace, ``providerAgentStart`` starts the
agent, ``providerStop`` stops it gracefully, file reads and writes — and reports the agent's
output, its calls' routes and its exit as numbered events. When the agent exits, the runtime
snapshots the workspace onto the run's thread; the hub pulls that snapshot back as a bundle.

A runtime is a hub itself (:class:`~gateway.hub.server.Hub`): the agent connects to it with its own
token, and its calls run here or are proxied by the routing rules (``proxyExecution.json`` in
the workspace, or the rules the hub sent) — to the hub upstream or to environments this runtime
drives in turn, which is how a chain A → B → C is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from functools import partial
from typing import Any

from gateway.client import token_environment
from gateway.config import load_config, parse_config
from gateway.errors import Busy, GatewayError, GatewayTimeout
from gateway.handlers import HandlerContext
from gateway.limits import Limits
from gateway.link import Link
from gateway.observe import RouteRecord
from gateway.protocol import Heartbeat
from gateway.tls import client_ssl_context
from narrative.errors import InvalidInput, StoreNotFound
from narrative.history import resolve_snapshot
from narrative.models import now_iso
from narrative.restore import restore_workspace
from narrative.snapshot import take_snapshot
from narrative.store import DEFAULT_STORE_NAME, Store
from providers.base import UP_FD_VAR
from providers.sandbox import keep_environment_private

from .agent_output import OutputEncoder
from .agent_process import Agent, AgentProcess
from .events import RuntimeEvents
from .narratives import fetch_bundle, have_commits
from .server import Hub
from .token_policy import run_token

__all__ = [
    "RUNTIME_MODULES",
    "Runtime",
    "announce_up",
    "open_runtime_store",
    "shadowed_modules",
    "take_up_fd",
]
"""Starts the last line of ``narrative runtime --check`` (then ``ok`` or ``broken``), after
one ``shadowed<TAB>module<TAB>file`` line per module the workspace replaced."""

log = logging.getLogger(__name__)

_ROUTING_FILE = "proxyExecution.json"
_EVENTS_FILE = "runtime-events.jsonl"  # in the environment's store: what the hub may still ask for
#: The agent's token lives as long as a run may; it is void as soon as the agent exits.
_AGENT_TOKEN_TTL = 86400.0


def shadowed_modules(workspace: str) -> dict[str, str]:
    """The modules this process loaded from ``workspace`` (name → file), after importing
    everything a runtime needs: a runtime must load none of its code from the workspace it
    serves, which the agent controls. What ``narrative runtime --check`` reports."""
    import importlib
    import sys

    for name in RUNTIME_MODULES:
        importlib.import_module(name)
    root = os.path.realpath(workspace)
    shadowed = {}
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            real = os.path.realpath(path)
            if real == root or real.startswith(root + os.sep):
                shadowed[name] = real
    return shadowed


RUNTIME_MODULES = ("gateway.hub.runtime", "gateway.client", "gateway.server", "websockets")
"""What a runtime imports before it serves (importing this module pulled in most already)."""


def open_runtime_store(workspace: str, store_dir: str | None = None) -> Store:
    """The environment's own store (``<workspace>/.narrative`` unless told), created if
    missing. Named, never discovered: the hub's workspace may be above the environment's."""
    git_dir = store_dir or os.path.join(workspace, DEFAULT_STORE_NAME)
    try:
        return Store.open(store_dir=git_dir)
    except StoreNotFound:
        return Store.init(workspace, store_dir=git_dir)


class Runtime(Hub):
    """The runtime of one environment.

    Args:
        url: The hub's WebSocket URL.
        token: This environment's run-scoped token (names the environment).
        workspace: The environment's workspace.
        store_dir: The environment's store (default ``<workspace>/.narrative``).
        stop_grace: Seconds between SIGTERM and SIGKILL when stopping the agent.
        heartbeat_interval: Seconds between heartbeats to the hub; one left unanswered for
            that long drops the connection, and the link reconnects.
        give_up_after: Seconds without a hub after which the runtime stops its agent and
            exits (a hub that restarts within that time adopts the run).
        limits: Gateway timeouts and bounds.
        fingerprint: The hub certificate's pinned fingerprint (``wss://`` URLs).
        ca_file: CA file to verify the hub's certificate with when none is pinned.
        delegate: ``(login, environment)``: the agent is not started here but delegated as a
            run to that environment on the hub of that login (the ``remote`` provider).
    """

    def __init__(
        self,
        url: str,
        token: str,
        workspace: str,
        *,
        store_dir: str | None = None,
        stop_grace: float = 10.0,
        heartbeat_interval: float = 15.0,
        give_up_after: float = 600.0,
        limits: Limits | None = None,
        fingerprint: str | None = None,
        ca_file: str | None = None,
        delegate: tuple[str, str] | None = None,
    ) -> None:
        workspace = os.path.realpath(workspace)
        store = open_runtime_store(workspace, store_dir)
        super().__init__(
            store,
            environment_id=token_environment(token),
            limits=limits,
            allow_exec=True,
            allow_writes=True,
            daemon=True,
            stop_grace=stop_grace,
            capabilities=["runtime"],
        )
        self.upstream_url = url
        self.upstream_ssl = client_ssl_context(url, fingerprint=fingerprint, ca_file=ca_file)
        self.heartbeat_interval = heartbeat_interval
        self.give_up_after = give_up_after
        self.heartbeats = 0
        """Heartbeats the hub answered."""
        self._token = token
        self.link: Link | None = None
        self.upstream: str | None = None
        self.agent: Agent | None = None
        self.delegate = delegate
        self._base: str | None = None
        self.run_id: str | None = None
        self.thread_id: str | None = None
        self.events = RuntimeEvents(
            os.path.join(store.git_dir, "narrative", "runtime-events.jsonl")
        )
        self._encoders: dict[str, OutputEncoder] = {}
        self._agent_done = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._baseline: frozenset[bytes] = frozenset()
        self.shelf.baseline = lambda: self._baseline
        self._tasks: set[asyncio.Task[None]] = set()
        registry = self.gateway.handlers
        registry.register("provider", "start", self._provider_start)
        registry.register("provider", "agentStart", self._agent_start)
        registry.register("provider", "stop", self._provider_stop)
        registry.register("runtime", "events", self._events)
        registry.register("runtime", "shutdown", self._shutdown_call)
        registry.register("runtime", "setToken", self._set_token)
        registry.register("runtime", "setStopGrace", self._set_stop_grace)
        self.gateway.add_route_observer(self._on_route)

    # -- life -----------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Connect to the hub and serve until told to shut down (or SIGTERM/SIGINT)."""
        keep_environment_private()  # the agent below must not read the token from /proc
        up_fd = take_up_fd()
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._shutdown.set)
        try:
            # The link is held before it is up: the hub may renew the token (runtime:setToken)
            # the moment the connection is, before connect() would have returned.
            self.link = await self.gateway.connect(
                self.upstream_url, self._token, ssl=self.upstream_ssl, wait=False
            )
            self.upstream = await self.link.wait_connected(self.gateway.limits.transport_timeout)
            announce_up(up_fd)
            beating = loop.create_task(self._heartbeats(self.link))
            await self._shutdown.wait()
            beating.cancel()
        finally:
            if self.agent is not None and self.agent.returncode is None:
                await self.agent.stop(self.stop_grace)
            await self.close()
        return 0

    async def _heartbeats(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        alone_since: float | None = None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not link.connected or link.peer is None:
                alone_since = alone_since if alone_since is not None else loop.time()
                if loop.time() - alone_since > self.give_up_after:
                    log.warning("no hub for %.0fs: stopping", loop.time() - alone_since)
                    self._shutdown.set()
                    return
                continue
            alone_since = None
            beat = Heartbeat(requestId=self.gateway.new_request_id(), timestamp=time.time())
            try:
                await self.gateway.provider_request(
                    link.peer, beat, timeout=self.heartbeat_interval
                )
                self.heartbeats += 1
            except GatewayTimeout:
                log.warning("the hub did not answer a heartbeat: reconnecting")
                await link.drop()
            except GatewayError as exc:
                log.info("heartbeat: %s", exc)

    # -- provider messages ----------------------------------------------------------------------

    async def _provider_start(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        options = payload.get("options") or {}
        run, thread, snapshot = (options.get(k) for k in ("run", "thread", "snapshot"))
        if not all(isinstance(v, str) and v for v in (run, thread, snapshot)):
            raise InvalidInput("providerStart needs run, thread and snapshot")
        assert isinstance(run, str) and isinstance(thread, str) and isinstance(snapshot, str)
        if self.agent is not None and self.agent.returncode is None:
            raise Busy(f"{self.environment_id} is running the agent of run {self.run_id}")
        store = self.store
        have = await self.blocking(lambda: have_commits(store))
        # the base's thread's runs (a user's main thread may hold thousands) are of no use here
        spec = {"snapshot": snapshot, "threads": [thread], "have": have, "forkRuns": False}
        imported, size = await fetch_bundle(
            self._call_upstream, store, spec, self.blocking, self.upstream or "hub"
        )

        def restore() -> int:
            snap = resolve_snapshot(store, snapshot)
            # the agent's own snapshots (and merges) continue the run's thread, never the
            # thread the base came from: that one is the user's
            result = restore_workspace(
                store, snap, thread_id=store.config.default_thread, continue_thread=thread
            )
            self._baseline = frozenset(store.thread_heads().values())
            return result.written

        written = await self.blocking(restore)
        self.run_id, self.thread_id, self._base = run, thread, snapshot
        self.events = RuntimeEvents(self.events.path)
        self._agent_done.clear()
        self._load_routing(options.get("routing"))
        return {
            "snapshot": snapshot,
            "bytes": size,
            "objects": imported.objects,
            "written": written,
        }

    def _load_routing(self, routing: Any) -> None:
        path = os.path.join(self.store.workspace, _ROUTING_FILE)
        if routing is not None:
            self.gateway.set_config(parse_config(routing, "the hub's routing rules"))
        elif os.path.isfile(path):
            self.gateway.set_config(load_config(path))

    async def _agent_start(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        if self.run_id is None or self.thread_id is None:
            raise InvalidInput("providerAgentStart before providerStart")
        if self.agent is not None and self.agent.returncode is None:
            raise Busy(f"the agent of run {self.run_id} is still running")
        options = payload.get("options") or {}
        argv, extra, timeout = options.get("argv"), options.get("env") or {}, options.get("timeout")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("'argv' must be a non-empty list of strings")
        if not isinstance(extra, dict):
            raise InvalidInput("'env' must map names to strings")
        agent_id = f"{self.environment_id[:56]}.agent"
        env = {k: v for k, v in os.environ.items() if k != "NARRATIVE_TOKEN"}
        env.update({str(k): str(v) for k, v in extra.items()})
        env.update(
            {
                "NARRATIVE_GATEWAY_URL": self.url,
                "NARRATIVE_GATEWAY_TOKEN": run_token(
                    self.signer, self.run_id, agent_id, _AGENT_TOKEN_TTL, thread=self.thread_id
                ),
                "NARRATIVE_RUN": self.run_id,
                "NARRATIVE_THREAD": self.thread_id,
                "NARRATIVE_ENVIRONMENT": self.environment_id,
                "NARRATIVE_STORE": self.store.git_dir,
            }
        )
        self._encoders = {}
        limit = float(timeout) if isinstance(timeout, int | float) else None
        if self.delegate is not None and self._base is not None:
            # imported here: the team client costs every runtime's start-up ~50 ms, and only
            # a runtime that delegates its agent to another hub needs it
            from .delegated_agent import DelegatedAgent

            login, remote_env = self.delegate
            base = await self.blocking(partial(resolve_snapshot, self.store, self._base))
            extras = {str(k): str(v) for k, v in extra.items()}
            self.agent = await DelegatedAgent.start(
                login, remote_env, self.store, base, argv, extras, limit, self._output
            )
        else:
            self.agent = await AgentProcess.start(argv, self.store.workspace, env, self._output)
        await self._event("agent.started", pid=self.agent.pid, argv=argv)
        watcher = asyncio.get_running_loop().create_task(self._watch(self.agent, limit))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)
        return {"pid": self.agent.pid}

    async def _watch(self, agent: Agent, timeout: float | None) -> None:
        try:
            code = await asyncio.wait_for(asyncio.shield(agent.wait()), timeout)
        except TimeoutError:
            await agent.stop(self.stop_grace, "timeout")
            code = 124  # what timeout(1) exits with
        for stream, encoder in self._encoders.items():
            if (tail := encoder.flush()) is not None:
                await self._event("agent.output", stream=stream, **tail)
        run_id, thread_id, store = self.run_id, self.thread_id, self.store
        message = f"result of run {run_id} (exit {code})"
        try:
            snap = (
                await self.blocking(lambda: take_snapshot(store, thread_id, run_id, message))
            ).snapshot
            result: dict[str, Any] = {"resultSnapshot": snap.id, "resultCommit": snap.commit}
        except Exception as exc:  # the exit must be reported whatever went wrong
            log.error("cannot snapshot the result of %s: %s", run_id, exc)
            result = {"resultSnapshot": None, "error": str(exc)}
        await self._event("agent.exited", exitCode=code, reason=agent.stopping, **result)
        self._agent_done.set()
        if run_id is not None:  # whatever the agent left running has no business here now
            await self.end_tokens(run_id, "its agent exited")

    async def _provider_stop(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        if agent is None:
            return {}
        if agent.returncode is None:
            await agent.stop(self.stop_grace, "stop")
        await self._agent_done.wait()
        return {"exitCode": agent.returncode}

    # -- runtime calls from the hub ---------------------------------------------------------------

    async def _events(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        since = payload.get("since", 0)
        if not isinstance(since, int) or since < 0:
            raise InvalidInput("'since' must be a non-negative integer")
        return {"events": self.events.since(since)}

    async def _shutdown_call(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        # after the reply has gone out
        asyncio.get_running_loop().call_later(0.05, self._shutdown.set)
        return {}

    async def _set_token(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        token = payload.get("token")
        if not isinstance(token, str) or token_environment(token) != self.environment_id:
            raise InvalidInput("'token' must be a token for this environment")
        if self.link is not None:
            self.link.set_token(token)
            # the open connection lives until the new expiry too, not only the next one (the
            # call came on it, so the link knows its peer even before serve() does)
            await self.gateway.call(
                "gateway", "refresh", {"token": token}, target=self.link.peer, timeout=10
            )
        return {}

    async def _set_stop_grace(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        grace = payload.get("grace")
        if not isinstance(grace, int | float) or grace < 0:
            raise InvalidInput("'grace' must be a non-negative number of seconds")
        self.stop_grace = float(grace)
        return {}

    def snapshot_thread(self) -> str | None:
        """An agent's snapshots land on its run's thread."""
        return self.thread_id

    # -- events ---------------------------------------------------------------------------------

    async def _call_upstream(self, kind: str, action: str, payload: dict[str, Any]) -> Any:
        return await self.gateway.call(kind, action, payload, target=self.upstream, timeout=600)

    async def _event(self, kind: str, **fields: Any) -> None:
        event = self.events.append({"run": self.run_id, "type": kind, "time": now_iso(), **fields})
        if self.upstream is not None:
            await self.gateway.notify("runtime.event", event, peer=self.upstream)

    async def _output(self, stream: str, chunk: bytes) -> None:
        encoder = self._encoders.setdefault(stream, OutputEncoder())
        if (fields := encoder.encode(chunk)) is not None:
            await self._event("agent.output", stream=stream, **fields)

    def _on_route(self, record: RouteRecord) -> None:
        if self.run_id is None or not record.origin.endswith(".agent"):
            return
        route = [*record.route_path, self.environment_id]
        if record.next_hop not in (None, self.environment_id):
            route.append(record.next_hop)
        if record.ran_in and record.ran_in != route[-1]:
            route.append(record.ran_in)
        task = asyncio.get_running_loop().create_task(
            self._event(
                "call.routed",
                call=f"{record.kind}:{record.action}",
                route=route,
                ranIn=record.ran_in,
                success=record.success,
                error=record.error_code,
                ms=round(record.duration_ms, 2),
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def take_up_fd() -> int | None:
    """The descriptor named by :data:`~providers.base.UP_FD_VAR`, kept from the agent (out of
    the environment, not inherited); None when there is none."""
    value = os.environ.pop(UP_FD_VAR, "")
    if not value.isdigit() or int(value) < 3:
        return None
    fd = int(value)
    try:
        os.set_inheritable(fd, False)
    except OSError:  # not open
        return None
    return fd


def announce_up(fd: int | None) -> None:
    """Tell the spawn holding on ``fd`` that the runtime is connected. ``fd`` stays open until
    this process exits (it is not inherited): a spawn that waits on sees its end of file then,
    which is how one exec both starts a run's runtime and learns of its end
    (:data:`providers.k8s.podexec.SPAWN_SCRIPT`)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the spawn gave up waiting: nobody reads any more
        os.write(fd, b"up\n")
