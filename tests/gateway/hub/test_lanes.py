"""A hub's lanes: provider work runs in order within an environment and in parallel across
environments, never queued behind the store thread (issue 17: fifty pods' starts and liveness
checks must not wait for one another)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping, Sequence

import pytest

from gateway.hub.lanes import Lanes
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from narrative.store import Store
from providers.manager import EnvironmentManager
from providers.worktree import WorktreeProvider
from tests.providers.fixtures import rendezvous

RENDEZVOUS = 20.0
"""Seconds a function waits for its partner in another lane (serialized lanes never meet)."""


def test_lanes_run_side_by_side() -> None:
    met = threading.Barrier(2, timeout=RENDEZVOUS)

    async def main() -> list[int]:
        lanes = Lanes()
        try:
            return list(await asyncio.gather(lanes.run("a", met.wait), lanes.run("b", met.wait)))
        finally:
            lanes.close()

    assert sorted(asyncio.run(main())) == [0, 1]


def test_a_lane_runs_in_order_even_when_its_caller_is_cancelled() -> None:
    release = threading.Event()
    log: list[str] = []

    def first() -> None:
        log.append("first started")
        release.wait(RENDEZVOUS)
        log.append("first ended")

    def second() -> None:
        log.append("second started")

    async def main() -> None:
        lanes = Lanes()
        try:
            task = asyncio.create_task(lanes.run("env", first))
            while not log:
                await asyncio.sleep(0.01)
            task.cancel()  # the caller goes; the function runs on in its thread
            follower = asyncio.create_task(lanes.run("env", second))
            await asyncio.sleep(0.3)
            assert log == ["first started"]  # the lane is still taken
            release.set()
            await follower
        finally:
            lanes.close()

    asyncio.run(main())
    assert log == ["first started", "first ended", "second started"]


class RendezvousProvider(WorktreeProvider):
    """A worktree whose runtime starts only once another environment's is starting too."""

    resets_without_store = True  # (the test's fresh worktrees hold nothing to save)
    met: threading.Barrier

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        self.met.wait()
        return super().spawn_runtime(resource_id, argv, env=env, log_path=log_path)


@pytest.fixture
def two() -> Iterator[threading.Barrier]:
    with rendezvous("rendezvous", RendezvousProvider, 2) as met:
        yield met


def test_runs_in_two_environments_start_side_by_side(store: Store, two: threading.Barrier) -> None:
    manager = EnvironmentManager(store)
    for name in ("one", "two"):
        manager.create(name, provider="rendezvous", config={"sandbox": "none"})

    async def main() -> list[str]:
        async with Hub(store) as hub:
            runs = [
                await hub.submit(RunRequest(env, ["sh", "-c", "echo ran > ran.txt"]))
                for env in ("one", "two")
            ]
            return [(await hub.wait(run.id)).status for run in runs]

    assert asyncio.run(main()) == ["succeeded", "succeeded"]


def test_a_runtime_is_asked_after_while_the_store_thread_is_busy(store: Store) -> None:
    EnvironmentManager(store).create("wt", provider="worktree", config={"sandbox": "none"})
    release = threading.Event()

    async def main() -> bool | None:
        async with Hub(store) as hub:
            run = await hub.submit(RunRequest("wt", ["sh", "-c", "sleep 2; echo ok > ok.txt"]))
            driver = hub.drivers[run.id]
            while driver.runtime.handle is None:
                await asyncio.sleep(0.05)
            busy = asyncio.ensure_future(hub.blocking(lambda: release.wait(RENDEZVOUS)))
            try:
                return await asyncio.wait_for(driver.runtime.liveness(), RENDEZVOUS / 2)
            finally:
                release.set()
                await busy
                await hub.wait(run.id)

    assert asyncio.run(main()) is True
