"""The runtime process a hub spawned in a run's environment, as the provider sees it.

The hub asks the provider whether it is alive, why it does not start (its import check), to
kill it, and for the end of its own output: what a runtime that failed said (a traceback, a bad
command) is there, and with Docker and E2B nowhere on the host until it is copied out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.errors import GatewayError
from narrative.errors import NarrativeError
from providers.errors import ProviderUnavailable, RuntimeBroken
from providers.manager import EnvironmentManager

from .events import RunEventLog
from .narratives import Blocking

__all__ = ["EXIT_GRACE", "RunFailed", "RuntimeProcess"]

log = logging.getLogger(__name__)

LOG_LINES = 20
"""Lines of the runtime's own output recorded when a run fails."""

PROBE_SHARE = 10.0
"""A look at whether the runtime lives is followed by a pause at least this many times as long
as the look took: where each look is a round trip into the environment (a pod or container
exec), fifty runs looking every second would crowd out their own runtimes' start, and a look
that slows down (the engine is loaded) spaces the next ones further apart."""

MAX_PROBE_PAUSE = 15.0
"""Longest pause between two looks (a runtime that died is noticed within about this)."""

EXIT_GRACE = 5.0
"""Seconds a runtime asked to exit has before it is killed."""

_CONNECT_LOOK_PAUSE = 2.0
"""Longest wait between two looks at whether a runtime that has not connected yet still lives,
where a look is cheap (:meth:`RuntimeProcess.pause` stretches it where it is not)."""

_FIRST_LOOK_DELAY = 0.25
"""Longest wait before the first look at whether a runtime asked to exit did."""


class RunFailed(GatewayError):
    """The run cannot go on (the reason is recorded in its event log)."""


class RuntimeProcess:
    """The runtime of run ``run_id`` in ``environment`` (``handle``: the provider's handle of
    the spawned process; None until it is spawned). ``lane`` runs the provider's calls off the
    event loop: the environment's lane of the hub (they write nothing to the store)."""

    def __init__(
        self, manager: EnvironmentManager, lane: Blocking, environment: str, run_id: str
    ) -> None:
        self.manager = manager
        self.blocking = lane
        self.environment = environment
        self.run_id = run_id
        self.handle: str | None = None
        self._probe_seconds = 0.0
        """How long the last look at the runtime took."""

    def pause(self, wanted: float) -> float:
        """Seconds to wait before the next look: ``wanted``, stretched to
        :data:`PROBE_SHARE` times the last look's length (at most :data:`MAX_PROBE_PAUSE`)."""
        return max(wanted, min(PROBE_SHARE * self._probe_seconds, MAX_PROBE_PAUSE))

    async def alive(self) -> bool:
        """Whether the runtime is known to run (an environment that cannot be asked: no)."""
        return await self.liveness() is True

    async def liveness(self) -> bool | None:
        """True: the runtime runs; False: it ended (or was never spawned); None: the
        environment cannot be asked now (its host unreachable: a link down, say), so nobody
        knows."""
        handle = self.handle
        if handle is None:
            return False
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await self.blocking(lambda: self.manager.alive(self.environment, handle))
        except ProviderUnavailable:
            return None
        except NarrativeError:
            return False
        finally:
            self._probe_seconds = loop.time() - started

    async def await_connection(self, connected: asyncio.Event, timeout: float, what: str) -> None:
        """Wait for ``connected``, looking now and then whether the runtime still lives
        (:class:`RunFailed` when it ended first, with its :meth:`diagnosis`, or timed out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.5
        while not connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connected.wait(), self.pause(pause))
            pause = min(pause * 2, _CONNECT_LOOK_PAUSE)
            if connected.is_set():
                return
            if self.handle is not None and await self.liveness() is False:
                raise RunFailed(
                    f"the runtime exited before connecting ({what}){await self.diagnosis()}"
                )
            if loop.time() > deadline:
                raise RunFailed(f"the runtime did not connect within {timeout:g}s ({what})")

    async def diagnosis(self) -> str:
        """Why the environment's runtime does not start (``": ..."``), when its import check
        says (no program, no Python, no package, shadowed modules); else nothing."""

        def check() -> None:
            _record, provider, resource = self.manager.require_active(self.environment)
            provider.check_runtime(resource)

        try:
            await self.blocking(check)
        except RuntimeBroken as exc:
            return f": {exc}"
        except NarrativeError:
            pass
        return ""

    async def kill(self) -> None:
        """Kill the runtime and its agent at once (if it was spawned)."""
        handle = self.handle
        if handle is not None:
            await self.blocking(lambda: self.manager.signal(self.environment, handle, "kill"))

    async def end(self) -> None:
        """Give the runtime :data:`EXIT_GRACE` seconds to exit (it was asked to), then kill
        it; copy its output out of the environment."""
        handle, env = self.handle, self.environment
        if handle is None:
            return
        ended = await self._exited_within(EXIT_GRACE)
        if not ended:
            with contextlib.suppress(NarrativeError):
                await self.blocking(lambda: self.manager.signal(env, handle, "kill"))
                ended = True  # killed: it writes nothing more
        # Docker and e2b keep the runtime's output inside: copy it next to the others'.
        try:
            await self.blocking(lambda: self.manager.logs.sync_runtime(env, handle, ended=ended))
        except (NarrativeError, OSError) as exc:
            log.info("cannot copy the runtime log of %s: %s", self.run_id, exc)

    async def _exited_within(self, seconds: float) -> bool:
        """Whether the runtime ends within ``seconds``: waited for in its environment where
        the provider can, else looked at more rarely as time goes."""
        handle = self.handle
        if handle is not None:
            try:
                ended = await self.blocking(
                    lambda: self.manager.await_end(self.environment, handle, seconds)
                )
            except NarrativeError:
                ended = None
            if ended is not None:
                return ended
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + seconds, 0.05
        # a process asked to exit takes a moment: where a look is slow, do not spend one at once
        await asyncio.sleep(min(self.pause(0.0), _FIRST_LOOK_DELAY))
        while await self.alive():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.pause(pause), left))
            pause = min(pause * 2, 1.0)
        return True

    async def record_log_tail(self, events: RunEventLog) -> None:
        """Put the end of the runtime's own output into the run's event log."""
        handle, env = self.handle, self.environment
        if handle is None:
            return
        try:
            lines = await self.blocking(
                lambda: self.manager.logs.runtime_tail(env, handle, LOG_LINES)
            )
        except (NarrativeError, OSError) as exc:
            log.info("cannot read the runtime log of %s: %s", self.run_id, exc)
            return
        if lines:
            events.append("runtime.log", handle=handle, lines=lines)
