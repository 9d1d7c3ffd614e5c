"""The daytona provider through the real ``daytona`` SDK against the Daytona stand-in
(:mod:`tests.providers.daytona_standin`, sandboxes as containers on the test engine): HTTP 429
answers waited out as the server asks, auto-stop honoured, the API key kept out of records and
sandboxes, the settings documented, and a whole run through the hub (create, run, result home,
merge). The contract suite runs against daytona in ``test_contract.py``."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from narrative.errors import InvalidInput
from narrative.store import Store
from providers.base import Health, SpawnLog
from providers.daytona_calls import retry_after
from providers.daytona_config import DaytonaConfig
from providers.errors import ProviderUnavailable
from tests.conftest import Cli, git, store_dir_of
from tests.gateway.hub.hub_support import AGENT, ROUTING, file, start
from tests.providers.daytona_support import (  # noqa: F401  (fixtures)
    daytona_fixture,
    daytona_server_fixture,
    make_provider,
    standin_config,
)

# a Daytona stand-in over containers (about a minute in all): make test-long, which CI runs too
pytestmark = [pytest.mark.timeout(240), pytest.mark.long]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "README.md").write_text("# demo\n")
    return Store.init(str(workspace))


def _waits(provider: Any) -> list[float]:
    waits: list[float] = []
    provider.sleep = waits.append
    return waits


# -- HTTP 429 ----------------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 12, 6, 3, 0, 0, tzinfo=UTC)
    assert retry_after({"Retry-After": "7"}) == 7.0
    assert retry_after({"retry-after": " 0.5 "}) == 0.5
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after({"Retry-After": later}, now=now) == 30.0
    assert retry_after({"Retry-After": format_datetime(now, usegmt=True)}, now=now) == 0.0
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None


def test_rate_limited_calls_wait_as_long_as_the_server_asks(daytona: Any, store: Store) -> None:
    provider = make_provider(store, daytona)
    waits = _waits(provider)
    daytona.rate_limit(2, retry_after="3")
    before = daytona.throttled
    resource = provider.create()  # the first two control-plane calls are refused
    assert daytona.throttled - before == 2
    assert waits == [3.0, 3.0]
    assert provider.exec(resource, ["echo", "made"]).stdout == b"made\n"
    provider.delete(resource)


def test_without_a_retry_hint_the_wait_doubles(daytona: Any, store: Store) -> None:
    provider = make_provider(store, daytona)
    waits = _waits(provider)
    daytona.rate_limit(3, retry_after=None)
    resource = provider.create()
    assert waits == [0.5, 1.0, 2.0]
    provider.delete(resource)


def test_a_limit_that_outlasts_rate_limit_wait_fails_as_unavailable(
    daytona: Any, store: Store
) -> None:
    provider = make_provider(store, daytona, rate_limit_wait=5)
    waits = _waits(provider)
    daytona.rate_limit(4, retry_after="2")
    try:
        with pytest.raises(ProviderUnavailable, match="rate limit"):
            provider.create()
        assert waits == [2.0, 2.0]  # a third wait would pass 5 s in all
    finally:
        daytona.clear_rate_limit()  # what the failed call left unused
    assert provider.list_resources() == []  # nothing was created meanwhile


# -- auto-stop ---------------------------------------------------------------------------------


def _wait_for(predicate: Any, what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_auto_stop_is_passed_on_and_a_stopped_sandbox_wakes_on_use(
    daytona: Any, store: Store
) -> None:
    daytona.minute = 1.0  # a Daytona minute lasts a second here
    provider = make_provider(store, daytona, auto_stop_interval=2)
    resource = provider.create()
    try:
        assert daytona.boxes[resource].auto_stop == 2
        provider.write_file(resource, "kept.txt", b"kept while stopped")
        handle = provider.spawn(resource, ["sleep", "60"], log_path="/unused")
        _wait_for(lambda: daytona.state_of(resource) == "stopped", "Daytona's auto-stop")
        assert provider.health(resource) is Health.UNREACHABLE  # stopped, not gone
        # its processes are gone with it; asking about them does not start it again
        assert not provider.alive(resource, handle)
        assert provider.read_spawn_log(resource, handle) == SpawnLog(0, b"")
        provider.signal(resource, handle, "kill")
        assert daytona.state_of(resource) == "stopped"
        # the next command starts it again, with its files
        assert provider.exec(resource, ["cat", "kept.txt"]).stdout == b"kept while stopped"
        assert daytona.state_of(resource) == "started"
        assert provider.health(resource) is Health.OK
    finally:
        provider.delete(resource)


def test_a_runtime_keeps_its_sandbox_awake_and_other_processes_do_not(
    daytona: Any, store: Store
) -> None:
    daytona.minute = 1.0
    # two seconds idle; a runtime's keep-alive every 0.3 s (margin for a loaded machine)
    provider = make_provider(store, daytona, auto_stop_interval=2, keepalive_interval=0.3)
    resource = provider.create()
    try:
        runtime = provider.spawn_runtime(resource, ["sleep", "60"], log_path="/unused")
        time.sleep(4.0)  # nothing asks about it meanwhile: the hub does not while it is connected
        assert daytona.state_of(resource) == "started"
        assert provider.alive(resource, runtime)
        provider.stop(resource)  # someone stops it: the keep-alive must not start it again
        time.sleep(2.0)
        assert daytona.state_of(resource) == "stopped", "the keep-alive woke a stopped sandbox"
        provider.start(resource)
        # a process running on its own is no activity: Daytona stops the sandbox
        provider.spawn(resource, ["sleep", "60"])
        _wait_for(lambda: daytona.state_of(resource) == "stopped", "auto-stop", 10.0)
    finally:
        provider.delete(resource)


def test_asking_whether_a_process_lives_never_wakes_a_stopped_sandbox(
    daytona: Any, store: Store
) -> None:
    """A stop landing between the two requests of ``alive`` (the sandbox's state, then the
    command's): the keep-alive asks this every few seconds, and must not undo the stop."""
    provider = make_provider(store, daytona, auto_stop_interval=0)
    resource = provider.create()
    try:
        handle = provider.spawn(resource, ["sleep", "60"])
        assert provider.alive(resource, handle)
        daytona.stop_at_next_toolbox_call(resource)
        assert not provider.alive(resource, handle)
        assert daytona.state_of(resource) == "stopped", "asking woke the stopped sandbox"
    finally:
        provider.delete(resource)


def test_auto_stop_zero_means_never(daytona: Any, store: Store) -> None:
    daytona.minute = 0.2
    provider = make_provider(store, daytona, auto_stop_interval=0)
    resource = provider.create()
    try:
        time.sleep(1.0)
        assert daytona.state_of(resource) == "started"
    finally:
        provider.delete(resource)


# -- credentials -------------------------------------------------------------------------------


def test_the_api_key_never_reaches_a_record_or_the_sandbox(
    daytona: Any, cli: Cli, workspace: Path
) -> None:
    from tests.providers.daytona_standin import API_KEY

    cli.run("init")
    config = standin_config(daytona)
    args = [a for k, v in config.items() for a in ("--config", f"{k}={_value(v)}")]
    created = cli.json("env", "create", "box", "--provider", "daytona", *args)
    resource = created["resource_id"]
    try:
        assert not any(API_KEY in var for var in daytona.container_env(resource))
        printenv = cli.run("env", "exec", "box", "--", "env").stdout
        assert API_KEY not in printenv
        for path in store_dir_of(workspace).rglob("*"):
            if path.is_file():
                assert API_KEY.encode() not in path.read_bytes(), path
    finally:
        cli.run("env", "delete", "box", check=False)


def test_a_missing_or_wrong_key_is_one_clear_error(
    daytona: Any, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAYTONA_API_KEY")
    with pytest.raises(ProviderUnavailable, match="set the variable DAYTONA_API_KEY"):
        make_provider(store, daytona).create()
    monkeypatch.setenv("OTHER_KEY", "not-the-stand-in-key")
    with pytest.raises(ProviderUnavailable, match="refused the API key"):
        make_provider(store, daytona, api_key_env="OTHER_KEY").create()


def test_config_refuses_a_key_in_place_of_its_variable_and_credential_uploads() -> None:
    with pytest.raises(ValueError, match="api_key_env"):
        DaytonaConfig(api_key_env="dtn-0123456789abcdef")
    with pytest.raises((ValueError, InvalidInput)):
        DaytonaConfig(upload=[".env"])
    with pytest.raises(ValueError, match="not both"):
        DaytonaConfig(snapshot="s", image="i")


def test_a_refused_upload_creates_no_sandbox(daytona: Any, store: Store) -> None:
    workspace = Path(store.workspace)
    (workspace / "proxyExecution.json").write_text('{"apiKey": "literal-secret-value"}')
    provider = make_provider(store, daytona, upload=["proxyExecution.json"])
    before = set(daytona.boxes)
    with pytest.raises(InvalidInput, match="credential"):
        provider.create()
    assert set(daytona.boxes) == before
    with pytest.raises(InvalidInput, match="does not exist"):
        make_provider(store, daytona, upload=["missing.json"]).create()
    assert set(daytona.boxes) == before


def test_env_create_help_documents_every_setting(cli: Cli) -> None:
    shown = cli.run("env", "create", "--provider", "daytona", "--help").stdout
    for name in DaytonaConfig.model_fields:
        if name != "type":
            assert name in shown, name


# -- a whole run -------------------------------------------------------------------------------


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.long
def test_a_run_longer_than_auto_stop_is_kept_awake(daytona: Any, cli: Cli, workspace: Path) -> None:
    """Its runtime talks only to the hub, which Daytona does not count as activity."""
    daytona.minute = 1.0  # auto-stop after two idle seconds
    cli.run("init")
    config = standin_config(daytona, auto_stop_interval=2, keepalive_interval=0.3)
    args = [a for k, v in config.items() for a in ("--config", f"{k}={_value(v)}")]
    cli.run("env", "create", "box", "--provider", "daytona", *args)
    try:
        run = start(cli, "--env", "box", "--", "sh", "-c", "sleep 6; echo slept > slept.txt")
        assert run["status"] == "succeeded", run
        cli.run("merge", run["id"])
        assert (workspace / "slept.txt").read_text() == "slept\n"
    finally:
        cli.run("env", "delete", "box", check=False)


@pytest.mark.long
def test_a_run_in_a_daytona_sandbox_comes_home_and_merges(
    daytona: Any, cli: Cli, workspace: Path
) -> None:
    cli.run("init")
    config = standin_config(daytona)
    args = [a for k, v in config.items() for a in ("--config", f"{k}={_value(v)}")]
    cli.run("env", "create", "box", "--provider", "daytona", *args)
    (workspace / "agent.py").write_text(AGENT)
    (workspace / "proxyExecution.json").write_text(json.dumps(ROUTING))
    cli.run("snapshot", "-m", "agent")
    try:
        run = start(cli, "--env", "box", "--", "python3", "agent.py")
        assert run["status"] == "succeeded", run
        store = Store.open(str(store_dir_of(workspace)))
        result = json.loads(file(store, run["result_snapshot"], "agent-result.json"))
        assert result["readme"] == "# demo\n"  # read through the hub from the user's files
        assert result["exec"]["stdout"].split("\n")[1] == "/home/daytona/workspace"
        # the run's token went to the runtime in a file it read and removed, never on a
        # command line the daemon keeps
        lines = daytona.command_lines
        assert any("runtime --connect" in line for line in lines), lines
        assert not any("NARRATIVE_TOKEN" in line for line in lines)
        left = cli.run("env", "exec", "box", "--", "ls", "-A", "../.narrative-staging").stdout
        assert "env-" not in left, left
        cli.run("merge", run["id"])
        assert (workspace / "progress.txt").read_text() == "half way\n"
        assert json.loads((workspace / "agent-result.json").read_text())["readme"] == "# demo\n"
        git("fsck", "--strict", cwd=store_dir_of(workspace))
    finally:
        cli.run("env", "delete", "box", check=False)
