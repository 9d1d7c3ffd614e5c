"""Work a hub runs off its event loop in lanes: in order within a lane, in parallel across lanes.

The hub's store is driven from one thread (:meth:`gateway.hub.server.Hub.blocking`). What an
environment's provider does (ask whether a process lives, signal it, start a runtime in a pod)
does not touch the store, and can take a network round trip each; on the store thread, fifty
environments' such calls queue behind one another and behind every store write. A lane per
environment (and one per team user, :mod:`gateway.hub.remote_envs`) keeps each environment's
operations in the order they were asked for, as the store thread did, while other environments'
run at the same time on a shared, bounded pool of threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Lanes"]

T = TypeVar("T")

DEFAULT_WORKERS = 32
"""Threads shared by all lanes (a lane holds one while its function runs)."""


class Lanes:
    """Functions run on a thread pool, one at a time per lane key."""

    def __init__(self, workers: int = DEFAULT_WORKERS, name: str = "hub-lane") -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lanes: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        """key → the lane's lock and how many callers hold or wait for it (an idle lane is
        forgotten)."""

    async def run(self, key: str, func: Callable[[], T]) -> T:
        """``func()`` on the pool, after every earlier function of lane ``key`` has finished.

        Cancelling the caller does not end the lane's turn early: a function already running
        on its thread cannot be stopped, so the lane stays taken until it returns (the next
        function of the lane must never run beside it).
        """
        lock, users = self._lanes.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave(key, users)
            raise
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, func)
        except BaseException:
            lock.release()
            self._leave(key, users)
            raise

        def release(_: object) -> None:
            lock.release()
            self._leave(key, users)

        future.add_done_callback(release)
        return await asyncio.shield(future)

    def _leave(self, key: str, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            del self._lanes[key]

    def close(self) -> None:
        """Stop taking work; a function still running is not waited for."""
        self._pool.shutdown(wait=False, cancel_futures=True)
