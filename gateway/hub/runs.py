"""One run driven by a hub, from the runtime's start to the result snapshot coming home.

The driver records every step in the run's event log (:mod:`gateway.hub.events`) before it acts
on the next one. Runtime events carry their own sequence numbers (``rseq``): one that arrives
out of order, or a reconnect, makes the driver ask the runtime for what it missed
(``runtime:events``), so a dropped connection loses nothing. Whatever happens — the agent
exits, is stopped or killed, the runtime or its environment dies, the hub is interrupted — the
run ends with a recorded status and whatever result snapshot could be taken: through the
runtime when it is alive, else by the provider reading the environment directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError, OutOfScope
from gateway.protocol import ProviderAgentStart, ProviderStart, ProviderStop
from gateway.tokens import TokenClaims
from gateway.unix import unix_url
from narrative.commits import snapshot_at
from narrative.errors import InvalidInput, NarrativeError
from narrative.hierarchy import create_thread, finish_run, get_thread, list_runs, start_run
from narrative.history import resolve_snapshot
from narrative.ids import new_id
from narrative.models import AgentRun, Snapshot
from narrative.processes import pid_alive
from narrative.runs import incoming_ref, withheld_files
from providers.base import DEFAULT_MAX_RESULT_BYTES, HubSocket, ProviderConfig
from providers.errors import ResultTooLarge, RuntimeBroken
from providers.manager import EnvironmentManager
from providers.usage import ProcessUsage, Sampler, UsageMeter

from .direct import pick_base, screen_result
from .events import EventBudget, RunEventLog
from .leases import EnvironmentBusy
from .leases import EnvironmentLease as Lease
from .narratives import fetch_bundle
from .selection import select_environment
from .token_policy import result_scope, run_token
from .usage_records import phases_from_events, save_usage, usage_record, wall_from_events

if TYPE_CHECKING:
    from .server import Hub

__all__ = ["RunDriver", "RunRequest", "adopt_interrupted", "collect_from_environment"]

log = logging.getLogger(__name__)

_CALL_TIMEOUT = 600.0
_LOG_LINES = 20
"""Lines of the runtime's own output recorded when a run fails."""
_DEADLINE_MARGIN = 5.0
"""Seconds past a run's timeout (and the stop grace) the hub waits for the runtime to end the
agent and report before it stops the run itself (the stop still waits for the runtime to
snapshot the result)."""
_TIMEOUT_EXIT = 124  # what timeout(1) exits with, as the runtime reports a timeout
_RUNTIME_EVENTS = frozenset({"agent.started", "agent.output", "agent.exited", "call.routed"})
"""What a runtime reports. Anything else it sends is recorded as ``runtime.event`` (its claimed
type in ``event``), never as one of the hub's own events (``run.finished``, ``runtime.spawned``)."""
_HUB_FIELDS = frozenset({"seq", "time", "type", "kind", "run", "hub", "at", "event"})
"""Fields only the hub writes into its log (readers trust ``hub`` to find the driving hub)."""


def _claimed(fields: dict[str, Any]) -> dict[str, Any]:
    """What a runtime sent, without the fields only the hub writes."""
    return {k: v for k, v in fields.items() if k not in _HUB_FIELDS}


def _exit_code(event: dict[str, Any] | None) -> int | None:
    """The agent's exit code a runtime reported, if it is one (negative: killed by a signal)."""
    code = (event or {}).get("exitCode")
    return code if type(code) is int and -128 <= code <= 255 else None


@dataclass(frozen=True)
class RunRequest:
    """What to run, where, from which snapshot."""

    environment: str | None
    """The environment's name; None: the hub selects one with the ``require`` capabilities."""
    argv: list[str]
    agent: str = "agent"
    snapshot: str | None = None
    thread: str | None = None
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    routing: dict[str, Any] | None = None
    """``proxyExecution.json`` content for the runtime (default: the one in the snapshot)."""
    require: list[str] = field(default_factory=list)
    """Capabilities the selected environment must have (only without ``environment``)."""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RunRequest:
        """Validate a control call's payload."""
        argv = payload.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("'argv' must be a non-empty list of strings")
        env = payload.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise InvalidInput("'env' must map names to strings")
        timeout = payload.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise InvalidInput("'timeout' must be a positive number of seconds")
        routing = payload.get("routing")
        if routing is not None and not isinstance(routing, dict):
            raise InvalidInput("'routing' must be a proxyExecution document")
        strings = {}
        for name in ("environment", "agent", "snapshot", "thread"):
            value = payload.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"{name!r} must be a string")
            strings[name] = value
        require = payload.get("require") or []
        if not isinstance(require, list) or not all(isinstance(r, str) for r in require):
            raise InvalidInput("'require' must be a list of capability names")
        if strings["environment"] is not None and require:
            raise InvalidInput("give an environment or the capabilities to select one, not both")
        return cls(
            environment=strings["environment"] or None,
            require=list(require),
            argv=list(argv),
            agent=strings["agent"] or "agent",
            snapshot=strings["snapshot"],
            thread=strings["thread"],
            timeout=float(timeout) if timeout is not None else None,
            env=dict(env),
            routing=routing,
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "argv": self.argv,
            "agent": self.agent,
            "snapshot": self.snapshot,
            "thread": self.thread,
            "timeout": self.timeout,
            "env": self.env,
            "routing": self.routing,
            "require": self.require,
        }


def collect_from_environment(
    manager: EnvironmentManager, run: AgentRun, events: RunEventLog
) -> str | None:
    """The run's result read by the provider straight from its environment (when the runtime
    cannot ship it); the snapshot id, or None when the environment cannot be read."""
    try:
        _record, provider, resource = manager.require_active(run.environment)
        message = f"result of run {run.id} (collected by the provider)"
        snap_id = provider.collect(resource, run.thread_id, run.id, message).id
    except NarrativeError as exc:
        events.append("result.unavailable", reason=str(exc))
        return None
    events.append("result.collected", snapshot=snap_id, by="provider")
    return snap_id


def _lease_environment(
    manager: EnvironmentManager, request: RunRequest
) -> tuple[Lease, str, str | None]:
    """The run's environment, leased and able to run commands: the one named, or one the hub
    selects (then also how: reused, started or created)."""
    if request.environment is None:
        chosen = select_environment(manager, request.require)
        return chosen.lease, chosen.record.name, chosen.how
    record = manager.get(request.environment)
    lease = Lease.acquire(manager.store, record.id)
    if lease is None:
        raise EnvironmentBusy(record.name, Lease.holder(manager.store, record.id))
    try:
        manager.require_active(record.id)
    except BaseException:
        lease.release()
        raise
    return lease, record.name, None


class RunFailed(GatewayError):
    """The run cannot go on (the reason is recorded in its event log)."""


class RunDriver:
    """Drives one run; created by :meth:`create` (or :func:`adopt_interrupted`)."""

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
        self.handle: str | None = None
        self.exit_event: dict[str, Any] | None = None
        self.last_rseq = 0
        self.budget = EventBudget()
        self.max_result_bytes = DEFAULT_MAX_RESULT_BYTES
        self._result_id: str | None = None
        self._result_refused = False  # over its cap: it stays in the environment
        self._deadline: float | None = None  # loop time the hub stops a run with a timeout
        self._timed_out = False
        self._exited = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected_at: float | None = None
        self._ending: str | None = None
        # A result exists only if the environment received the run's input: an environment
        # that never restored it holds a stale or empty tree, and "merging" that deletes files.
        self._input_restored = False
        self._filling = False
        self._fill_wanted = False
        self._retiring = False
        self._detached = False
        self._task: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._token_expires = 0.0  # unknown (an adopted run): renew at once
        self._token_claims: TokenClaims | None = None  # of the token the runtime holds
        self._issued: list[str] = []  # every token handed to the runtime
        self._socket: str | None = None  # the unix socket this hub listens on for the runtime
        self._tasks: set[asyncio.Task[None]] = set()
        self.meter: UsageMeter | None = None  # None: not measured (an adopted run)
        self._sampler: Sampler | None = None
        self.bytes_to_environment = 0
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
            lease, env, how = _lease_environment(manager, request)
            try:
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
                await self._await_connection(self.hub.reconnect_grace, "after a hub restart")
                self._start_renewal()
            else:
                await self._launch()
                await self._ship_in()
                self._input_restored = True
                await self._start_agent()
            self._set_deadline()
            await self._await_exit()
            claimed = (self.exit_event or {}).get("resultSnapshot")
            if isinstance(claimed, str) and claimed:
                self._result_id = await self._ship_back(claimed)
        except RunFailed as exc:
            reason = str(exc)
        except (NarrativeError, GatewayError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            if self._detached:  # the hub is closing: a later hub adopts the run
                raise
            reason = "the hub stopped driving the run"
        finally:
            if not self._detached:
                await self._finish(reason)

    async def _load_limits(self) -> None:
        """The caps of the run's environment (its config's ``max_*`` keys)."""

        def read() -> ProviderConfig:
            manager = self.hub.manager
            return manager.provider(manager.get(self.environment)).config

        config = await self.hub.blocking(read)
        self.budget = EventBudget(
            config.max_events, config.max_event_bytes, config.max_output_bytes
        )
        self.max_result_bytes = config.max_result_bytes

    def _set_deadline(self) -> None:
        if self.request.timeout is not None:
            slack = self.hub.stop_grace + _DEADLINE_MARGIN
            self._deadline = asyncio.get_running_loop().time() + self.request.timeout + slack

    def _outcome(self, failure: str) -> tuple[str, int | None]:
        """The run's status and exit code, from what the hub decided and verified itself: a
        kill or stop it asked for, a deadline it enforced, an error it met, whether it holds a
        result. The agent's exit code is only a runtime's report (an int, the first one sent),
        so it can make a run fail, but a run succeeds only when the hub also got its result."""
        exit_code = _exit_code(self.exit_event)
        if self._timed_out:  # (and stopped or killed for it)
            return "failed", _TIMEOUT_EXIT
        if self._ending == "kill":
            return "killed", exit_code
        if self._ending == "stop":
            return "cancelled", exit_code
        if failure or exit_code != 0 or self._result_id is None:
            return "failed", exit_code
        return "succeeded", exit_code

    async def _launch(self) -> None:
        hub = self.hub
        token = self._token()

        url = await self._listen()

        def spawn() -> tuple[str, list[str]]:
            # nothing of an earlier run may reach this one: its processes are killed and the
            # workspace emptied (the runtime restores the run's input into it)
            hub.manager.prepare_run(self.environment, None)
            self.meter = hub.manager.usage_meter(self.environment)
            _record, provider, _resource = hub.manager.require_active(self.environment)
            argv = [*provider.runtime_command(), "runtime", "--connect", url]
            # The runtime uses the store in its own workspace, never one named by the hub's
            # environment; the token travels in the environment, not on the command line.
            env = {"NARRATIVE_TOKEN": token, "NARRATIVE_STORE": ""}
            return hub.manager.spawn(self.environment, argv, env=env), argv

        self.handle, argv = await hub.blocking(spawn)
        self.events.append("runtime.spawned", handle=self.handle, argv=argv)
        if self.meter is not None:
            self._sampler = Sampler(self.meter).start()
        await self._await_connection(hub.startup_timeout, "start")
        self._start_renewal()

    async def _listen(self) -> str:
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

    def _token(self) -> str:
        """A fresh token for the run's runtime, scoped to the run (see
        :func:`gateway.hub.token_policy.run_token`)."""
        ttl = self.hub.token_ttl
        token = run_token(
            self.hub.signer,
            self.run.id,
            self.gateway_id,
            ttl,
            thread=self.run.thread_id,
            base=self.base.id,
        )
        self._token_claims = self.hub.signer.verify(token)
        self._token_expires = self._token_claims.expires_at
        self._issued.append(token)  # the result is screened for each of them
        return token

    def _start_renewal(self) -> None:
        self._renewal = asyncio.get_running_loop().create_task(self._renew_tokens())

    async def _await_connection(self, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.5)
            if self._connected.is_set():
                return
            if self.handle is not None and not await self._runtime_alive():
                raise RunFailed(
                    f"the runtime exited before connecting ({what}){await self._diagnosis()}"
                )
            if loop.time() > deadline:
                raise RunFailed(f"the runtime did not connect within {timeout:g}s ({what})")

    async def _diagnosis(self) -> str:
        """Why the environment's runtime does not start (``": ..."``), when its import check
        says (no program, no Python, no package, shadowed modules); else nothing."""

        def check() -> None:
            _record, provider, resource = self.hub.manager.require_active(self.environment)
            provider.check_runtime(resource)

        try:
            await self.hub.blocking(check)
        except RuntimeBroken as exc:
            return f": {exc}"
        except NarrativeError:
            pass
        return ""

    async def _runtime_alive(self) -> bool:
        handle = self.handle
        if handle is None:
            return False
        try:
            return await self.hub.blocking(lambda: self.hub.manager.alive(self.environment, handle))
        except NarrativeError:
            return False

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
        self.events.append("snapshot.shipped", **_claimed(reply))

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
        while not self._exited.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), 1.0)
            if self._exited.is_set() or self._ending == "kill":
                return
            if self._deadline is not None and loop.time() > self._deadline:
                await self._enforce_timeout()
                continue
            if self._disconnected_at is None:
                continue
            if not await self._runtime_alive():
                await self._lost("the runtime died")
            elif loop.time() - self._disconnected_at > self.hub.reconnect_grace:
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

    async def _ship_back(self, result_snapshot: str) -> str | None:
        spec = {"changed": True, "threads": [self.run.thread_id], "have": [self.base.commit]}

        async def call(kind: str, action: str, payload: dict[str, Any]) -> Any:
            return await self.hub.gateway.call(
                kind, action, payload, target=self.gateway_id, timeout=_CALL_TIMEOUT
            )

        # the result may move the run's own thread and bring its nested runs' new threads,
        # nothing else: a runtime that tries is refused, and the result is read directly
        scope = result_scope(self.hub.store, self.run.thread_id, f"run {self.run.id}")
        try:
            result, size = await fetch_bundle(
                call,
                self.hub.store,
                spec,
                self.hub.blocking,
                self.gateway_id,
                check_threads=scope,
                max_bytes=self.max_result_bytes,
                stage={self.run.thread_id: incoming_ref(self.run.id)},  # screened before it lands
            )
        except ResultTooLarge as exc:
            # nothing of it was stored; it stays in the environment, and a direct collect
            # of the same files would be as large
            self._result_refused = True
            self.events.append("result.refused", reason=str(exc))
            raise RunFailed(str(exc)) from None
        except OutOfScope as exc:
            log.warning(
                "refused the result of run %s, env %s: %s", self.run.id, self.gateway_id, exc
            )
            self.events.append("result.refused", reason=str(exc))
            return await self._collect_directly()
        snap = await self.hub.blocking(partial(self._claimed_result, result_snapshot))
        if snap is None:
            why = f"the result {result_snapshot!r} the runtime named is not its run's thread head"
            self.events.append("result.refused", reason=why)
            return await self._collect_directly()
        self.events.append(
            "result.collected",
            snapshot=snap.id,
            bytes=size,
            objects=result.objects,
            threads=sorted({*result.updated, *result.staged}),  # its own is staged, then screened
        )
        return snap.id

    def _claimed_result(self, claimed: str) -> Snapshot | None:
        """The snapshot a runtime named as its result, if it is what the hub now holds for the
        run: the result just staged (:func:`narrative.runs.incoming_ref`), the head of the
        run's thread, or its base when nothing changed (else the runtime named some other
        snapshot of the store)."""
        store = self.hub.store
        staged = store.refs.read(incoming_ref(self.run.id))
        if staged is not None:
            snap = snapshot_at(store, staged)
            return snap if snap.id == claimed else None
        if claimed == self.base.id:
            return self.base
        head = store.thread_heads().get(self.run.thread_id)
        try:
            snap = resolve_snapshot(store, claimed)
        except NarrativeError:
            return None
        return snap if head is not None and snap.commit == head.hex() else None

    async def _collect_directly(self) -> str | None:
        """The result read by the provider from the environment (the runtime is gone)."""
        return await self.hub.blocking(
            partial(collect_from_environment, self.hub.manager, self.run, self.events)
        )

    async def _screen(self, result_id: str | None) -> str | None:
        """The result with secret-looking files withheld (see :func:`screen_result`)."""
        if result_id is None:
            return None
        store, run_id, tokens = self.hub.store, self.run.id, list(self._issued)
        screened = await self.hub.blocking(lambda: screen_result(store, run_id, result_id, tokens))
        if screened != result_id:
            snap = (
                await self.hub.blocking(lambda: resolve_snapshot(store, screened))
                if screened is not None
                else None
            )
            withheld = withheld_files(snap) if snap is not None else []
            self.events.append(
                "result.screened",
                snapshot=screened,
                withheld=[w["path"] for w in withheld],
            )
        return screened

    async def _finish(self, reason: str) -> None:
        hub = self.hub
        if self._renewal is not None:
            self._renewal.cancel()
        try:
            if self._result_id is None and self._input_restored and not self._result_refused:
                # the runtime did not ship a result (it failed, was killed, or the transfer
                # broke): read the environment directly, so the agent's work is not lost
                self._result_id = await self._collect_directly()
            elif self._result_id is None and not self._result_refused:
                self.events.append("result.none", reason="the environment never got the input")
            self._result_id = await self._screen(self._result_id)
            if reason:
                self.events.append("run.error", reason=reason)
                await self._record_runtime_log()
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
            await self._record_usage()
            await hub.end_tokens(self.run.id, "the run ended")
        finally:
            if self._socket is not None:
                await hub.close_unix(self._socket)
            if self.lease is not None:
                self.lease.release()
            hub.unregister(self)
            self.finished.set()

    async def _record_usage(self) -> None:
        """Record what the run cost (:mod:`providers.usage`), once its runtime has ended: the
        provider's CPU and memory of it, the bytes this hub sent and received, the wall time
        and phases by this hub's clock. Never fails the run."""
        if self._sampler is not None:
            await asyncio.to_thread(self._sampler.stop)
        meter, handle = self.meter, self.handle
        try:
            if meter is not None:
                process = await asyncio.to_thread(meter.finish, handle)
            else:
                process = ProcessUsage(None, None, "CPU and memory not measured (adopted run)")
            events = await self.hub.blocking(self.events.read)
            received = [e.get("bytes") for e in events if e.get("type") == "result.collected"]
            bytes_back = next((b for b in received if type(b) is int), None)
            record = usage_record(
                wall_from_events(events),
                process,
                self.bytes_to_environment if self.meter is not None else None,
                bytes_back,
                phases_from_events(events),
                "wall time, phases and bytes: the hub",
            )
            await self.hub.blocking(lambda: save_usage(self.hub.store, self.run.id, record))
        except (NarrativeError, OSError) as exc:
            log.warning("cannot record the usage of run %s: %s", self.run.id, exc)

    async def _record_runtime_log(self) -> None:
        """Put the end of the runtime's own output into the event log: why a runtime failed
        (a traceback, a bad command) is there, and with docker and e2b nowhere on the host."""
        handle, env = self.handle, self.environment
        if handle is None:
            return
        try:
            lines = await self.hub.blocking(
                lambda: self.hub.manager.logs.runtime_tail(env, handle, _LOG_LINES)
            )
        except (NarrativeError, OSError) as exc:
            log.info("cannot read the runtime log of %s: %s", self.run.id, exc)
            return
        if lines:
            self.events.append("runtime.log", handle=handle, lines=lines)

    async def _retire_runtime(self) -> None:
        self._retiring = True
        if self._connected.is_set():
            with contextlib.suppress(GatewayError, NarrativeError):
                await self.hub.gateway.call(
                    "runtime", "shutdown", {}, target=self.gateway_id, timeout=5
                )
        handle, env = self.handle, self.environment
        if handle is None:
            return
        for _ in range(50):
            if not await self._runtime_alive():
                break
            await asyncio.sleep(0.1)
        else:
            with contextlib.suppress(NarrativeError):
                await self.hub.blocking(lambda: self.hub.manager.signal(env, handle, "kill"))
        # Docker and e2b keep the runtime's output inside: copy it next to the others'.
        try:
            await self.hub.blocking(lambda: self.hub.manager.logs.sync_runtime(env, handle))
        except (NarrativeError, OSError) as exc:
            log.info("cannot copy the runtime log of %s: %s", self.run.id, exc)

    async def _renew_tokens(self) -> None:
        """Hand the runtime a fresh token when a third of the current one's lifetime is left
        at most, so it can always reconnect while the run lasts (tokens stay short-lived); the
        runtime presents it on its connection (``gateway:refresh``), which is closed at the old
        token's expiry otherwise."""
        ttl = self.hub.token_ttl
        while True:
            await asyncio.sleep(max(0.0, self._token_expires - ttl * 2 / 3 - time.time()))
            held, held_claims = self._token_expires, self._token_claims
            token = self._token()
            try:
                await self.hub.gateway.call(
                    "runtime", "setToken", {"token": token}, target=self.gateway_id, timeout=10
                )
            except GatewayError as exc:
                log.info("could not renew the token of %s: %s", self.gateway_id, exc)
                self._token_expires, self._token_claims = held, held_claims  # still the old one
                await asyncio.sleep(min(ttl / 10, 5.0))
                continue
            if held_claims is not None:
                # the runtime holds (and its connection presented) the new one: the old one,
                # which may be read from the runtime's environment, is void
                await self.hub.policy.revoke_token(held_claims)
                await self.hub.gateway.revoke("renewed", token_id=held_claims.token_id)

    # -- stop and kill --------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Ask the runtime to stop the agent (TERM, then KILL after ``grace``); kill the
        runtime through the provider if it does not answer."""
        if self._exited.is_set():
            return
        self._ending = self._ending or "stop"
        self.events.append("run.stopping", grace=grace)
        try:
            message = ProviderStop(requestId=self._request_id())
            await self.hub.gateway.call(
                "runtime", "setStopGrace", {"grace": grace}, target=self.gateway_id, timeout=5
            )
            await self.hub.gateway.provider_request(self.gateway_id, message, timeout=grace + 30)
        except GatewayError as exc:
            self.events.append("run.stop_failed", reason=str(exc))
            await self.kill()

    async def kill(self) -> None:
        """Kill the runtime and the agent at once, through the provider."""
        self._ending = "kill"
        self.events.append("run.killing")
        handle = self.handle
        if handle is not None:
            await self.hub.blocking(
                lambda: self.hub.manager.signal(self.environment, handle, "kill")
            )
        self._exited.set()

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
        if self._renewal is not None:
            self._renewal.cancel()

    # -- events ---------------------------------------------------------------------------------

    def on_connection(self, up: bool) -> None:
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
                self._request_fill()
        else:
            self._connected.clear()
            self._disconnected_at = loop.time()
            self.events.append("runtime.disconnected")

        async def follow() -> None:
            with contextlib.suppress(NarrativeError):
                await self.hub.blocking(lambda: self.hub.manager.connection_changed(env, up))

        self._background(follow())

    def on_event(self, event: dict[str, Any]) -> None:
        rseq = event.get("rseq")
        if not isinstance(rseq, int) or event.get("run") != self.run.id:
            return
        if rseq <= self.last_rseq:
            return
        if rseq > self.last_rseq + 1:
            self._request_fill()
            return
        self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        """Record one of the runtime's events: under its own type only if it is one a runtime
        reports, without the fields only the hub writes, within the run's caps. The first
        ``agent.exited`` ends the agent (later ones are claims recorded as such)."""
        self.last_rseq = event["rseq"]
        kind, fields = event.get("type"), _claimed(event)
        fields["at"] = event.get("time")
        if kind == "agent.exited" and self.exit_event is None:
            self.exit_event = event
            self._exited.set()
            self.events.append(kind, **fields)  # the one event past the caps: the run ends
            return
        if kind not in _RUNTIME_EVENTS or kind == "agent.exited":
            kind, fields["event"] = "runtime.event", str(kind)[:200]
        for admitted_kind, admitted in self.budget.admit(kind, fields):
            self.events.append(admitted_kind, **admitted)

    def _request_fill(self) -> None:
        self._fill_wanted = True
        if not self._filling:
            self._filling = True
            self._background(self._fill())

    async def _fill(self) -> None:
        """Ask the runtime for the events after the last one recorded, until it has no more
        (and again if another gap showed while asking)."""
        try:
            while self._fill_wanted:
                self._fill_wanted = False
                while True:
                    reply = await self.hub.gateway.call(
                        "runtime",
                        "events",
                        {"since": self.last_rseq},
                        target=self.gateway_id,
                        timeout=30,
                    )
                    batch = reply.get("events", []) if isinstance(reply, dict) else []
                    if not isinstance(batch, list):
                        break
                    recorded = self.last_rseq
                    for event in batch:
                        if isinstance(event, dict) and event.get("rseq") == self.last_rseq + 1:
                            self._record(event)
                    if self.last_rseq == recorded or self._exited.is_set():
                        break
        except GatewayError as exc:
            log.info("could not fetch the missed events of %s: %s", self.run.id, exc)
        finally:
            self._filling = False

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request_id(self) -> str:
        return self.hub.gateway.new_request_id()


async def adopt_interrupted(hub: Hub) -> None:
    """Take over the runs an earlier hub of this store was driving when it stopped: wait for
    their runtimes to reconnect (they keep trying) and carry on; finish the others."""

    def interrupted() -> list[tuple[AgentRun, list[dict[str, Any]]]]:
        found = []
        for run in list_runs(hub.store):
            if run.status != "running":
                continue
            events = RunEventLog(hub.store, run.id)
            history = events.read()
            if not history or history[0]["type"] != "run.created":
                continue
            pids = [e["hub"].get("pid") for e in history if isinstance(e.get("hub"), dict)]
            driver_pid = pids[-1] if pids else None
            # A hub that is still alive (an embedded one, say) keeps driving its own runs.
            if isinstance(driver_pid, int) and driver_pid != os.getpid() and pid_alive(driver_pid):
                continue
            found.append((run, history))
        return found

    for run, history in await hub.blocking(interrupted):
        created = history[0]
        try:
            request = RunRequest.from_payload(created.get("request") or {})
            base = await hub.blocking(
                partial(resolve_snapshot, hub.store, str(created.get("base")))
            )
            environment = request.environment or run.environment
            env_id = (await hub.blocking(partial(hub.manager.get, environment))).id
        except NarrativeError as exc:
            log.warning("cannot adopt run %s: %s", run.id, exc)
            continue
        lease = await hub.blocking(partial(Lease.acquire, hub.store, env_id))
        if lease is None:
            log.warning("cannot adopt run %s: its environment is leased by another hub", run.id)
            continue
        lease.note(run.id)
        events = RunEventLog(hub.store, run.id)
        driver = RunDriver(hub, run, base, replace(request, environment=environment), events)
        driver.lease = lease
        for event in history:
            if event["type"] == "runtime.spawned":
                driver.handle = event.get("handle")
            if isinstance(event.get("rseq"), int):
                driver.last_rseq = max(driver.last_rseq, event["rseq"])
            if event["type"] == "agent.exited":
                driver.exit_event = event
                driver._exited.set()
        try:  # the runtime dials the environment's socket again, if it has one
            await driver._listen()
        except (NarrativeError, OSError) as exc:
            log.warning("cannot listen for the runtime of run %s: %s", run.id, exc)
        events.append("run.adopted", hub={"url": hub.url, "pid": os.getpid()})
        hub.register(driver)
        driver._disconnected_at = asyncio.get_running_loop().time()
        if hub.gateway.state.connected(driver.gateway_id):
            # the runtime reconnected while this hub was still starting up
            driver.on_connection(True)
        driver._task = asyncio.get_running_loop().create_task(driver._drive(adopted=True))
