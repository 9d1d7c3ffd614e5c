"""What a hub does when a provider misbehaves or lacks an optional piece: a bug in a provider
fails the run with its reason recorded (never an exception lost in a task), and a sandboxed
directory environment without a hub socket has its runtime dial the hub's address."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from gateway.hub.events import RunEventLog
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from narrative.store import Store
from providers.manager import EnvironmentManager
from providers.registry import register, unregister
from providers.worktree import WorktreeProvider
from tests.providers.contract_targets import sandbox_or_skip


class BrokenRuntimeProvider(WorktreeProvider):
    """A worktree whose runtime cannot start because of a bug in the provider."""

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        raise AttributeError("'NoneType' object has no attribute 'pid'")


class SocketlessWorktreeProvider(WorktreeProvider):
    """A worktree without the unix socket: its runtime dials the hub's TCP address."""

    def hub_socket(self, resource_id: str) -> None:
        return None


@pytest.fixture
def providers() -> Iterator[None]:
    """Registered for one test only (left registered, they would sort before worktree)."""
    register("broken-runtime", BrokenRuntimeProvider)
    register("socketless", SocketlessWorktreeProvider)
    yield
    unregister("broken-runtime")
    unregister("socketless")


def _run(store: Store, environment: str) -> tuple[Any, list[dict[str, Any]], list[str]]:
    lost: list[str] = []

    async def main() -> tuple[Any, list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: lost.append(str(context)))
        async with Hub(store) as hub:
            run = await hub.submit(RunRequest(environment, ["sh", "-c", "echo ran > ran.txt"]))
            final = await hub.wait(run.id)
            return final, RunEventLog(store, run.id).read()

    final, events = asyncio.run(main())
    return final, events, lost


def test_a_provider_bug_fails_the_run_and_says_why(store: Store, providers: None) -> None:
    EnvironmentManager(store).create("buggy", provider="broken-runtime", config={"sandbox": "none"})
    final, events, lost = _run(store, "buggy")
    assert final.status == "failed"
    reasons = [e["reason"] for e in events if e["type"] == "run.error"]
    assert reasons and "internal error: AttributeError" in reasons[0], events
    assert lost == []  # nothing escaped the driver's task


def test_a_sandboxed_runtime_without_a_socket_dials_the_hub(store: Store, providers: None) -> None:
    sandbox_or_skip()
    EnvironmentManager(store).create("tcp", provider="socketless")
    final, events, lost = _run(store, "tcp")
    assert final.status == "succeeded", [e for e in events if e["type"] in ("run.error",)]
    spawned = next(e for e in events if e["type"] == "runtime.spawned")
    assert spawned["argv"][-1].startswith("ws://127.0.0.1:")
    assert lost == []
