"""The ``k8s`` provider: the contract suite (:mod:`providers.contract`) through the official
client against the API server stand-in and test kubelet (:mod:`tests.providers.k8s_standin`),
or a real cluster with ``NARRATIVE_K8S_CONTEXT`` (see :mod:`tests.providers.k8s_support`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from narrative.store import Store
from providers.contract import CHECKS, ContractTarget
from tests.providers.k8s_support import K8S_FOREIGN

pytestmark = [pytest.mark.timeout(300), pytest.mark.long]


@pytest.mark.parametrize("check", CHECKS.values(), ids=list(CHECKS))
def test_contract(
    k8s_config: dict[str, Any], check: Callable[[ContractTarget, Path], None], tmp_path: Path
) -> None:
    check(ContractTarget("k8s", dict(k8s_config), foreign_handles=K8S_FOREIGN), tmp_path)


def test_a_spawned_process_gets_its_token_from_the_secret_never_the_spec_or_a_command_line(
    k8s_config: dict[str, Any], tmp_path: Path
) -> None:
    """The run token reaches the runtime through the environment's Secret (mounted in the pod),
    is gone from the Secret once the process read it, and appears in no pod spec and no exec
    command line the API server saw."""
    from providers.manager import EnvironmentManager
    from tests.providers.k8s_support import STANDIN

    if not STANDIN:
        pytest.skip("inspects the stand-in API server's records")
    server = STANDIN[0]
    token = "tok-" + uuid.uuid4().hex
    (tmp_path / "ws").mkdir()
    manager = EnvironmentManager(Store.init(str(tmp_path / "ws")))
    record = manager.create("secret", "k8s", dict(k8s_config))
    provider, rid = manager.provider(record), str(record.resource_id)
    script = 'printf %s "$NARRATIVE_TOKEN" > got.txt'
    handle = provider.spawn(rid, ["sh", "-c", script], env={"NARRATIVE_TOKEN": token})
    deadline = time.monotonic() + 20
    while provider.alive(rid, handle) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert provider.read_file(rid, "got.txt") == token.encode()
    secret = server.objects[("secrets", "default", f"{rid}-env")]
    assert not secret.get("data"), secret  # taken out once read
    seen = json.dumps([server.created, server.exec_commands])
    assert token not in seen
    pod = server.objects[("pods", "default", rid)]
    assert token not in json.dumps(pod)
    manager.delete("secret")


def test_a_process_stays_alive_while_it_execs(k8s_config: dict[str, Any], tmp_path: Path) -> None:
    """``alive`` is never false for a process that is running but in the middle of an
    ``execve`` (its ``/proc/PID/environ`` reads empty then): a hub would take its runtime for
    one that exited before connecting."""
    from providers.manager import EnvironmentManager

    (tmp_path / "ws").mkdir()
    manager = EnvironmentManager(Store.init(str(tmp_path / "ws")))
    record = manager.create("execs", "k8s", dict(k8s_config))
    provider, rid = manager.provider(record), str(record.resource_id)
    # re-executes itself 3,000 times, then sleeps: one process, always running
    script = 'n=$1; [ "$n" -lt 3000 ] && exec sh -c "$0" "$0" $((n+1)); exec sleep 2'
    handle = provider.spawn(rid, ["sh", "-c", script, script, "0"])
    probes = [provider.alive(rid, handle) for _ in range(40)]
    assert all(probes), probes
    manager.delete("execs")


def test_a_probe_that_fails_is_not_taken_for_a_process_that_ended(
    k8s_config: dict[str, Any], tmp_path: Path
) -> None:
    """When the exec of the liveness probe fails (API server overloaded), ``alive`` says it
    cannot tell (``ProviderUnavailable``: a hub waits) rather than False (a hub fails the run
    with "the runtime exited before connecting")."""
    from providers.errors import ProviderUnavailable
    from providers.manager import EnvironmentManager
    from tests.providers.k8s_support import STANDIN

    if not STANDIN:
        pytest.skip("makes the stand-in API server refuse execs")
    (tmp_path / "ws").mkdir()
    manager = EnvironmentManager(Store.init(str(tmp_path / "ws")))
    record = manager.create("probe", "k8s", dict(k8s_config))
    provider, rid = manager.provider(record), str(record.resource_id)
    handle = provider.spawn(rid, ["sleep", "30"])
    STANDIN[0].exec_fails = True
    try:
        with pytest.raises(ProviderUnavailable):
            provider.alive(rid, handle)
    finally:
        STANDIN[0].exec_fails = False
    assert provider.alive(rid, handle)
    manager.delete("probe")


def test_a_process_that_makes_itself_non_dumpable_stays_alive(
    k8s_config: dict[str, Any], tmp_path: Path
) -> None:
    """The hub's runtime makes itself non-dumpable (its ``/proc/PID/environ`` then belongs to
    root): ``alive`` must still see it run, or the hub fails the run as "exited before
    connecting", and ``signal`` must still reach it."""
    from providers.manager import EnvironmentManager

    (tmp_path / "ws").mkdir()
    manager = EnvironmentManager(Store.init(str(tmp_path / "ws")))
    record = manager.create("private", "k8s", dict(k8s_config))
    provider, rid = manager.provider(record), str(record.resource_id)
    code = "import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); time.sleep(20)"
    handle = provider.spawn(rid, ["python3", "-c", code])
    time.sleep(2)  # python is up and non-dumpable
    assert [provider.alive(rid, handle) for _ in range(5)] == [True] * 5
    provider.signal(rid, handle, "kill")
    deadline = time.monotonic() + 8  # it would sleep on for 18 s
    while provider.alive(rid, handle):
        assert time.monotonic() < deadline, "still alive after a kill"
        time.sleep(0.2)
    manager.delete("private")


def test_the_standin_refuses_what_the_kubernetes_schema_refuses(k8s_config: dict[str, Any]) -> None:
    """The stand-in validates every object created against the schema (its validators are
    built once per kind): a field the schema does not know is a 422, as from a real server
    (sent over plain HTTP: the client would refuse it before sending)."""
    import urllib.error
    import urllib.request

    from kubernetes import config as kconfig

    from tests.providers.k8s_support import STANDIN

    if not STANDIN:
        pytest.skip("a check of the stand-in API server itself")
    api = kconfig.new_client_from_config(config_file=k8s_config["kubeconfig"])
    host = api.configuration.host
    api.close()

    def post(obj: dict[str, Any]) -> int:
        request = urllib.request.Request(
            f"{host}/api/v1/namespaces/default/secrets",
            data=json.dumps(obj).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    name = "schema-" + uuid.uuid4().hex[:8]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
    assert post({**secret, "bogus": 1}) == 422
    assert post({**secret, "metadata": {"name": name, "labels": {"a": 1}}}) == 422
    assert post(secret) == 201
    STANDIN[0].call(STANDIN[0].remove, ("secrets", "default", name))
