"""A shared team hub, end to end: a real ``narrative serve`` on loopback, its owner's CLI on the
hub's machine, and two developers' CLIs, each with its own HOME and config directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import AccessDenied, AuthError, OutOfScope
from gateway.hub.server import Hub
from gateway.hub.team import team_bearer
from gateway.hub.team_client import dial, login, open_session
from gateway.tokens import CLOCK_SKEW_TOLERANCE
from narrative.store import Store
from tests.conftest import NARRATIVE, Cli, store_dir_of
from tests.gateway.hub.hub_support import ROUTING, serve

# several served hubs and developers' CLIs (~35 s): make test-long, which CI runs too, so that
# make test stays under ten minutes; tests/multihost/test_team_hosts.py runs the same between hosts
pytestmark = pytest.mark.long


class Developer:
    """A developer's machine: a home (config directory) and a workspace, and their CLI."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.home = root / f"home-{name}"
        self.workspace = root / f"ws-{name}"
        self.workspace.mkdir(parents=True)
        (self.workspace / "notes.txt").write_text(f"{name}'s notes\n")
        self.env = {
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
        }
        self.cli = Cli(self.workspace)

    @property
    def hubs_file(self) -> Path:
        return self.home / ".config" / "narrative" / "hubs.json"

    def run(self, *args: str, check: bool = True) -> Any:
        return self.cli.run(*args, env=self.env, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)


@pytest.fixture
def owner(cli: Cli) -> Cli:
    cli.run("init")
    return cli


def invite(owner: Cli, user: str, *args: str) -> str:
    return str(owner.json("hub", "invite", user, *args)["code"])


def test_invite_login_logout_revoke_and_audit(owner: Cli, workspace: Path, tmp_path: Path) -> None:
    alice, bob = Developer(tmp_path, "alice"), Developer(tmp_path, "bob")
    with serve(owner, workspace) as info:
        url = info["url"]
        code = invite(owner, "alice")
        login = alice.json("hub", "login", url, code, "--name", "team")
        assert login["kind"] == "hub_login"
        assert (login["user"], login["role"]) == ("alice", "member")
        # the credential is kept for alice alone
        assert stat.S_IMODE(alice.hubs_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(alice.hubs_file.parent.stat().st_mode) == 0o700
        record = json.loads(alice.hubs_file.read_text())["team"]
        assert record["user"] == "alice" and record["credential"].startswith("ncred_")
        # the hub keeps only its hash
        stored = _team_file(workspace, "users.json")
        assert record["credential"].split("_", 2)[2] not in stored.read_text()
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700

        # the code was good once
        again = bob.run("hub", "login", url, code, check=False)
        assert again.returncode == 1
        assert "already used" in again.stderr and "Traceback" not in again.stderr
        # an expired invite is refused
        short = invite(owner, "bob", "--ttl", "1")
        time.sleep(1.2)
        late = bob.run("hub", "login", url, short, check=False)
        assert late.returncode == 1 and "expired" in late.stderr
        # a made-up code is refused
        forged = bob.run("hub", "login", url, short[:-4] + "abcd", check=False)
        assert forged.returncode == 1 and "unknown invite code" in forged.stderr

        bob.run("hub", "login", url, invite(owner, "bob", "--role", "admin"))
        bob_credential = json.loads(bob.hubs_file.read_text())["default"]["credential"]
        users = {u["name"]: u for u in owner.json("hub", "users")["items"]}
        assert users["bob"]["role"] == "admin" and users["alice"]["revoked"] is None

        # bob has a session open when he is revoked: it is closed, his credential refused
        async def revoked_while_connected() -> tuple[str, str]:
            async with dial(url, team_bearer("credential", bob_credential)) as client:
                session = await client.call("team", "session", {}, target=info["environment"])
            async with dial(url, session["token"]) as client:
                closed = asyncio.get_running_loop().create_future()
                client.gateway.add_peer_listener(
                    lambda peer, up: closed.done() or up or closed.set_result(peer)
                )
                result = owner.json("hub", "revoke", "bob")
                assert result["closed"] == 1
                await asyncio.wait_for(closed, 10)
            with pytest.raises(AuthError) as refused:
                async with dial(url, team_bearer("credential", bob_credential)):
                    pass
            return str(closed.result()), str(refused.value)

        _, refusal = asyncio.run(revoked_while_connected())
        assert "revoked" in refusal
        users = {u["name"]: u for u in owner.json("hub", "users")["items"]}
        assert users["bob"]["revoked"] is not None

        # alice logs out: the record is gone and her credential void at the hub
        alice_credential = record["credential"]
        out = alice.json("hub", "logout", "team")
        assert out["kind"] == "hub_logout" and out["revoked"] is True
        assert json.loads(alice.hubs_file.read_text()) == {}

        async def use_void_credential() -> str:
            with pytest.raises(AuthError) as refused:
                async with dial(url, team_bearer("credential", alice_credential)):
                    pass
            return str(refused.value)

        assert "revoked" in asyncio.run(use_void_credential())
        nothing = alice.run("hub", "logout", check=False)
        assert nothing.returncode == 1 and "not logged in" in nothing.stderr

    audit = owner.json("hub", "audit")["items"]
    seen = [(e["user"], e["action"], e["target"], e["outcome"][:7]) for e in audit]
    assert ("owner", "invite", "alice", "ok") in seen
    assert ("alice", "login", None, "ok") in seen
    assert ("owner", "revoke", "bob", "ok") in seen
    assert ("alice", "logout", None, "ok") in seen
    refused = [e["outcome"] for e in audit if e["outcome"].startswith("refused")]
    assert any("already used" in r for r in refused)
    assert any("expired" in r for r in refused)
    assert any("revoked" in r for r in refused)
    assert set(audit[0]) == {"time", "user", "action", "target", "outcome"}
    human = owner.run("hub", "audit").stdout
    assert "invite" in human and "revoke" in human


def _team_file(workspace: Path, name: str) -> Path:
    return store_dir_of(workspace) / "narrative" / "team" / name


def git_fsck(store_dir: Path) -> None:
    proc = subprocess.run(
        ["git", "--git-dir", str(store_dir), "fsck", "--strict"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_runs_of_two_developers_on_a_shared_environment(
    owner: Cli, workspace: Path, tmp_path: Path
) -> None:
    owner.run("env", "create", "sandbox", "--provider", "worktree")
    alice, bob, carol = (Developer(tmp_path, n) for n in ("alice", "bob", "carol"))
    with serve(owner, workspace) as info:
        url = info["url"]
        for dev, role in ((alice, "member"), (bob, "member"), (carol, "admin")):
            dev.run("init")
            dev.run("hub", "login", url, invite(owner, dev.name, "--role", role))

        script = "echo from-the-hub; echo 'changed on the hub' >> notes.txt"
        proc = alice.run("run", "start", "--hub", "default", "--env", "sandbox", "--json",
                         "--", "sh", "-c", script)  # fmt: skip
        result = json.loads(proc.stdout)
        assert "from-the-hub" in proc.stderr
        assert result["status"] == "succeeded" and result["result_snapshot"]
        run_id = result["id"]
        # the run came home into alice's own store, on its own thread
        shown = alice.json("run", "show", run_id)
        assert shown["status"] == "succeeded"
        # its story too: the hub's events, copied as they arrived, without the hub's own pointers
        said = "".join(e.get("data", "") for e in shown["events"] if e["type"] == "agent.output")
        assert "from-the-hub" in said, shown["events"]
        assert [e["type"] for e in shown["events"]][-1] == "run.finished"
        assert not [e for e in shown["events"] if "hub" in e or "handle" in e]
        diff = alice.run("diff", run_id).stdout
        assert "changed on the hub" in diff
        alice.run("merge", run_id)
        assert "changed on the hub" in (alice.workspace / "notes.txt").read_text()
        with as_developer(alice):
            git_fsck(store_dir_of(alice.workspace))
        git_fsck(store_dir_of(workspace))

        # bob neither sees, nor stops, nor fetches alice's run
        assert [r["id"] for r in alice.json("run", "list", "--hub", "default")["items"]] == [run_id]
        assert bob.json("run", "list", "--hub", "default")["items"] == []
        for args in (("stop", run_id), ("kill", run_id)):
            refused = bob.run("run", *args, "--hub", "default", check=False)
            assert refused.returncode == 1, refused.stderr
            assert "not one of yours" in refused.stderr and "Traceback" not in refused.stderr

        async def fetch_as_bob() -> str:
            async with open_session(None) as session:
                with pytest.raises(AccessDenied) as denied:
                    await session.call("prepareResult", {"run": run_id})
            return str(denied.value)

        with as_developer(bob):
            assert "not one of yours" in asyncio.run(fetch_as_bob())
        bob_runs = bob.json("run", "list")["items"]
        assert bob_runs == []
        # the admin sees every run, and stops any
        assert run_id in [r["id"] for r in carol.json("run", "list", "--hub", "default")["items"]]
        (alice.workspace / "patient.sh").write_text(
            "echo started\nwhile true; do sleep 0.1; done\n"
        )
        starter = subprocess.Popen(
            [NARRATIVE, "run", "start", "--hub", "default", "--env", "sandbox", "--json",
             "--", "sh", "patient.sh"],
            cwd=alice.workspace, env={**os.environ, **alice.env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        patient = _running_run(alice)
        refused = bob.run("run", "kill", "--hub", "default", patient, check=False)
        assert refused.returncode == 1 and "not one of yours" in refused.stderr
        carol.run("run", "kill", "--hub", "default", patient)
        out, err = starter.communicate(timeout=60)
        assert starter.returncode == 1, err
        assert json.loads(out).get("status") == "killed", (out, err)
        assert alice.json("run", "show", patient)["status"] == "killed"

        # bob is revoked: his next command fails with one clear line
        owner.run("hub", "revoke", "bob")
        gone = bob.run("run", "list", "--hub", "default", check=False)
        assert gone.returncode == 1 and "revoked" in gone.stderr, gone.stderr
        assert "Traceback" not in gone.stderr and len(gone.stderr.strip().splitlines()) == 1

    audit = owner.json("hub", "audit")["items"]
    seen = [(e["user"], e["action"], e["target"], e["outcome"][:7]) for e in audit]
    assert ("alice", "runStart", run_id, "ok") in seen
    assert ("bob", "runStop", run_id, "refused") in seen
    assert ("bob", "runKill", run_id, "refused") in seen
    assert ("bob", "prepareResult", run_id, "refused") in seen
    assert ("bob", "runKill", patient, "refused") in seen
    assert ("carol", "runKill", patient, "ok") in seen
    assert ("owner", "revoke", "bob", "ok") in seen


def _running_run(dev: Developer, timeout: float = 30) -> str:
    """The id of ``dev``'s run on the hub once one is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [
            r["id"]
            for r in dev.json("run", "list", "--hub", "default")["items"]
            if r["status"] == "running"
        ]
        if running:
            return str(running[0])
        time.sleep(0.2)
    raise AssertionError(f"no run of {dev.name} is running")


@contextlib.contextmanager
def as_developer(dev: Developer) -> Iterator[None]:
    """This process sees ``dev``'s home and config directory (for library calls)."""
    saved = {k: os.environ.get(k) for k in dev.env}
    os.environ.update(dev.env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_session_outlives_its_token(store: Store) -> None:
    """The CLI renews its session on the open connection (``gateway:refresh``) halfway through
    each token's life, so a command following a long run keeps its connection."""

    async def main() -> Any:
        async with Hub(store) as hub:
            hub.team.session_ttl = 1.0
            code = hub.users.invite("dana", "member", 60)
            await login(hub.url, code, None)
            async with open_session(None) as session:
                await asyncio.sleep(1.0 + CLOCK_SKEW_TOLERANCE + 1.5)  # the first token is dead
                return await session.call("runs", {})

    assert asyncio.run(main()) == {"runs": []}


def test_team_connections_reach_only_their_calls(store: Store) -> None:
    """A session calls the team's run actions and nothing else of the hub (files, bundles of
    its choosing, the owner's revoke, another login); an invite only logs in; a run's token
    makes no team call."""

    async def main() -> None:
        async with Hub(store) as hub:
            code = hub.users.invite("erin", "admin", 60)
            async with dial(hub.url, team_bearer("invite", code)) as client:
                with pytest.raises(OutOfScope):
                    await client.call("team", "runs", {}, target=hub.environment_id)
                await login(hub.url, code, None)
            async with open_session(None) as session:
                env = hub.environment_id
                for kind, action, payload in (
                    ("fs", "readFile", {"path": "README.md"}),
                    ("narrative", "prepareBundle", {"changed": True}),
                    ("narrative", "snapshot", {}),
                    ("team", "revoke", {"user": "erin"}),
                    ("team", "session", {}),
                ):
                    with pytest.raises(OutOfScope):
                        await session.client.call(kind, action, payload, target=env)
                assert await session.call("runs", {}) == {"runs": []}
            token = hub.signer.issue("run-x", "probe", 60)
            async with dial(hub.url, token) as client:
                with pytest.raises(OutOfScope):
                    await client.call("team", "runs", {}, target=hub.environment_id)

    asyncio.run(main())


PROBE = """
import asyncio, os
from gateway.client import GatewayClient

async def main():
    url, token = os.environ["NARRATIVE_GATEWAY_URL"], os.environ["NARRATIVE_GATEWAY_TOKEN"]
    async with GatewayClient(url, token) as client:
        try:
            got = (await client.call("fs", "readFile", {"path": "owner-secret.txt"}))["content"]
        except Exception as exc:
            got = f"refused: {exc}"
    with open("probe.txt", "w") as f:
        f.write(got)

asyncio.run(main())
"""


def test_a_users_run_cannot_read_the_hubs_workspace(
    owner: Cli, workspace: Path, tmp_path: Path
) -> None:
    """Files proxied to the hub are the hub owner's workspace: a team user's run is refused."""
    (workspace / "owner-secret.txt").write_text("the owner's secret\n")
    owner.run("env", "create", "sandbox", "--provider", "worktree")
    alice = Developer(tmp_path, "alice")
    (alice.workspace / "probe.py").write_text(PROBE)
    (alice.workspace / "proxyExecution.json").write_text(json.dumps(ROUTING))
    with serve(owner, workspace) as info:
        alice.run("init")
        alice.run("hub", "login", info["url"], invite(owner, "alice"))
        run = json.loads(
            alice.run("run", "start", "--hub", "default", "--env", "sandbox", "--json",
                      "--", sys.executable, "probe.py").stdout
        )  # fmt: skip
        failed = alice.run("run", "start", "--hub", "default", "--env", "sandbox", "--json",
                           "--", "sh", "-c", "exit 3", check=False)  # fmt: skip
        owners = json.loads(
            owner.run("run", "start", "--env", "sandbox", "--json", "--", "true").stdout
        )
    assert failed.returncode == 1
    failed_run = json.loads(failed.stdout)
    assert (failed_run["status"], failed_run["exit_code"]) == ("failed", 3)
    assert alice.json("run", "show", failed_run["id"])["status"] == "failed"  # it came home too
    alice.run("merge", run["id"])
    probe = (alice.workspace / "probe.txt").read_text()
    assert probe.startswith("refused") and "not theirs" in probe, probe
    # the owner's own control calls are audited too
    seen = [(e["user"], e["action"], e["target"]) for e in owner.json("hub", "audit")["items"]]
    assert ("owner", "runStart", "sandbox") in seen and owners["status"] == "succeeded"
