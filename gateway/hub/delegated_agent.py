"""The agent of a runtime whose environment is another hub's (the ``remote`` provider).

Instead of starting the command, the runtime hands it to that hub as a run of its own, with
the login the environment names (:mod:`gateway.hub.team_client`): the base the runtime restored
is pushed there (that one snapshot only), the remote run's output becomes this agent's output
as it arrives, and when it ends its result is brought home into the runtime's store (held to
the remote run's own thread) and written into the workspace. The runtime then snapshots the
workspace onto its run's thread, as after any agent, so the hub above sees an ordinary result.

A stop (or the runtime's timeout) stops the remote run with the same grace and still brings
its result home. The remote run's id is kept in the runtime's store, so that killing the
runtime can kill the remote run too (:meth:`gateway.hub.remote_provider.RemoteProvider.signal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

from narrative.errors import NarrativeError
from narrative.fsutil import write_atomic
from narrative.history import resolve_snapshot
from narrative.models import AgentRun, Snapshot
from narrative.restore import restore_workspace
from narrative.store import Store

from .agent_output import output_bytes
from .team_client import TeamSession, bring_home, open_session, run_events, serve_bases

__all__ = ["DELEGATED_RUN_FILE", "DelegatedAgent", "delegated_run_path"]

log = logging.getLogger(__name__)

OutputSink = Callable[[str, bytes], Awaitable[None]]
DELEGATED_RUN_FILE = "delegated-run"
_EXIT_CODES = {"succeeded": 0, "cancelled": 143, "killed": 137}


def delegated_run_path(store_dir: str) -> str:
    """Where the runtime of store ``store_dir`` keeps the id of the run it delegated."""
    return os.path.join(store_dir, "narrative", DELEGATED_RUN_FILE)


class DelegatedAgent:
    """An agent command running as a run on another hub (see the module)."""

    pid = 0  # no process here

    def __init__(self, task: asyncio.Task[int], state: _Delegation) -> None:
        self._task = task
        self._state = state
        self.stopping: str | None = None
        """Why the agent is being stopped (``"stop"``, ``"timeout"``), or None."""

    @property
    def returncode(self) -> int | None:
        """The exit code once the remote run ended and its result is home."""
        if not self._task.done():
            return None
        return -9 if self._task.cancelled() else self._task.result()

    @classmethod
    async def start(
        cls,
        login: str,
        environment: str,
        store: Store,
        base: Snapshot,
        argv: Sequence[str],
        env: Mapping[str, str],
        timeout: float | None,
        sink: OutputSink,
    ) -> DelegatedAgent:
        """Start delegating ``argv`` (its extra variables ``env``) to ``environment`` on the
        hub of ``login``, from ``base`` in ``store``."""
        state = _Delegation(login, environment, store, base, list(argv), dict(env), sink)
        task = asyncio.get_running_loop().create_task(state.run(timeout))
        return cls(task, state)

    async def wait(self) -> int:
        """Wait until the remote run ended and its result is in the workspace; its exit code."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)
        code = self.returncode
        return code if code is not None else 1

    async def stop(self, grace: float, reason: str = "stop") -> int:
        """Stop the remote run (SIGTERM there, SIGKILL after ``grace``); its exit code."""
        self.stopping = self.stopping or reason
        if not self._task.done() and not await self._state.stop(grace):
            self._task.cancel()  # nothing started there yet
        return await self.wait()


class _Delegation:
    """The work of one delegated agent: start the remote run, follow it, bring it home."""

    def __init__(
        self,
        login: str,
        environment: str,
        store: Store,
        base: Snapshot,
        argv: list[str],
        env: dict[str, str],
        sink: OutputSink,
    ) -> None:
        self.login = login
        self.environment = environment
        self.store = store
        self.base = base
        self.argv = argv
        self.env = env
        self.sink = sink
        self.session: TeamSession | None = None
        self.run_id: str | None = None

    async def stop(self, grace: float) -> bool:
        """Ask the remote hub to stop the run; False when none has started yet."""
        if self.session is None or self.run_id is None:
            return False
        try:
            await self.session.call("runStop", {"run": self.run_id, "grace": grace})
        except NarrativeError as exc:  # it may have ended meanwhile
            log.info("stopping the delegated run %s: %s", self.run_id, exc)
        return True

    async def run(self, timeout: float | None) -> int:
        try:
            async with open_session(self.login) as session:
                self.session = session
                return await self._delegate(session, timeout)
        except Exception as exc:  # the remote side is hostile input: report whatever it caused
            log.warning("the delegated run failed", exc_info=exc)
            await self.sink("stderr", f"narrative: the remote run failed: {exc}\n".encode())
            return 1
        finally:
            self.session = None

    async def _delegate(self, session: TeamSession, timeout: float | None) -> int:
        store, base = self.store, self.base
        serve_bases(session, store, {base.id: base.thread})
        request = {
            "environment": self.environment,
            "argv": self.argv,
            "env": self.env,
            "timeout": timeout,
            "snapshot": base.id,
            "thread": base.thread,
        }
        started = AgentRun.from_dict(await session.call("runStart", request))
        self.run_id = started.id
        path = delegated_run_path(store.git_dir)
        await asyncio.to_thread(write_atomic, path, started.id.encode())
        await self._follow(session, started.id)
        final = await bring_home(session, store, started)
        if final.result_snapshot:
            result = await asyncio.to_thread(resolve_snapshot, store, final.result_snapshot)
            if result.tree != base.tree:

                def write_result() -> None:
                    restore_workspace(store, result, store.config.default_thread)

                await asyncio.to_thread(write_result)
        if final.exit_code is not None:
            return final.exit_code
        await self.sink("stderr", f"narrative: remote run {final.id} {final.status}\n".encode())
        return _EXIT_CODES.get(final.status, 1)

    async def _follow(self, session: TeamSession, run_id: str) -> None:
        """Pass the remote run's output on until it finished."""
        async for event in run_events(session, run_id):
            if event["type"] == "agent.output":
                await self.sink(str(event.get("stream", "stdout")), output_bytes(event))
