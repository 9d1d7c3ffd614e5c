"""Hostile results: everything a run sends home (its runtime's events, the agent's output, the
result bundle) comes from an environment the agent controls. The hub derives the run's status
itself, and caps what it records and takes in, whatever the runtime claims or floods it with.

Runs go through the real ``narrative`` CLI (an embedded hub) or a real :class:`Hub`, with the
worktree provider's runtime connecting back over loopback; a hostile runtime is the real one
with a few methods replaced, started through the environment's ``runtime`` setting. Stock git
checks the user's store afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.hub.agent_output import output_bytes
from gateway.hub.client import follow_runs
from gateway.hub.events import events_path
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from narrative.history import resolve_snapshot
from narrative.store import Store
from tests.conftest import Cli, git, store_dir_of
from tests.gateway.hub.hub_support import events, start, types

pytestmark = pytest.mark.timeout(180) if hasattr(pytest.mark, "timeout") else []

ROOT = str(Path(__file__).resolve().parents[3])

#: The real runtime with a few methods replaced, per mode (``python -I SCRIPT ROOT MODE``).
HOSTILE_RUNTIME = textwrap.dedent(
    """
    import os, runpy, sys
    root, mode = sys.argv.pop(1), sys.argv.pop(1)
    sys.path.insert(0, root)
    from gateway.hub.runtime import Runtime

    honest_event, honest_start = Runtime._event, Runtime._provider_start
    honest_agent_start = Runtime._agent_start

    async def provider_start(self, ctx, payload):
        self.base_snapshot = payload["options"]["snapshot"]
        return await honest_start(self, ctx, payload)

    async def agent_start(self, ctx, payload):
        if mode == "no-timeout":
            payload["options"].pop("timeout", None)
        return await honest_agent_start(self, ctx, payload)

    async def event(self, kind, **fields):
        if mode == "lie" and kind == "agent.exited":
            # a finish the hub never wrote, with the fields readers trust to find its hub
            await honest_event(
                self, "run.finished", status="succeeded", exitCode=0, seq=1,
                hub={"pid": os.getpid(), "url": "ws://127.0.0.1:9"},
            )
            await honest_event(self, "runtime.spawned", handle="forged-handle")
            # success claimed for an exit of 3, with the user's own snapshot as the result
            fields.update(exitCode=False, status="succeeded", resultSnapshot=self.base_snapshot)
        if mode == "flood" and kind == "agent.started":
            for i in range(2000):
                await honest_event(self, "call.routed", call="fs:readFile", pad="x" * 4096)
        await honest_event(self, kind, **fields)

    Runtime._event, Runtime._provider_start = event, provider_start
    Runtime._agent_start = agent_start
    runpy.run_module("cli", run_name="__main__", alter_sys=True)
    """
)


def hostile_env(cli: Cli, tmp_path: Path, name: str, mode: str, *config: str) -> None:
    """Environment ``name`` whose runtime is :data:`HOSTILE_RUNTIME` in ``mode`` (no sandbox:
    the script lives in the test's temporary directory, which the sandbox hides)."""
    script = tmp_path / "hostile_runtime.py"
    script.write_text(HOSTILE_RUNTIME)
    runtime = json.dumps([sys.executable, "-I", str(script), ROOT, mode])
    cli.run(
        "env", "create", name, "--provider", "worktree", "--config", "sandbox=none",
        "--config", f"runtime={runtime}", *(a for c in config for a in ("--config", c)),
    )  # fmt: skip


def fsck(workspace: Path) -> None:
    git("--git-dir", str(store_dir_of(workspace)), "fsck", "--strict", "--no-dangling")


def recorded_output(history: list[dict[str, Any]]) -> bytes:
    return b"".join(output_bytes(e) for e in history if e["type"] == "agent.output")


@pytest.fixture
def ready(cli: Cli) -> Cli:
    cli.run("init")
    return cli


def test_a_runtime_claiming_success_and_forging_the_finish_changes_nothing(
    ready: Cli, workspace: Path, tmp_path: Path
) -> None:
    hostile_env(ready, tmp_path, "liar", "lie")
    proc = ready.run(
        "run", "start", "--env", "liar", "--json", "--",
        "sh", "-c", "echo work > work.txt; exit 3", check=False,
    )  # fmt: skip
    run = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert run["status"] == "failed" and run["exit_code"] is None  # false is no exit code
    history = events(store_dir_of(workspace), run["id"])
    kinds = types(history)
    # the hub's finish is the only one, the last event, and says what the hub decided
    assert kinds.count("run.finished") == 1 and kinds[-1] == "run.finished"
    assert history[-1]["status"] == "failed"
    # forged lifecycle events are recorded as the runtime's claims, not as the hub's own
    assert "runtime.spawned" not in kinds[kinds.index("agent.started") :]
    claims = [e["event"] for e in history if e["type"] == "runtime.event"]
    assert claims == ["run.finished", "runtime.spawned"]
    assert [e["type"] for e in history if "hub" in e] == ["run.created"]
    assert all(e["seq"] == i for i, e in enumerate(history, 1))
    # the result is the run's own work, not the user's snapshot the runtime named
    store = Store.open(str(store_dir_of(workspace)))
    result = resolve_snapshot(store, run["result_snapshot"])
    assert result.thread == run["thread_id"]
    assert "result.refused" in kinds
    assert git("--git-dir", store.git_dir, "show", f"{result.commit}:work.txt") == "work\n"
    fsck(workspace)


def test_a_flood_of_events_is_capped_with_one_marker(
    ready: Cli, workspace: Path, tmp_path: Path
) -> None:
    hostile_env(ready, tmp_path, "flood", "flood", "max_events=50", "max_event_bytes=65536")
    run = start(ready, "--env", "flood", "--", "sh", "-c", "echo done > done.txt")
    assert run["status"] == "succeeded" and run["exit_code"] == 0
    history = events(store_dir_of(workspace), run["id"])
    kinds = types(history)
    assert kinds.count("events.truncated") == 1
    assert kinds.count("call.routed") < 50
    assert kinds[-1] == "run.finished" and "agent.exited" in kinds
    # 2000 events of 4 KiB were sent (8 MiB): the log holds the first 64 KiB of them
    size = os.path.getsize(events_path(Store.open(str(store_dir_of(workspace))), run["id"]))
    assert size < 256 * 1024, size
    fsck(workspace)


def test_huge_output_keeps_its_head_and_notes_the_truncation(ready: Cli, workspace: Path) -> None:
    ready.run("env", "create", "chatty", "--provider", "worktree", "--config",
              "max_output_bytes=1048576")  # fmt: skip
    agent = (  # 48 MiB of numbered lines
        "import sys\n"
        "for i in range(48): sys.stdout.buffer.write(b''.join("
        "b'%07d\\n' % n for n in range(i << 17, (i + 1) << 17)))\n"
    )
    proc = ready.run(
        "run", "start", "--env", "chatty", "--json", "--", sys.executable, "-c", agent
    )  # fmt: skip
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded"
    history = events(store_dir_of(workspace), run["id"])
    # the log holds exactly the first MiB and says it was cut
    assert recorded_output(history) == b"".join(b"%07d\n" % n for n in range(1 << 17))
    assert types(history).count("output.truncated") == 1
    size = os.path.getsize(events_path(Store.open(str(store_dir_of(workspace))), run["id"]))
    assert size < 4 * 1024 * 1024, size
    fsck(workspace)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("os.urandom(3 << 20)", id="bundle-over-the-cap"),
        pytest.param("bytes(40 << 20)", id="inflates-over-the-cap"),
    ],
)
def test_a_result_over_the_cap_is_refused_and_the_store_stays_valid(
    ready: Cli, workspace: Path, content: str
) -> None:
    ready.run("env", "create", "big", "--provider", "worktree", "--config",
              "max_result_bytes=1048576")  # fmt: skip
    agent = f"import os\nopen('big.bin', 'wb').write({content})\n"
    proc = ready.run(
        "run", "start", "--env", "big", "--json", "--", sys.executable, "-c", agent,
        check=False,
    )  # fmt: skip
    run = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert run["status"] == "failed" and run["exit_code"] == 0 and run["result_snapshot"] is None
    history = events(store_dir_of(workspace), run["id"])
    refused = [e["reason"] for e in history if e["type"] == "result.refused"]
    assert len(refused) == 1 and "max_result_bytes" in refused[0]
    assert "result.collected" not in types(history)
    # nothing of it came home: the user's store holds no object of that size
    sizes = git("--git-dir", str(store_dir_of(workspace)), "cat-file", "--batch-all-objects",
                "--batch-check=%(objectsize)")  # fmt: skip
    assert max(int(n) for n in sizes.split()) < 1 << 20
    fsck(workspace)


@pytest.mark.long  # several seconds: make test stays under ten minutes
def test_a_runtime_ignoring_the_timeout_is_stopped_by_the_hub(store: Store, tmp_path: Path) -> None:
    cli = Cli(Path(store.workspace))
    hostile_env(cli, tmp_path, "slow", "no-timeout")
    request = RunRequest("slow", ["sleep", "120"], timeout=1.0)

    async def drive() -> tuple[Any, list[dict[str, Any]]]:
        async with Hub(store, stop_grace=1.0) as hub:
            run = await hub.submit(request)
            seen: list[dict[str, Any]] = []
            await follow_runs(store, [run], lambda _r, e: seen.append(e))
            return await hub.wait(run.id), seen

    final, history = asyncio.run(asyncio.wait_for(drive(), 60))
    kinds = types(history)
    assert final.status == "failed" and final.exit_code == 124
    assert "run.timed_out" in kinds and kinds[-1] == "run.finished"
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
