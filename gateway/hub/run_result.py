"""A run's result on its way home, and what the hub records once the run is over.

The result comes back as a bundle from the runtime, staged and checked against what the run
may change (:func:`gateway.hub.token_policy.result_scope`); a result the runtime cannot ship,
or one it shipped out of scope, is read by the provider straight from the environment instead.
Either way it is screened for secrets (:func:`gateway.hub.direct.screen_result`) before it
lands. Once the run is over, what it cost is recorded (:func:`record_usage`).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from gateway.errors import OutOfScope
from narrative.commits import snapshot_at
from narrative.errors import NarrativeError
from narrative.history import resolve_snapshot
from narrative.models import AgentRun, Snapshot
from narrative.runs import incoming_ref, withheld_files
from narrative.store import Store
from providers.errors import ResultTooLarge
from providers.manager import EnvironmentManager
from providers.usage import ProcessUsage, Sampler, UsageMeter

from .direct import screen_result
from .events import RunEventLog
from .narratives import Blocking, Call, fetch_bundle
from .run_request import collect_from_environment
from .token_policy import result_scope
from .usage_records import phases_from_events, save_usage, usage_record, wall_from_events

__all__ = ["ResultHomecoming", "record_usage"]

log = logging.getLogger(__name__)


class ResultHomecoming:
    """Brings run ``run``'s result home: from its runtime (its gateway id ``gateway_id``,
    reached through ``call``) or, failing that, from its environment through the provider."""

    def __init__(
        self,
        store: Store,
        manager: EnvironmentManager,
        blocking: Blocking,
        call: Call,
        *,
        run: AgentRun,
        base: Snapshot,
        gateway_id: str,
        events: RunEventLog,
    ) -> None:
        self.store = store
        self.manager = manager
        self.blocking = blocking
        self.call = call
        self.run = run
        self.base = base
        self.gateway_id = gateway_id
        self.events = events
        self.refused = False
        """The result was over its cap: it stays in the environment."""

    async def ship_back(self, result_snapshot: str, max_bytes: int) -> str | None:
        """Pull the result the runtime named; its snapshot id (None: nothing could be read).

        Raises:
            ResultTooLarge: It is over ``max_bytes`` (recorded; a direct collect of the same
                files would be as large, so none is tried).
        """
        spec = {"changed": True, "threads": [self.run.thread_id], "have": [self.base.commit]}
        # the result may move the run's own thread and bring its nested runs' new threads,
        # nothing else: a runtime that tries is refused, and the result is read directly
        scope = result_scope(self.store, self.run.thread_id, f"run {self.run.id}")
        try:
            result, size = await fetch_bundle(
                self.call,
                self.store,
                spec,
                self.blocking,
                self.gateway_id,
                check_threads=scope,
                max_bytes=max_bytes,
                stage={self.run.thread_id: incoming_ref(self.run.id)},  # screened before it lands
            )
        except ResultTooLarge as exc:
            # nothing of it was stored; it stays in the environment
            self.refused = True
            self.events.append("result.refused", reason=str(exc))
            raise
        except OutOfScope as exc:
            log.warning(
                "refused the result of run %s, env %s: %s", self.run.id, self.gateway_id, exc
            )
            self.events.append("result.refused", reason=str(exc))
            return await self.collect_directly()
        snap = await self.blocking(partial(self._claimed_result, result_snapshot))
        if snap is None:
            why = f"the result {result_snapshot!r} the runtime named is not its run's thread head"
            self.events.append("result.refused", reason=why)
            return await self.collect_directly()
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
        store = self.store
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

    async def collect_directly(self) -> str | None:
        """The result read by the provider from the environment (the runtime is gone)."""
        return await self.blocking(
            partial(collect_from_environment, self.manager, self.run, self.events)
        )

    async def screen(self, result_id: str | None, tokens: list[str]) -> str | None:
        """The result with secret-looking files (and any of ``tokens``) withheld (see
        :func:`gateway.hub.direct.screen_result`)."""
        if result_id is None:
            return None
        store, run_id, tokens = self.store, self.run.id, list(tokens)
        screened = await self.blocking(lambda: screen_result(store, run_id, result_id, tokens))
        if screened != result_id:
            snap = (
                await self.blocking(lambda: resolve_snapshot(store, screened))
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


async def record_usage(
    store: Store,
    blocking: Blocking,
    run_id: str,
    events: RunEventLog,
    *,
    meter: UsageMeter | None,
    sampler: Sampler | None,
    handle: str | None,
    bytes_to_environment: int,
) -> None:
    """Record what run ``run_id`` cost (:mod:`providers.usage`), once its runtime has ended:
    the provider's CPU and memory of it (``meter`` None: not measured, an adopted run), the
    bytes the hub sent and received, the wall time and phases by the hub's clock. Never fails
    the run."""
    if sampler is not None:
        sampler.stop(wait=False)  # a sample under way overlaps the end reading
    try:
        if meter is not None:
            process = await asyncio.to_thread(meter.finish, handle)
        else:
            process = ProcessUsage(None, None, "CPU and memory not measured (adopted run)")
        if sampler is not None:
            await asyncio.to_thread(sampler.stop)
        history = await blocking(events.read)
        received = [e.get("bytes") for e in history if e.get("type") == "result.collected"]
        bytes_back = next((b for b in received if type(b) is int), None)
        record = usage_record(
            wall_from_events(history),
            process,
            bytes_to_environment if meter is not None else None,
            bytes_back,
            phases_from_events(history),
            "wall time, phases and bytes: the hub",
        )
        await blocking(lambda: save_usage(store, run_id, record))
    except (NarrativeError, OSError) as exc:
        log.warning("cannot record the usage of run %s: %s", run_id, exc)
