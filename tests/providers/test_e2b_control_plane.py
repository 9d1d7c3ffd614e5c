"""The e2b provider through the real e2b SDK *outside* debug mode: its control-plane calls
(create with labels, list by owner, kill, pause, connect/resume, timeouts, the sweep) against
the control-plane stand-in (:mod:`tests.providers.e2b_control_standin`), its sandboxes served
by the envd stand-in."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState

from narrative.ids import new_id
from narrative.store import Store
from providers.base import Health
from providers.contract import CHECKS, ContractTarget
from providers.errors import ProviderUnavailable, ResourceGone
from providers.lifecycle import EnvState
from providers.manager import EnvironmentManager
from providers.records import EnvironmentStore
from providers.sweeping import sweep_leaked
from tests.providers.e2b_control_standin import API_KEY, ControlPlaneStandIn
from tests.providers.e2b_support import (  # noqa: F401  (fixtures)
    WORKDIR,
    control_fixture,
    control_server_fixture,
    envd_server_fixture,
    make_provider,
    on_disk,
)

pytestmark = pytest.mark.timeout(60)

OWNER = "owner-test"  # make_provider's


def _labels(owner: str, env: str | None = None) -> dict[str, str]:
    return {"narrative.owner": owner, **({"narrative.env": env} if env else {})}


def test_create_labels_the_sandbox_and_commands_run_in_it(
    control: ControlPlaneStandIn, store: Store
) -> None:
    provider = make_provider(
        store,
        template="my-template",
        timeout=600,
        # the owner and environment labels are the provider's, whatever the config says
        metadata={"team": "blue", "narrative.owner": "someone-else"},
    )
    rid = provider.create()
    sandbox = control.sandboxes[rid]
    assert sandbox.metadata == {
        "team": "blue",
        "narrative.owner": OWNER,
        "narrative.env": provider.context.env_id,
    }
    assert sandbox.template == "my-template"
    assert sandbox.state == "running"
    assert sandbox.end_at - sandbox.started_at == pytest.approx(600)
    assert on_disk(control.envd, WORKDIR, rid).is_dir()  # made through envd, by the sandbox's id
    result = provider.exec(rid, ["sh", "-c", "echo made > f.txt && cat f.txt && pwd"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout.decode().splitlines()
    assert out[0] == "made" and out[1].endswith(WORKDIR)
    assert (on_disk(control.envd, WORKDIR, rid) / "f.txt").read_bytes() == b"made\n"
    assert provider.health(rid) is Health.OK


def test_list_resources_is_exactly_this_owners_over_every_page(
    control: ControlPlaneStandIn, store: Store
) -> None:
    control.page_size = 2  # the SDK asks for no limit: the stand-in's page size applies
    provider = make_provider(store)
    mine = [provider.create() for _ in range(3)]
    # this owner's too, made elsewhere: a paused one, and one whose env label is no env id
    paused = control.add(_labels(OWNER, new_id("environment")))
    paused.state = "paused"
    unlabelled_env = control.add(_labels(OWNER, "not-an-environment-id"))
    # not this owner's: another owner, one whose owner merely starts alike, none at all
    others = [
        control.add(_labels("owner-other", new_id("environment"))),
        control.add(_labels(OWNER + "-2", new_id("environment"))),
        control.add({"narrative.env": new_id("environment")}),
        control.add(),
    ]
    listed = provider.list_resources()
    assert listed == sorted([*mine, paused.id, unlabelled_env.id])
    assert not {o.id for o in others} & set(listed)
    pages = [r for r in control.requests if r == ("GET", "/v2/sandboxes")]
    assert len(pages) == 3, pages  # 5 of this owner's, 2 a page
    assert provider.environment_of(mine[0]) == provider.context.env_id
    assert provider.environment_of(paused.id) == paused.metadata["narrative.env"]
    assert provider.environment_of(unlabelled_env.id) is None
    assert provider.environment_of(others[0].id) is None  # never listed: nothing noted


def test_delete_kills_the_sandbox_and_a_gone_one_is_no_error(
    control: ControlPlaneStandIn, store: Store
) -> None:
    provider = make_provider(store)
    rid = provider.create()
    kept = provider.create()
    handle = provider.spawn(rid, ["sleep", "60"])
    assert provider.alive(rid, handle)
    provider.delete(rid)
    assert rid not in control.sandboxes and kept in control.sandboxes
    assert not control.envd.sandboxes[rid].alive  # the kill reached envd: its processes died
    assert ("DELETE", f"/sandboxes/{rid}") in control.requests
    assert provider.health(rid) is Health.GONE
    assert provider.list_resources() == [kept]
    provider.delete(rid)  # gone already: the API's 404 is no error
    provider.delete("ideadbeefdeadbeefdead")  # never was
    with pytest.raises(ResourceGone):
        provider.reconnect(rid)
    with pytest.raises(ResourceGone):
        provider.start(rid)
    with pytest.raises(ResourceGone):
        provider.stop(rid)
    assert provider.health(kept) is Health.OK


def test_stop_pauses_and_start_resumes_with_processes_frozen_between(
    control: ControlPlaneStandIn, store: Store
) -> None:
    provider = make_provider(store)
    rid = provider.create()
    provider.spawn(rid, ["sh", "-c", "while :; do echo . >> beats; sleep 0.02; done"])
    beats = on_disk(control.envd, f"{WORKDIR}/beats", rid)

    def size_after(seconds: float) -> int:
        time.sleep(seconds)
        return beats.stat().st_size if beats.exists() else 0

    assert size_after(0.2) > 0
    provider.stop(rid)
    assert control.sandboxes[rid].state == "paused"
    frozen = size_after(0.1)
    assert size_after(0.3) == frozen, "a paused sandbox's process ran on"
    assert provider.health(rid) is Health.UNREACHABLE
    assert provider.list_resources() == [rid]  # a paused sandbox is still found (and swept)
    provider.stop(rid)  # paused already: E2B's 409, no error
    provider.start(rid)
    assert control.sandboxes[rid].state == "running"
    assert size_after(0.3) > frozen, "the process did not resume with the sandbox"
    assert provider.health(rid) is Health.OK
    assert provider.exec(rid, ["true"]).exit_code == 0


def test_start_renews_the_timeout_and_an_expired_sandbox_is_gone(
    control: ControlPlaneStandIn, store: Store
) -> None:
    provider = make_provider(store, timeout=100)
    rid = provider.create()
    control.advance(60)
    provider.start(rid)  # connect: ends no earlier than 100 s from now
    assert control.sandboxes[rid].end_at == pytest.approx(control.now() + 100, abs=5)
    control.advance(60)  # 120 s after create: alive only because start renewed it
    assert provider.health(rid) is Health.OK
    control.advance(50)
    assert provider.health(rid) is Health.GONE
    assert provider.list_resources() == []


def test_the_api_key_comes_from_the_named_variable(
    control: ControlPlaneStandIn, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_KEY", "e2b_not_the_key")
    with pytest.raises(ProviderUnavailable):
        make_provider(store).create()
    with pytest.raises(ProviderUnavailable):
        make_provider(store).list_resources()
    assert control.sandboxes == {}
    monkeypatch.delenv("E2B_API_KEY")
    monkeypatch.setenv("TEAM_E2B_KEY", API_KEY)
    provider = make_provider(store, api_key_env="TEAM_E2B_KEY")
    rid = provider.create()
    assert provider.list_resources() == [rid]


def test_sweep_kills_this_owners_leak_and_leaves_the_rest(
    control: ControlPlaneStandIn, store: Store
) -> None:
    """What ``narrative env sweep`` does (:meth:`EnvironmentManager.sweep`)."""
    records = EnvironmentStore(store)
    leaked = make_provider(store).create()  # made, never recorded: a crash mid-create
    paused_leak = control.add(_labels(OWNER))
    paused_leak.state = "paused"
    foreign = control.add(_labels("owner-other", new_id("environment")))
    unlabelled = control.add()
    assert sweep_leaked(store, OWNER, records, ["e2b"]) == sorted([leaked, paused_leak.id])
    assert set(control.sandboxes) == {foreign.id, unlabelled.id}
    assert sweep_leaked(store, OWNER, records, ["e2b"]) == []


def test_standin_pages_filters_and_refuses_without_the_key(control: ControlPlaneStandIn) -> None:
    """The stand-in's own fidelity, through the SDK: URL-encoded metadata, state, limit."""
    odd = {"k e&y=": "v/a l&u=e%", "other": "x"}
    matching = [control.add(odd) for _ in range(3)]
    control.add({"k e&y=": "v/a l&u=e"})
    control.add({"other": "x"})
    matching[1].state = "paused"
    paginator = Sandbox.list(query=SandboxQuery(metadata=odd), limit=1)
    pages = []
    while paginator.has_next:
        pages.append([i.sandbox_id for i in paginator.next_items()])
    assert pages == [[s.id] for s in matching]
    running = Sandbox.list(query=SandboxQuery(metadata=odd, state=[SandboxState.PAUSED]))
    assert [i.sandbox_id for i in running.next_items()] == [matching[1].id]
    assert not running.has_next
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{control.url}/v2/sandboxes", timeout=5)
    refused.value.close()
    assert refused.value.code == 401
    missing = urllib.request.Request(
        f"{control.url}/sandboxes/nope/pause", method="POST", headers={"X-API-KEY": API_KEY}
    )
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(missing, timeout=5)
    unknown.value.close()
    assert unknown.value.code == 404


#: the contract's checks that go through the control plane (the others are the envd's alone,
#: run in debug mode by test_contract.py)
_CONTROL_CHECKS = ["lifecycle", "reconnect", "stop_ends_processes", "delete", "labels_and_sweep"]


@pytest.mark.parametrize("check", _CONTROL_CHECKS)
def test_contract_through_the_control_plane(
    control: ControlPlaneStandIn, check: str, tmp_path: Path
) -> None:
    target = ContractTarget(
        "e2b",
        foreign_handles=("e2b:0:" + "0" * 24,),
        empties_temp=False,  # as in debug mode (contract_targets.py)
        stop_ends_processes=False,  # stop pauses: the stand-in freezes the processes
    )
    CHECKS[check](target, tmp_path)


def test_reconnecting_a_stopped_environment_leaves_its_sandbox_paused(
    control: ControlPlaneStandIn, store: Store
) -> None:
    """A fresh process reattaching (``reconnect_all`` at start-up) must not resume a stopped
    environment: resumed, it runs (billed) and E2B kills it when its timeout passes."""
    manager = EnvironmentManager(store)
    rid = manager.create("paused", "e2b").resource_id
    assert rid is not None
    assert manager.stop("paused").state is EnvState.STOPPED
    assert control.sandboxes[rid].state == "paused"
    EnvironmentManager(Store.open(store.git_dir)).reconnect_all()
    assert control.sandboxes[rid].state == "paused"


def test_health_does_not_extend_the_sandbox_lifetime(
    control: ControlPlaneStandIn, store: Store
) -> None:
    """A fresh process's check (no handle cached) attaches to probe envd, for no longer than
    the sandbox has left: attaching with the configured timeout moved its end by the time
    since it was made, and a check every minute kept it alive for ever."""
    rid = make_provider(store, timeout=100).create()
    end = control.sandboxes[rid].end_at
    time.sleep(0.3)  # real time (the provider reads its own clock), not the stand-in's skew
    assert make_provider(store, timeout=100).health(rid) is Health.OK
    assert ("POST", f"/v2/sandboxes/{rid}/connect") in control.requests  # envd was probed
    assert control.sandboxes[rid].end_at == end
