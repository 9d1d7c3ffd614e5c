"""One run driven by a hub, from the runtime's start to the result snapshot coming home.

The driver records every step in the run's event log (:mod:`gateway.hub.events`) before it acts on
the next one. Its collaborators each hold one part of the run: the runtime's process
(:mod:`.runtime_process`), its tokens (:mod:`.run_tokens`), the intake of the runtime's numbered
events, gaps filled after a dropped connection (:mod:`.runtime_events`), and the result's way home
(:mod:`.run_result`). Whatever happens — the agent exits, is stopped or killed, the runtime or its
environment dies, the hub is interrupted (then a later hub adopts the run: :mod:`.adoption`) — the
run ends with a recorded status and whatever result snapshot could be taken: through the runtime
when it is alive, else by the provider reading the environment directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError
from gateway.protocol import ProviderAgentStart, ProviderStart, ProviderStop
from gateway.tls import FINGERPRINT_ENV
from gateway.unix import unix_url
from narrative.errors import InvalidInput, NarrativeError
from narrative.hierarchy import create_thread, finish_run, get_thread, start_run
from narrative.ids import new_id
from narrative.models import AgentRun, Snapshot
from providers.base import DEFAULT_MAX_RESULT_BYTES, BaseProvider, HubSocket
from providers.errors import ResultTooLarge
from providers.usage import Sampler, UsageMeter

from .direct import pick_base
from .events import EventBudget, RunEventLog
from .leases import EnvironmentLease as Lease
from .narratives import Blocking
from .run_request import RunRequest, lease_environment
from .run_result import ResultHomecoming, record_usage
from .run_tokens import RunTokens
from .runtime_events import RuntimeEventIntake, claimed_fields
from .runtime_process import RunFailed, RuntimeProcess
from .tools_node import ToolsNode, lease_components

if TYPE_CHECKING:
    from .server import Hub

__all__ = ["RunDriver"]

log = logging.getLogger(__name__)

_CALL_TIMEOUT = 600.0
_DEADLINE_MARGIN = 5.0
"""Seconds past a run's timeout (and the stop grace) the hub waits for the runtime to end the
agent and report before it stops the run itself (the stop still waits for the runtime to
snapshot the result)."""
_STOP_MARGIN = 30.0
"""Seconds beyond the grace a runtime has to answer a stop (its result snapshotted)."""
_RUNTIME_EXIT_WAIT = 2.0
"""Seconds a runtime asked to shut down has to close its connection before the hub looks
whether its process still runs (and kills it after :data:`.runtime_process.EXIT_GRACE`)."""
_TIMEOUT_EXIT = 124  # what timeout(1) exits with, as the runtime reports a timeout


def _exit_code(event: dict[str, Any] | None) -> int | None:
    """The agent's exit code a runtime reported, if it is one (negative: killed by a signal)."""
    code = (event or {}).get("exitCode")
    return code if type(code) is int and -128 <= code <= 255 else None


class RunDriver:
    """Drives one run; created by :meth:`create` (or adopted by
    :func:`gateway.hub.adoption.adopt_interrupted`)."""

    def __init__(
        self,
        hub: Hub,
        run: AgentRun,
        base: Snapshot,
        request: RunRequest,
        events: RunEventLog,
    ) -> None:
        self.hub = hub
        self.run = run
        self.base = base
        self.request = request
        self.events = events
        assert request.environment is not None, "the hub selects the environment first"
        self.environment: str = request.environment
        self.gateway_id = request.environment
        self.lease: Lease | None = None
        self.finished = asyncio.Event()
        self.runtime = RuntimeProcess(
            hub.manager, hub.environment_lane(self.environment), self.environment, run.id
        )
        self.max_result_bytes = DEFAULT_MAX_RESULT_BYTES
        self.extra_stop_time = 0.0
        self.tokens = RunTokens(
            hub.signer,
            hub.token_ttl,
            hub.gateway,
            hub.policy,
            run_id=run.id,
            gateway_id=self.gateway_id,
            thread=run.thread_id,
            base=base.id,
        )
        self.intake = RuntimeEventIntake(run.id, events, self._fetch_events, self._background)
        self.result = ResultHomecoming(
            hub.store,
            hub.manager,
            hub.blocking,
            self._call,
            run=run,
            base=base,
            gateway_id=self.gateway_id,
            events=events,
        )
        self._result_id: str | None = None
        self._deadline: float | None = None  # loop time the hub stops a run with a timeout
        self._timed_out = False
        self._connected = asyncio.Event()
        self._gone = asyncio.Event()
        """Set while the runtime is not connected (after it was)."""
        self._disconnected_at: float | None = None
        self._unreachable_at: float | None = None
        """When the environment last could not be asked whether the runtime runs."""
        self._ending: str | None = None
        # A result exists only if the environment received the run's input: an environment
        # that never restored it holds a stale or empty tree, and "merging" that deletes files.
        self._input_restored = False
        self._retiring = False
        self._detached = False
        self._task: asyncio.Task[None] | None = None
        self._socket: str | None = None  # the unix socket this hub listens on for the runtime
        self._tasks: set[asyncio.Task[None]] = set()
        self.meter: UsageMeter | None = None  # None: not measured (an adopted run)
        self._sampler: Sampler | None = None
        self.tools: ToolsNode | None = None
        """The gateway node serving the routed calls of a run in a hybrid environment."""
        self.bytes_to_environment = 0
        self._start_lane: Blocking = hub.blocking
        """Where the environment is reset and the runtime spawned: the store thread, unless
        the provider does that without the store (then the environment's own lane)."""
        """Bytes of bundles this hub served the run's runtime (counted as it read them)."""

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    async def create(cls, hub: Hub, request: RunRequest) -> RunDriver:
        """Validate, lease (or select) the environment, record the run and its thread, and
        start driving it."""

        def prepare() -> tuple[AgentRun, Snapshot, Lease, str | None]:
            manager = hub.manager
            if request.snapshot and request.thread:
                raise InvalidInput("give a snapshot or a thread, not both")
            named = request.snapshot or request.thread  # resolved before anything changes
            base = pick_base(manager, request.snapshot, request.thread) if named else None
            lease, env, how = lease_environment(manager, request, hub.private_environments())
            try:
                lease_components(manager, env, lease)
                base = base or pick_base(manager)
                objective = get_thread(hub.store, base.thread).objective_id
                name = f"run/{env}/{new_id('run')[4:14]}"
                thread = create_thread(hub.store, objective, name, forked_from=base.id)
                run = start_run(hub.store, thread.id, request.agent, env, base.id)
            except BaseException:
                lease.release()
                raise
            lease.note(run.id)
            return run, base, lease, how

        run, base, lease, how = await hub.blocking(prepare)
        request = replace(request, environment=run.environment, require=[])
        events = RunEventLog(hub.store, run.id)
        events.append(
            "run.created",
            hub={"url": hub.url, "pid": os.getpid(), "environment": hub.environment_id},
            environment=request.environment,
            thread=run.thread_id,
            base=base.id,
            request=request.to_payload(),
        )
        if how is not None:
            events.append("environment.selected", environment=run.environment, how=how)
        driver = cls(hub, run, base, request, events)
        driver.lease = lease
        hub.register(driver)
        driver._task = asyncio.get_running_loop().create_task(driver._drive(adopted=False))
        return driver

    # -- the run --------------------------------------------------------------------------------

    async def _drive(self, adopted: bool) -> None:
        reason = ""
        try:
            await self._load_limits()
            if adopted:
                self._input_restored = any(
                    e.get("type") == "snapshot.shipped" for e in self.events.read()
                )
                await self._resume_tools()
                await self.runtime.await_connection(
                    self._connected, self.hub.reconnect_grace, "after a hub restart"
                )
                self.tokens.start_renewal()
            else:
                await self._start_tools()
                await self._launch()
                await self._ship_in()
                self._input_restored = True
                await self._start_agent()
            self._set_deadline()
            await self._await_exit()
            claimed = (self.intake.exit_event or {}).get("resultSnapshot")
            if isinstance(claimed, str) and claimed:
                try:
                    self._result_id = await self.result.ship_back(claimed, self.max_result_bytes)
                except ResultTooLarge as exc:
                    raise RunFailed(str(exc)) from None
        except RunFailed as exc:
            reason = str(exc)
        except (NarrativeError, GatewayError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            if self._detached:  # the hub is closing: a later hub adopts the run
                raise
            reason = "the hub stopped driving the run"
        except Exception as exc:  # a bug here or in a provider: the run fails and says so
            log.exception("driving run %s", self.run.id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if not self._detached:
                await self._finish(reason)

    async def _load_limits(self) -> None:
        """The caps of the run's environment (its config's ``max_*`` keys)."""

        def read() -> BaseProvider:
            manager = self.hub.manager
            return manager.provider(manager.get(self.environment))

        provider = await self.hub.blocking(read)
        config = provider.config
        self.extra_stop_time = provider.extra_stop_time
        if provider.resets_without_store:  # start beside other environments' runs
            self._start_lane = self.hub.environment_lane(self.environment)
        self.intake.budget = EventBudget(
            config.max_events, config.max_event_bytes, config.max_output_bytes
        )
        self.max_result_bytes = config.max_result_bytes

    def _set_deadline(self) -> None:
        if self.request.timeout is not None:
            slack = self.hub.stop_grace + _DEADLINE_MARGIN + self.extra_stop_time
            self._deadline = asyncio.get_running_loop().time() + self.request.timeout + slack

    def _outcome(self, failure: str) -> tuple[str, int | None]:
        """The run's status and exit code, from what the hub decided and verified itself: a
        kill or stop it asked for, a deadline it enforced, an error it met, whether it holds a
        result. The agent's exit code is only a runtime's report (an int, the first one sent),
        so it can make a run fail, but a run succeeds only when the hub also got its result."""
        exit_code = _exit_code(self.intake.exit_event)
        if self._timed_out:  # (and stopped or killed for it)
            return "failed", _TIMEOUT_EXIT
        if self._ending == "kill":
            return "killed", exit_code
        if self._ending == "stop":
            return "cancelled", exit_code
        if failure or exit_code != 0 or self._result_id is None:
            return "failed", exit_code
        return "succeeded", exit_code

    async def _start_tools(self) -> None:
        """In a hybrid environment: start its tools node and route the run's calls to it."""
        hub = self.hub
        self.tools = await ToolsNode.of(hub, self.environment, self.run.id, self.events)
        if self.tools is None:
            return
        # voided with the run's other tokens; not renewed: a run without a timeout that
        # outlasts the hub's token lifetime loses its tools node
        ttl = hub.token_ttl + (self.request.timeout or 0) + hub.stop_grace + _DEADLINE_MARGIN
        routing = await self.tools.start(self.gateway_id, self.request.routing, self.base, ttl)
        self.request = replace(self.request, routing=routing)

    async def _resume_tools(self) -> None:
        """An adopted run in a hybrid environment: take over its tools node."""
        history = self.events.read()
        if not any(e.get("type") == "hybrid.routing" for e in history):
            return
        self.tools = await ToolsNode.of(self.hub, self.environment, self.run.id, self.events)
        if self.tools is None:  # never route its calls anywhere but where they were sent
            raise RunFailed(f"environment {self.environment!r} is no longer hybrid")
        await self.tools.resume(self.gateway_id, history)

    async def _launch(self) -> None:
        hub = self.hub
        token = self.tokens.issue()

        url = await self.listen()

        def spawn() -> tuple[str, list[str]]:
            self.meter = hub.manager.usage_meter(self.environment)
            _record, provider, _resource = hub.manager.require_active(self.environment)
            argv = [*provider.runtime_command(), "runtime", "--connect", url]
            # The runtime uses the store in its own workspace, never one named by the hub's
            # environment; the token travels in the environment, not on the command line.
            env = {"NARRATIVE_TOKEN": token, "NARRATIVE_STORE": ""}
            if url == hub.url and hub.fingerprint is not None:
                # dialling the hub over TCP: the runtime pins the hub's certificate
                env[FINGERPRINT_ENV] = hub.fingerprint
            # nothing of an earlier run may reach this one: its processes are killed and the
            # workspace emptied (the runtime restores the run's input into it)
            return hub.manager.start_runtime(self.environment, argv, env), argv

        self.runtime.handle, argv = await self._start_lane(spawn)
        self.events.append("runtime.spawned", handle=self.runtime.handle, argv=argv)
        if self.meter is not None:
            self._sampler = Sampler(self.meter).start()
        await self.runtime.await_connection(self._connected, hub.startup_timeout, "start")
        self.tokens.start_renewal()

    async def listen(self) -> str:
        """Listen on the environment's unix socket, when it has one; the URL its runtime
        dials (that socket as the environment sees it, or the hub's TCP address)."""
        hub = self.hub

        def socket() -> HubSocket | None:
            _record, provider, resource = hub.manager.require_active(self.environment)
            return provider.hub_socket(resource)

        found = await hub.blocking(socket)
        if found is None:
            return hub.url
        await hub.listen_unix(found.host_path)
        self._socket = found.host_path
        return unix_url(found.environment_path)

    async def _ship_in(self) -> None:
        options = {
            "run": self.run.id,
            "thread": self.run.thread_id,
            "snapshot": self.base.id,
            "routing": self.request.routing,
        }
        message = ProviderStart(requestId=self._request_id(), options=options)
        response = await self.hub.gateway.provider_request(
            self.gateway_id, message, timeout=_CALL_TIMEOUT
        )
        reply = response.result if isinstance(response.result, dict) else {}
        self.events.append("snapshot.shipped", **claimed_fields(reply))

    async def _start_agent(self) -> None:
        options: dict[str, Any] = {"argv": self.request.argv, "env": self.request.env}
        if self.request.timeout is not None:
            options["timeout"] = self.request.timeout
        message = ProviderAgentStart(
            requestId=self._request_id(), agent=self.request.agent, options=options
        )
        await self.hub.gateway.provider_request(self.gateway_id, message, timeout=_CALL_TIMEOUT)

    async def _await_exit(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.intake.exited.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.intake.exited.wait(), 1.0)
            if self.intake.exited.is_set() or self._ending == "kill":
                return
            if self._deadline is not None and loop.time() > self._deadline:
                await self._enforce_timeout()
                continue
            if self._disconnected_at is None:
                continue
            alive = await self.runtime.liveness()
            now = loop.time()
            away = now - self._disconnected_at
            if alive is None:  # the grace for reconnecting starts once the host answers again
                self._unreachable_at = now
            waiting = now - max(self._disconnected_at, self._unreachable_at or 0.0)
            if alive is False:
                await self._lost("the runtime died")
            elif alive is None and away > self.hub.unreachable_grace:
                await self._lost(
                    f"the environment stayed unreachable for over {self.hub.unreachable_grace:g}s"
                )
            elif alive and waiting > self.hub.reconnect_grace:
                await self._lost(
                    f"the runtime stayed disconnected for over {self.hub.reconnect_grace:g}s"
                )

    async def _enforce_timeout(self) -> None:
        """The runtime let the run outlast its timeout: stop it, and kill it if that does not
        end it in time either."""
        if self._timed_out:
            await self.kill()
            return
        self._timed_out = True
        self.events.append("run.timed_out", timeout=self.request.timeout)
        self._deadline = asyncio.get_running_loop().time() + self.hub.stop_grace + 30
        await self.stop(self.hub.stop_grace)

    async def _lost(self, why: str) -> None:
        env = self.environment
        await self.hub.blocking(lambda: self.hub.manager.mark_error(env, why))
        self.events.append("runtime.lost", reason=why)
        raise RunFailed(why)

    async def _finish(self, reason: str) -> None:
        hub = self.hub
        self.tokens.stop_renewal()
        try:
            if self.tools is not None:  # the agent is done with it
                await self.tools.stop()
            if self._result_id is None and self._input_restored and not self.result.refused:
                # the runtime did not ship a result (it failed, was killed, or the transfer
                # broke): read the environment directly, so the agent's work is not lost
                self._result_id = await self.result.collect_directly()
            elif self._result_id is None and not self.result.refused:
                self.events.append("result.none", reason="the environment never got the input")
            self._result_id = await self.result.screen(self._result_id, self.tokens.issued)
            if reason:
                self.events.append("run.error", reason=reason)
                await self.runtime.record_log_tail(self.events)
            status, exit_code = self._outcome(reason)
            result_id = self._result_id
            final = await hub.blocking(
                lambda: finish_run(hub.store, self.run.id, status, exit_code, result_id)
            )
            self.run = final
            self._retiring = True
            hub.policy.end(self.run.id)  # its runtime's calls are refused from now on
            self.events.append(
                "run.finished", status=status, exitCode=exit_code, resultSnapshot=result_id
            )
            await self._retire_runtime()
            await record_usage(
                hub.store,
                hub.blocking,
                self.run.id,
                self.events,
                meter=self.meter,
                sampler=self._sampler,
                handle=self.runtime.handle,
                bytes_to_environment=self.bytes_to_environment,
            )
            await hub.end_tokens(self.run.id, "the run ended")
        finally:
            if self.tools is not None:  # (idempotent) also when finishing failed part way
                await self.tools.stop()
            if self._socket is not None:
                await hub.close_unix(self._socket)
            if self.lease is not None:
                self.lease.release()
            hub.unregister(self)
            self.finished.set()

    async def _retire_runtime(self) -> None:
        self._retiring = True
        if self._connected.is_set():
            with contextlib.suppress(GatewayError, NarrativeError):
                await self.hub.gateway.call(
                    "runtime", "shutdown", {}, target=self.gateway_id, timeout=5
                )
            # a runtime's connection closes as it exits: only then is a look at whether it
            # still runs (a round trip into the environment) likely to find it gone
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), _RUNTIME_EXIT_WAIT)
        await self.runtime.end()

    # -- adoption (see :func:`gateway.hub.adoption.adopt_interrupted`) -------------------------

    def replay(self, history: list[dict[str, Any]]) -> None:
        """Take up where an earlier hub's log of the run ends: its runtime, its events."""
        for event in history:
            if event["type"] == "runtime.spawned":
                self.runtime.handle = event.get("handle")
        self.intake.replay(history)

    def resume(self) -> None:
        """Carry on driving the adopted run (registered with the hub): its runtime is expected
        to reconnect, if it has not while this hub was starting up."""
        self._disconnected_at = asyncio.get_running_loop().time()
        if self.hub.gateway.state.connected(self.gateway_id):
            self.on_connection(True)
        self._task = asyncio.get_running_loop().create_task(self._drive(adopted=True))

    # -- stop and kill --------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Ask the runtime to stop the agent (TERM, then KILL after ``grace``); kill the
        runtime through the provider if it does not answer."""
        if self.intake.exited.is_set():
            return
        self._ending = self._ending or "stop"
        self.events.append("run.stopping", grace=grace)
        try:
            message = ProviderStop(requestId=self._request_id())
            await self.hub.gateway.call(
                "runtime", "setStopGrace", {"grace": grace}, target=self.gateway_id, timeout=5
            )
            await self.hub.gateway.provider_request(
                self.gateway_id, message, timeout=grace + _STOP_MARGIN + self.extra_stop_time
            )
        except GatewayError as exc:
            self.events.append("run.stop_failed", reason=str(exc))
            await self.kill()

    async def kill(self) -> None:
        """Kill the runtime and the agent at once, through the provider."""
        self._ending = "kill"
        self.events.append("run.killing")
        await self.runtime.kill()
        self.intake.exited.set()

    @property
    def retiring(self) -> bool:
        """The run is recorded as finished and its runtime is being sent away."""
        return self._retiring

    def detach(self) -> None:
        """Stop driving without finishing the run (the hub is closing; the run is adopted by
        the next hub of this store)."""
        self._detached = True
        if self.lease is not None:
            self.lease.release()  # the next hub takes it again when it adopts the run
        if self._task is not None:
            self._task.cancel()
        self.tokens.stop_renewal()

    # -- events ---------------------------------------------------------------------------------

    def on_connection(self, up: bool) -> None:
        if up:
            self._gone.clear()
        else:
            self._gone.set()
        if self._retiring:  # the run is over: the runtime leaving is expected
            return
        loop = asyncio.get_running_loop()
        env = self.environment
        if up:
            first = not self._connected.is_set() and self._disconnected_at is None
            self._connected.set()
            self._disconnected_at = None
            self.events.append("runtime.connected")
            if not first:
                self.intake.request_fill()
        else:
            self._connected.clear()
            self._disconnected_at = loop.time()
            self.events.append("runtime.disconnected")

        async def follow() -> None:
            with contextlib.suppress(NarrativeError):
                await self.hub.blocking(lambda: self.hub.manager.connection_changed(env, up))

        self._background(follow())

    def on_event(self, event: dict[str, Any]) -> None:
        """A runtime's event notification (see :class:`.runtime_events.RuntimeEventIntake`)."""
        self.intake.on_event(event)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request_id(self) -> str:
        return self.hub.gateway.new_request_id()

    async def _call(self, kind: str, action: str, payload: dict[str, Any]) -> Any:
        """A call to the run's runtime."""
        return await self.hub.gateway.call(
            kind, action, payload, target=self.gateway_id, timeout=_CALL_TIMEOUT
        )

    async def _fetch_events(self, since: int) -> Any:
        """The runtime's events after ``since`` (``runtime:events``)."""
        return await self.hub.gateway.call(
            "runtime", "events", {"since": since}, target=self.gateway_id, timeout=30
        )
