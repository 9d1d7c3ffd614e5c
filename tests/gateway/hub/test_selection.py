"""Environments for runs through the hub: leases (one run per environment, across every hub
of a store) and selection (reuse an idle environment, start a stopped one, create one)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.hub.leases import EnvironmentLease
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from narrative.hierarchy import list_runs
from narrative.store import Store
from providers.errors import NoProviderAvailable
from providers.manager import EnvironmentManager
from tests.conftest import NARRATIVE, Cli, store_dir_of, tree_bytes
from tests.gateway.hub.hub_support import events, types, wait_for_output


def _selected(store_dir: Path, run_id: str) -> tuple[str, str]:
    found = [e for e in events(store_dir, run_id) if e["type"] == "environment.selected"]
    assert len(found) == 1, types(events(store_dir, run_id))
    return found[0]["environment"], found[0]["how"]


def test_a_lease_is_exclusive_until_released_or_its_holder_dies(store: Store) -> None:
    first = EnvironmentLease.acquire(store, "env-x")
    assert first is not None
    first.note("run-1")
    assert EnvironmentLease.acquire(store, "env-x") is None  # even within one process
    assert EnvironmentLease.holder(store, "env-x") == "run-1"
    first.release()
    first.release()  # idempotent
    assert EnvironmentLease.holder(store, "env-x") is None
    # a holder killed with -9 leaves nothing claimed
    script = (
        "import sys, time\n"
        "from narrative.store import Store\n"
        "from gateway.hub.leases import EnvironmentLease\n"
        "lease = EnvironmentLease.acquire(Store.open(sys.argv[1]), 'env-x')\n"
        "print('held' if lease else 'busy', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, store.git_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert EnvironmentLease.acquire(store, "env-x") is None
    finally:
        child.kill()
        child.communicate()
    again = EnvironmentLease.acquire(store, "env-x")
    assert again is not None
    again.release()


def test_the_hub_creates_reuses_and_starts_environments(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    store_dir = store_dir_of(workspace)
    first = json.loads(cli.run("run", "start", "--json", "--", "sh", "-c", "echo a > a.txt").stdout)
    assert first["status"] == "succeeded"
    assert _selected(store_dir, first["id"]) == ("auto-worktree-1", "created")
    second = json.loads(cli.run("run", "start", "--json", "--", "cat", "a.txt", check=False).stdout)
    assert _selected(store_dir, second["id"]) == ("auto-worktree-1", "reused")
    assert second["status"] == "failed"  # each run starts from the workspace, not from the last
    cli.run("env", "stop", "auto-worktree-1")
    third = json.loads(cli.run("run", "start", "--json", "--", "true").stdout)
    assert _selected(store_dir, third["id"]) == ("auto-worktree-1", "started")
    assert [e["name"] for e in cli.items("env", "list")] == ["auto-worktree-1"]
    # only environments with the capabilities are candidates
    assert cli.json("env", "show", "auto-worktree-1")["capabilities"]


def test_a_busy_environment_makes_the_hub_create_another(store: Store) -> None:
    async def scenario() -> tuple[str, str, list[str]]:
        async with Hub(store) as hub:
            slow = await hub.submit(RunRequest(None, ["sh", "-c", "echo started; sleep 2"]))
            await asyncio.to_thread(wait_for_output, Path(store.workspace), "started")
            quick = await hub.submit(RunRequest(None, ["true"]))
            done = [(await hub.wait(r.id)).status for r in (slow, quick)]
            return slow.environment, quick.environment, done

    slow_env, quick_env, statuses = asyncio.run(scenario())
    assert (slow_env, quick_env) == ("auto-worktree-1", "auto-worktree-2")
    assert statuses == ["succeeded", "succeeded"]


@pytest.mark.long  # several seconds: make test stays under ten minutes
def test_a_run_in_a_busy_environment_is_refused_across_processes(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    cli.run("env", "create", "sandbox", "--provider", "worktree")
    long = subprocess.Popen(
        [NARRATIVE, "run", "start", "--env", "sandbox", "--json", "--",
         "sh", "-c", "echo started; sleep 3"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        holder = wait_for_output(workspace, "started")
        store = Store.open(str(store_dir_of(workspace)))
        runs_before = {r.id for r in list_runs(store)}
        before = tree_bytes(store_dir_of(workspace))
        refused = cli.run("run", "start", "--env", "sandbox", "--", "true", check=False)
        assert refused.returncode != 0
        assert f"environment 'sandbox' is busy with run {holder}" in refused.stderr
        assert {r.id for r in list_runs(store)} == runs_before  # nothing recorded
        after = tree_bytes(store_dir_of(workspace))
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        # only the running run's own files (its event log, the runtime's workspace) moved
        assert all(holder in k or "/envs/" in k or "worktrees/" in k for k in changed), changed
    finally:
        out, err = long.communicate(timeout=60)
    assert long.returncode == 0, err
    assert json.loads(out)["status"] == "succeeded"
    # the lease went with the run: the environment takes the next one
    assert json.loads(cli.run("run", "start", "--env", "sandbox", "--json", "--", "true").stdout)


def test_selection_refuses_missing_capabilities_and_changes_nothing(
    cli: Cli, workspace: Path
) -> None:
    cli.run("init")
    cli.run("gateway", "token", "--run", "r", "--env", "probe")  # the store's key exists now
    before = tree_bytes(store_dir_of(workspace))
    refused = cli.run("run", "start", "--require", "gpu", "--", "true", check=False)
    assert refused.returncode != 0 and "no provider offers gpu" in refused.stderr
    assert tree_bytes(store_dir_of(workspace)) == before
    both = cli.run("run", "start", "--env", "x", "--require", "gpu", "--", "true", check=False)
    assert both.returncode == 2 and "not with --env" in both.stderr


def test_select_environment_skips_leased_and_incapable_ones(store: Store) -> None:
    from gateway.hub.selection import select_environment

    manager = EnvironmentManager(store)
    manager.create("plain", provider="worktree")
    first = select_environment(manager)
    assert (first.record.name, first.how) == ("plain", "reused")
    second = select_environment(manager)  # plain is leased
    assert (second.record.name, second.how) == ("auto-worktree-1", "created")
    first.lease.release()
    second.lease.release()
    third = select_environment(manager)  # the oldest idle one again
    assert (third.record.name, third.how) == ("plain", "reused")
    third.lease.release()
    lacking = next(c for c in ("gpu", "docker") if c not in third.record.capabilities)
    with pytest.raises(NoProviderAvailable):
        select_environment(manager, [lacking, "no-such-capability"])
    assert [r.name for r in manager.environments()] == ["plain", "auto-worktree-1"]
