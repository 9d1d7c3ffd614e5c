"""The hub with an E2B environment: the real e2b SDK against the local envd stand-in starts the
runtime in the sandbox, and the runtime connects back over loopback."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from gateway.hub.events import RunEventLog
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from gateway.hub.usage_records import load_usage
from narrative.models import AgentRun
from narrative.store import Store
from providers.manager import EnvironmentManager
from tests.gateway.hub.hub_support import FAILING_RUNTIME, file, output
from tests.providers.e2b_support import (  # noqa: F401  (fixtures)
    envd_fixture,
    envd_server_fixture,
)
from tests.providers.envd_standin import EnvdStandIn


def test_run_in_an_e2b_sandbox_through_the_hub(store: Store, envd: EnvdStandIn) -> None:
    runtime = [sys.executable, "-m", "cli"]
    EnvironmentManager(store).create("sb", provider="e2b", config={"runtime": runtime})

    async def main() -> tuple[AgentRun, list[dict[str, Any]]]:
        async with Hub(store) as hub:
            run = await hub.submit(
                RunRequest("sb", ["sh", "-c", "echo in-sandbox; cat README.md > copy.md"])
            )
            final = await hub.wait(run.id)
        return final, RunEventLog(store, run.id).read()

    final, history = asyncio.run(main())
    assert final.status == "succeeded", [e["type"] for e in history]
    assert output(history) == "in-sandbox\n"
    assert final.result_snapshot is not None
    assert file(store, final.result_snapshot, "copy.md") == "# demo\n"
    # the hub measured the run's time and transfers; CPU and memory are unknown, never made up
    usage = load_usage(store, final.id)
    assert usage is not None and usage["bytes_to_environment"] > 0, usage
    assert usage["bytes_from_environment"] > 0 and usage["wall_seconds"] > 0
    assert usage["cpu_seconds"] is None and usage["peak_memory_bytes"] is None
    assert usage["measured_by"].startswith("e2b: CPU and memory not measured")


def test_runtime_failing_at_once_in_a_sandbox_shows_its_output(
    store: Store, envd: EnvdStandIn
) -> None:
    """The runtime's output stays in the sandbox: the failed run's events carry its end, and
    the host's runtime.log gets a copy when the runtime is retired (once)."""
    manager = EnvironmentManager(store)
    manager.create("sb", provider="e2b", config={"runtime": FAILING_RUNTIME})

    async def main() -> tuple[AgentRun, list[dict[str, Any]]]:
        async with Hub(store) as hub:
            run = await hub.submit(RunRequest("sb", ["true"]))
            final = await hub.wait(run.id)
        return final, RunEventLog(store, run.id).read()

    final, history = asyncio.run(main())
    assert final.status == "failed"
    logged = [e for e in history if e["type"] == "runtime.log"]
    assert [e["lines"] for e in logged] == [["boom-marker"]]
    with open(manager.logs.runtime_path("sb")) as f:
        copied = f.read()
    assert copied.count("boom-marker") == 1 and logged[0]["handle"] in copied
    assert manager.logs.runtime_lines("sb")[-1:] == ["boom-marker"]
    assert manager.logs.runtime_lines("sb").count("boom-marker") == 1
