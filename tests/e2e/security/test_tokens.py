"""Issue 13, attack 3 ("one key opens everything"): what a run's token is worth to an agent that
steals it, against a real hub, real runtimes (worktree environments) and real WebSocket
connections.

The agent of these runs is the attacker: it reads its runtime's token from
``/proc/<runtime>/environ`` (same uid) and the hub's address from the runtime's command line,
connects to the hub as its runtime, and tries to read what is not its run's input, write what
is not its result, reach another run, and keep using the token after its run ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from gateway.client import GatewayClient
from gateway.errors import AuthError
from gateway.hub.client import follow_runs
from gateway.hub.events import RunEventLog
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub, control_token, key_path
from gateway.node import Gateway
from gateway.plugins import RemoteExecutionPlugin
from gateway.protocol import Hello, Welcome, dump, parse_message
from gateway.tokens import TokenSigner, load_or_create_key
from gateway.unix import unix_url
from narrative.hierarchy import create_objective, create_thread, get_run
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.manager import EnvironmentManager
from providers.records import HUB_SOCKET, hub_socket_dir
from tests.conftest import Cli
from tests.gateway.hub.hub_support import counting_agent, file, output, types, until

pytestmark = pytest.mark.timeout(180) if hasattr(pytest.mark, "timeout") else []

#: The attacker: steals its runtime's token, then makes the calls listed in $ATTACK
#: (``[name, kind, action, payload, target]``; ``$THREAD`` stands for its run's thread) and
#: writes each outcome to attack.json, which comes home in its result.
THIEF = textwrap.dedent(
    """
    import asyncio, json, os
    from gateway.client import GatewayClient

    runtime = os.getppid()
    with open(f"/proc/{runtime}/environ", "rb") as f:
        env = dict(e.split(b"=", 1) for e in f.read().split(b"\\0") if b"=" in e)
    with open(f"/proc/{runtime}/cmdline", "rb") as f:
        argv = f.read().split(b"\\0")
    token = env[b"NARRATIVE_TOKEN"].decode()
    url = argv[argv.index(b"--connect") + 1].decode()
    attack = json.loads(os.environ["ATTACK"].replace("$THREAD", os.environ["NARRATIVE_THREAD"]))

    async def main():
        out = {}
        async with GatewayClient(url, token) as hub:
            for name, kind, action, payload, target in attack:
                try:
                    result = await hub.call(kind, action, payload, target=target, timeout=30)
                    out[name] = {"ok": True, "result": str(result)[:300]}
                except Exception as exc:
                    out[name] = {"ok": False, "code": getattr(exc, "code", None), "error": str(exc)}
        with open("attack.json", "w") as f:
            json.dump(out, f)

    asyncio.run(main())
    """
)

#: The attacker writing home: it snapshots its checkout onto every thread its environment's
#: store holds besides its own (the user's thread among them), hoping the hub takes them in.
PLANTER = textwrap.dedent(
    """
    import os
    from narrative.snapshot import take_snapshot
    from narrative.store import Store

    store = Store.open(store_dir=os.environ["NARRATIVE_STORE"])
    with open("planted.txt", "w") as f:
        f.write("planted by the agent\\n")
    for thread in sorted(store.thread_heads()):
        if thread != os.environ["NARRATIVE_THREAD"]:
            take_snapshot(store, thread, message="planted")
    """
)


#: A run nesting work: it creates a thread of its own (as a nested run's would be) in its
#: environment's store and snapshots onto it; that thread comes home with its result.
NESTER = textwrap.dedent(
    """
    import os
    from narrative.hierarchy import create_thread, get_thread
    from narrative.snapshot import take_snapshot
    from narrative.store import Store

    store = Store.open(store_dir=os.environ["NARRATIVE_STORE"])
    own = get_thread(store, os.environ["NARRATIVE_THREAD"])
    nested = create_thread(store, own.objective_id, "nested", forked_from=own.forked_from)
    with open("nested.txt", "w") as f:
        f.write("work of the nested run\\n")
    take_snapshot(store, nested.id, message="nested work")
    with open("nested-thread.txt", "w") as f:
        f.write(nested.id)
    """
)


def runtime_url(store: Store, environment: str) -> str:
    """The address a hub hands the runtime of a directory environment: its unix socket."""
    env_id = EnvironmentManager(store).get(environment).id
    return unix_url(os.path.join(hub_socket_dir(env_id, create=False), HUB_SOCKET))


def runtime_token(hub_url: str) -> str:
    """The token in the environment of the runtime connected to ``hub_url`` (what an agent of
    the same uid reads from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"runtime" not in argv or hub_url.encode() not in argv:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"NARRATIVE_TOKEN" in env:
            return env[b"NARRATIVE_TOKEN"].decode()
    raise AssertionError(f"no runtime of {hub_url} found")


async def dial(url: str, token: str, environment: str) -> ClientConnection:
    """A raw WebSocket connection to a gateway, past hello/welcome."""
    ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None)
    await ws.send(dump(Hello(environmentId=environment, runtimeId="rt-probe", capabilities=[])))
    assert isinstance(parse_message(await ws.recv()), Welcome)
    return ws


async def refused(url: str, token: str, environment: str) -> str:
    """The HTTP 401 body a connection with ``token`` gets (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as caught:
        ws = await dial(url, token, environment)
        await ws.close()
    assert caught.value.response.status_code == 401
    return caught.value.response.body.decode()


async def closed_by_server(ws: ClientConnection, within: float) -> str:
    """The close reason of ``ws`` once the server closes it (fails if it does not in time)."""
    await asyncio.wait_for(ws.wait_closed(), within)
    assert ws.close_code == 1008, (ws.close_code, ws.close_reason)
    return str(ws.close_reason)


@pytest.fixture
def secrets_elsewhere(store: Store, workspace: Path) -> dict[str, str]:
    """The user's store: a secret on a thread of another objective, then the thread the runs
    fork from. Returns their ids."""
    (workspace / "secret.txt").write_text("the user's secret\n")
    objective = create_objective(store, "private")
    private = create_thread(store, objective.id, "private")
    secret = take_snapshot(store, private.id, message="secret").snapshot
    (workspace / "secret.txt").unlink()
    base = take_snapshot(store, None, message="base").snapshot
    for name in ("sandbox", "other"):
        # unsandboxed: the bwrap sandbox keeps the runtime's token from its agent, and these
        # tests are about what the token is worth once stolen (as in Docker, same uid)
        EnvironmentManager(store).create(name, config={"sandbox": "none"})
    return {
        "private_thread": private.id,
        "secret_snapshot": secret.id,
        "base_thread": base.thread,
        "base": base.id,
    }


def test_a_stolen_run_token_reaches_only_the_runs_own_input(
    store: Store, secrets_elsewhere: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    ids = secrets_elsewhere
    caplog.set_level(logging.WARNING, logger="gateway")

    async def main() -> tuple[Any, Any, dict[str, Any]]:
        async with Hub(store) as hub:
            run_b = await hub.submit(RunRequest("other", counting_agent(600, 0.1)))
            await until(lambda: "line-2" in output(RunEventLog(store, run_b.id).read()))
            bundle = "narrative", "prepareBundle"
            attack = [
                ["own_input", *bundle, {"snapshot": ids["base"], "threads": ["$THREAD"]}, None],
                ["other_objective", *bundle, {"threads": [ids["private_thread"]]}, None],
                ["other_snapshot", *bundle, {"snapshot": ids["secret_snapshot"]}, None],
                ["users_thread", *bundle, {"threads": [ids["base_thread"]]}, None],
                ["run_b_thread", *bundle, {"threads": [run_b.thread_id]}, None],
                ["whole_store", *bundle, {"changed": True, "have": []}, None],
                ["write_users_thread", "narrative", "snapshot", {"message": "x"}, "hub"],
                ["act_for_run_b", "runtime", "events", {"since": 0}, "other"],
            ]
            request = RunRequest(
                "sandbox",
                [sys.executable, "-c", THIEF],
                snapshot=ids["base"],
                env={"ATTACK": json.dumps(attack)},
            )
            run_a = await hub.submit(request)
            await follow_runs(store, [run_a], lambda r, e: None)
            final_a = await hub.wait(run_a.id)
            await hub.stop_run(run_b.id, 1.0)
            final_b = await hub.wait(run_b.id)
        outcome = json.loads(file(store, final_a.result_snapshot, "attack.json"))
        return final_a, final_b, outcome

    heads_before = store.thread_heads()
    final_a, final_b, outcome = asyncio.run(main())
    assert final_a.status == "succeeded", types(RunEventLog(store, final_a.id).read())
    assert outcome["own_input"]["ok"], outcome["own_input"]
    for name in (
        "other_objective",
        "other_snapshot",
        "users_thread",
        "run_b_thread",
        "whole_store",
        "write_users_thread",
        "act_for_run_b",
    ):
        assert outcome[name]["ok"] is False, (name, outcome[name])
        assert outcome[name]["code"] == "out_of_scope", (name, outcome[name])
    # nothing the thief tried moved a thread of the user's
    for thread, head in heads_before.items():
        assert store.thread_heads()[thread] == head
    assert final_b.status == "cancelled"
    # each refusal is logged on one line with the run, the environment and the reason; never a
    # token
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) >= 7, refusals
    assert all(f"run {final_a.id}, env sandbox: " in line for line in refusals), refusals
    assert "ng2." not in caplog.text


def test_a_result_cannot_move_an_existing_thread(
    store: Store, secrets_elsewhere: dict[str, str]
) -> None:
    ids = secrets_elsewhere
    users_head = store.thread_heads()[ids["base_thread"]]

    async def main() -> Any:
        async with Hub(store) as hub:
            request = RunRequest("sandbox", [sys.executable, "-c", PLANTER], snapshot=ids["base"])
            run = await hub.submit(request)
            await follow_runs(store, [run], lambda r, e: None)
            return await hub.wait(run.id)

    final = asyncio.run(main())
    history = RunEventLog(store, final.id).read()
    assert store.thread_heads()[ids["base_thread"]] == users_head, "the user's thread moved"
    refusals = [e for e in history if e["type"] == "result.refused"]
    assert refusals and ids["base_thread"] in refusals[0]["reason"], types(history)
    # the run's work still came home, on its own thread
    assert final.result_snapshot is not None
    assert file(store, final.result_snapshot, "planted.txt") == "planted by the agent\n"


def test_threads_a_run_creates_come_home(store: Store, secrets_elsewhere: dict[str, str]) -> None:
    """The other side of the write scope: new threads (its nested runs') are the run's to write.
    The full chain A -> B -> C is tests/providers/test_hub.py::test_chain_a_b_c_*."""
    ids = secrets_elsewhere
    users_head = store.thread_heads()[ids["base_thread"]]

    async def main() -> Any:
        async with Hub(store) as hub:
            request = RunRequest("sandbox", [sys.executable, "-c", NESTER], snapshot=ids["base"])
            run = await hub.submit(request)
            await follow_runs(store, [run], lambda r, e: None)
            return await hub.wait(run.id)

    final = asyncio.run(main())
    history = RunEventLog(store, final.id).read()
    assert final.status == "succeeded" and "result.refused" not in types(history)
    nested = file(store, final.result_snapshot, "nested-thread.txt")
    head = store.thread_heads()[nested]
    assert file(store, head.hex(), "nested.txt") == "work of the nested run\n"
    assert store.thread_heads()[ids["base_thread"]] == users_head


def test_a_run_token_is_void_once_the_run_ends(
    store: Store, secrets_elsewhere: dict[str, str]
) -> None:
    async def main() -> tuple[str, str, str, str]:
        async with Hub(store) as hub:
            run = await hub.submit(RunRequest("sandbox", counting_agent(600, 0.1)))
            await until(lambda: "line-2" in output(RunEventLog(store, run.id).read()))
            stolen = runtime_token(runtime_url(store, "sandbox"))
            # another connection holding a token of the run (not the runtime's own)
            probe = await dial(hub.url, hub.signer.issue(run.id, "probe", 600), "probe")
            await hub.stop_run(run.id, 1.0)
            await hub.wait(run.id)
            reason = await closed_by_server(probe, 10)
            after_stop = await refused(hub.url, stolen, "sandbox")
        async with Hub(store) as restarted:
            after_restart = await refused(restarted.url, stolen, "sandbox")
        return run.id, reason, after_stop, after_restart

    run_id, reason, after_stop, after_restart = asyncio.run(main())
    assert get_run(store, run_id).status == "cancelled"
    assert reason.startswith("token revoked")
    assert f"run {run_id} has ended" in after_stop
    assert f"run {run_id} has ended" in after_restart


def test_a_renewed_runtime_token_voids_the_one_in_its_environment(store: Store) -> None:
    EnvironmentManager(store).create("sandbox")

    async def main() -> tuple[str, str]:
        async with Hub(store, token_ttl=6.0) as hub:
            run = await hub.submit(RunRequest("sandbox", counting_agent(100, 0.1)))
            await until(lambda: "line-1" in output(RunEventLog(store, run.id).read()))
            # what the agent reads from /proc/<runtime>/environ
            stolen = runtime_token(runtime_url(store, "sandbox"))
            claims = hub.signer.verify(stolen)
            while True:  # the hub renews it a third into its life (2 s), well before it expires
                assert time.time() < claims.expires_at - 1, "the stolen token still works"
                try:
                    ws = await dial(hub.url, stolen, "sandbox")
                except InvalidStatus as exc:
                    body = exc.response.body.decode()
                    break
                await ws.close()
                await asyncio.sleep(0.2)
            await hub.stop_run(run.id, 1.0)
            final = await hub.wait(run.id)
            assert final.status == "cancelled"  # the runtime itself carried on with its new token
        return body, claims.token_id

    body, token_id = asyncio.run(main())
    assert "was revoked" in body
    # a hub started later still refuses it
    assert token_id in Hub(store).policy.revoked


@pytest.mark.long  # several seconds: make test stays under ten minutes
def test_an_expired_tokens_connection_is_closed(store: Store) -> None:
    async def main() -> str:
        async with Hub(store) as hub:
            ws = await dial(hub.url, hub.signer.issue("run-x", "probe", 1.5), "probe")
            return await closed_by_server(ws, 10)

    assert asyncio.run(main()) == "token expired"


def test_gateway_and_hub_tokens_do_not_cross(store: Store, cli: Cli) -> None:
    gateway_token = cli.json("gateway", "token", "--run", "run-1", "--env", "laptop")["token"]

    async def main() -> tuple[str, str]:
        async with Hub(store) as hub:
            with pytest.raises(AuthError) as at_hub:
                async with GatewayClient(hub.url, gateway_token):
                    pass
        node = Gateway("gw")
        key = load_or_create_key(key_path(store))  # the same key file serves both
        async with RemoteExecutionPlugin(node, TokenSigner(key), port=0) as plugin:
            async with GatewayClient(plugin.url, gateway_token) as client:  # its own: fine
                assert await client.call("gateway", "echo", {"x": 1}) == {"x": 1}
            with pytest.raises(AuthError) as at_gateway:
                async with GatewayClient(plugin.url, control_token(store, "cli-x")):
                    pass
        await node.close()
        return str(at_hub.value), str(at_gateway.value)

    at_hub, at_gateway = asyncio.run(main())
    assert "a gateway token is not accepted here" in at_hub
    assert "a hub token is not accepted here" in at_gateway
