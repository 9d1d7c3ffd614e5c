"""Private environments on a team hub (``team:env*``), driven as a CLI drives them: a real hub
on loopback, users logged in with invites and their sessions over WebSocket, clones of a
sandboxed worktree template, snapshots served by the user's store and pulled back into it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import stat
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.errors import AccessDenied, AuthError, GatewayError, OutOfScope
from gateway.handlers import HandlerContext
from gateway.hub.narratives import BundleShelf, fetch_bundle, have_commits
from gateway.hub.run_request import RunRequest
from gateway.hub.server import Hub
from gateway.hub.team import revoke_user
from gateway.hub.team_client import TeamSession, login, open_session
from gateway.hub.token_policy import result_scope
from narrative.hierarchy import create_thread, get_thread, start_run
from narrative.history import resolve_snapshot
from narrative.runs import incoming_ref
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.lifecycle import EnvState
from tests.providers.contract_targets import sandbox_or_skip

# hubs with users and sandboxed clones (about 15 s): make test-long, which CI runs too
pytestmark = pytest.mark.long

T = TypeVar("T")
TEMPLATE = "sandbox"


async def blocking(func: Callable[[], T]) -> T:
    return await asyncio.to_thread(func)


async def enrol(hub: Hub, user: str, role: str = "member") -> None:
    """``user`` logs in to ``hub`` (the login record is named after them)."""
    code = await hub.blocking(lambda: hub.users.invite(user, role, 60))
    await login(hub.url, code, user)


def serve_store(session: TeamSession, store: Store) -> None:
    """The session's CLI serves bundles of ``store`` to the hub."""
    BundleShelf(store, blocking).install(session.client.gateway.handlers)


def user_store(tmp_path: Path, name: str, files: dict[str, bytes]) -> Store:
    workspace = tmp_path / f"ws-{name}"
    workspace.mkdir()
    for path, data in files.items():
        (workspace / path).write_bytes(data)
    return Store.init(str(workspace))


def git_fsck(store: Store) -> None:
    proc = subprocess.run(
        ["git", "--git-dir", store.git_dir, "fsck", "--strict"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def git_show(store: Store, commit: str, path: str) -> bytes:
    return subprocess.run(
        ["git", "--git-dir", store.git_dir, "show", f"{commit}:{path}"],
        capture_output=True,
        check=True,
    ).stdout


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


def audit_of(hub: Hub) -> list[tuple[str, str, str | None, str]]:
    return [(e["user"], e["action"], e["target"], e["outcome"][:7]) for e in hub.audit.entries()]


async def pull_collected(
    session: TeamSession,
    store: Store,
    environment: str,
    snapshot: dict[str, Any],
    stage: dict[str, str] | None = None,
) -> None:
    """Bring a collected snapshot home as a client does (``team_client._bring_home``)."""

    async def call(kind: str, action: str, payload: dict[str, Any]) -> Any:
        if action == "prepareBundle":
            spec = {"environment": environment, "snapshot": snapshot["id"], **payload}
            return await session.call("envPrepareSnapshot", spec)
        return await session.client.call(kind, action, payload, target=session.login.hub)

    spec = {"have": await blocking(lambda: have_commits(store))}
    scope = result_scope(store, snapshot["thread"], f"environment {environment}")
    await fetch_bundle(
        call, store, spec, blocking, session.login.url, check_threads=scope, stage=stage
    )


def test_a_clone_of_a_template_runs_commands_files_processes_and_snapshots(
    store: Store, tmp_path: Path
) -> None:
    sandbox_or_skip()
    alice_store = user_store(tmp_path, "alice", {"notes.txt": b"alice's notes\n"})
    base = take_snapshot(alice_store, message="base").snapshot

    async def main() -> None:
        async with Hub(store) as hub:
            template = await hub.blocking(lambda: hub.manager.create(TEMPLATE, "worktree"))
            await enrol(hub, "alice")
            async with open_session("alice") as session:
                serve_store(session, alice_store)
                created = await session.call("envCreate", {"template": TEMPLATE, "label": "ci"})
                name = created["environment"]
                assert re.fullmatch(r"u-[0-9a-f]{8}", name), name
                assert created == {"environment": name, "provider": "worktree", "state": "running"}
                clone = await hub.blocking(lambda: hub.manager.get(name))
                assert (clone.provider, clone.config) == (template.provider, template.config)
                envs = Path(store.git_dir) / "narrative" / "team" / "envs.json"
                assert stat.S_IMODE(envs.stat().st_mode) == 0o600
                owned = json.loads(envs.read_text())[name]
                assert (owned["user"], owned["template"], owned["label"]) == (
                    "alice",
                    TEMPLATE,
                    "ci",
                )

                async def call(action: str, **payload: Any) -> Any:
                    return await session.call(action, {"environment": name, **payload})

                # commands: output, exit code, environment, timeout, refused argv
                done = await call(
                    "envExec",
                    argv=["sh", "-c", 'printf "out %s" "$GREETING"; printf err >&2; exit 3'],
                    env={"GREETING": "hi"},
                    timeout=None,
                )
                assert done == {
                    "exitCode": 3,
                    "timedOut": False,
                    "stdout": base64.b64encode(b"out hi").decode(),
                    "stderr": base64.b64encode(b"err").decode(),
                }
                slow = await call("envExec", argv=["sleep", "30"], env={}, timeout=0.5)
                assert slow["timedOut"] is True
                empty = await call("envExec", argv=[], env={}, timeout=None)
                assert empty["failure"]["type"] == "InvalidInput"

                # files, binary included; paths out of the workspace are refused
                blob = bytes(range(256)) * 3
                data = base64.b64encode(blob).decode()
                assert await call("envWriteFile", path="bin/blob", data=data) == {}
                assert (
                    base64.b64decode((await call("envReadFile", path="bin/blob"))["data"]) == blob
                )
                size = await call("envExec", argv=["wc", "-c", "bin/blob"], env={}, timeout=30)
                assert base64.b64decode(size["stdout"]).split()[0] == b"768"
                for action, extra in (
                    ("envReadFile", {}),
                    ("envWriteFile", {"data": data}),
                    ("envDeleteFile", {}),
                ):
                    for path in ("../escape", "/etc/passwd"):
                        refused = await call(action, path=path, **extra)
                        assert refused["failure"]["type"] == "InvalidInput", (action, refused)
                assert await call("envDeleteFile", path="bin/blob") == {}
                gone = await call("envReadFile", path="bin/blob")
                assert gone["failure"]["type"] == "InvalidInput"

                # background processes
                spawned = await call(
                    "envSpawn", argv=["sh", "-c", "while true; do sleep 0.1; done"], env={}
                )
                handle = spawned["handle"]
                assert (await call("envAlive", handle=handle)) == {"alive": True}
                assert await call("envSignal", handle=handle, signal="term") == {}

                async def ended() -> bool:
                    return not (await call("envAlive", handle=handle))["alive"]

                await until(ended)
                forged = await call("envSignal", handle="not-a-handle", signal="kill")
                assert forged["failure"]["type"] == "InvalidInput"
                with pytest.raises(GatewayError, match="'signal' must be"):
                    await call("envSignal", handle=handle, signal="hup")
                assert await call("envHealth") == {"health": "ok", "state": "running"}

                # a snapshot of alice's store restored into the clone
                restored = await call("envRestore", snapshot=base.id, thread=base.thread)
                assert restored == {"snapshot": base.id}
                notes = await call("envReadFile", path="notes.txt")
                assert base64.b64decode(notes["data"]) == b"alice's notes\n"

                # a run's result collected onto the run's own thread (new on the hub, its
                # records brought from alice's store) and pulled home, staged for screening
                def new_run() -> tuple[str, str]:
                    objective = get_thread(alice_store, base.thread).objective_id
                    thread = create_thread(alice_store, objective, "remote", forked_from=base.id)
                    return thread.id, start_run(alice_store, thread.id, "agent", name, base.id).id

                run_thread, run_id = await blocking(new_run)
                script = "echo 'changed remotely' >> notes.txt"
                await call("envExec", argv=["sh", "-c", script], env={}, timeout=30)
                collected = await call(
                    "envCollect", thread=run_thread, head=None, run=run_id, message="result"
                )
                result = collected["snapshot"]
                assert (result["thread"], result["run"]) == (run_thread, run_id)
                stage = {run_thread: incoming_ref(run_id)}
                await pull_collected(session, alice_store, name, result, stage)
                staged = alice_store.refs.read(incoming_ref(run_id))
                assert staged is not None and staged.hex() == result["commit"]
                assert git_show(alice_store, result["commit"], "notes.txt") == (
                    b"alice's notes\nchanged remotely\n"
                )

                # collected onto alice's own thread after her newer head, pulled home as a
                # fast-forward of that thread
                (Path(alice_store.workspace) / "more.txt").write_text("more\n")
                head = await blocking(lambda: take_snapshot(alice_store, message="more").snapshot)
                assert head.thread == base.thread
                again = await call(
                    "envCollect", thread=base.thread, head=head.id, run=None, message="again"
                )
                onto = again["snapshot"]
                assert onto["thread"] == base.thread and onto["parent"] == head.id, onto
                await pull_collected(session, alice_store, name, onto)
                home = await blocking(lambda: resolve_snapshot(alice_store, base.thread))
                assert home.id == onto["id"]

                # deleted, then deleted again; listed as archived
                assert await call("envDelete") == {}
                assert await call("envDelete") == {}
                assert await call("envHealth") == {"health": "gone", "state": "archived"}
                for action, extra in (
                    ("envExec", {"argv": ["true"], "env": {}, "timeout": None}),
                    ("envReadFile", {"path": "notes.txt"}),
                    ("envAlive", {"handle": handle}),
                    ("envStart", {}),
                ):
                    after = await call(action, **extra)
                    assert after["failure"]["type"] == "ResourceGone", (action, after)
                listed = await session.call("envList", {})
                assert [(e["environment"], e["state"]) for e in listed["environments"]] == [
                    (name, "archived")
                ]
            assert ("alice", "envCreate", name, "ok") in audit_of(hub)
            assert ("alice", "envDelete", name, "ok") in audit_of(hub)
            assert hub.manager.get(TEMPLATE).state is EnvState.RUNNING

    asyncio.run(main())
    git_fsck(alice_store)
    git_fsck(store)


def test_users_reach_only_their_own_clones(store: Store, tmp_path: Path) -> None:
    sandbox_or_skip()
    alice_store = user_store(tmp_path, "alice", {"a.txt": b"a\n"})
    alice_base = take_snapshot(alice_store, message="alice's base").snapshot
    bob_store = user_store(tmp_path, "bob", {"b.txt": b"b\n"})
    bob_base = take_snapshot(bob_store, message="bob's base").snapshot

    async def main() -> None:
        async with Hub(store) as hub:
            await hub.blocking(lambda: hub.manager.create(TEMPLATE, "worktree"))
            for user, role in (("alice", "member"), ("bob", "member"), ("carol", "admin")):
                await enrol(hub, user, role)
            async with open_session("alice") as alice:
                serve_store(alice, alice_store)
                first = await alice.call("envCreate", {"template": TEMPLATE, "label": "x"})
                second = await alice.call("envCreate", {"template": TEMPLATE, "label": "y"})
                mine = first["environment"]
                assert mine != second["environment"]
                listed = await alice.call("envList", {"label": "x"})
                assert [e["environment"] for e in listed["environments"]] == [mine]
                everything = await alice.call("envList", {})
                assert len(everything["environments"]) == 2

                async with open_session("bob") as bob:
                    serve_store(bob, bob_store)
                    assert await bob.call("envList", {}) == {"environments": []}
                    for action, extra in (
                        ("envExec", {"argv": ["true"], "env": {}, "timeout": None}),
                        ("envReadFile", {"path": "a.txt"}),
                        ("envDelete", {}),
                        ("envPrepareSnapshot", {"snapshot": bob_base.id, "have": []}),
                    ):
                        with pytest.raises(AccessDenied, match="not one of yours"):
                            await bob.call(action, {"environment": mine, **extra})
                    # nor through the owner's template, nor a run in alice's clone
                    with pytest.raises(AccessDenied):
                        await bob.call("envExec", {"environment": TEMPLATE, "argv": ["true"]})
                    run = {"environment": mine, "argv": ["true"], "snapshot": bob_base.id,
                           "thread": bob_base.thread}  # fmt: skip
                    with pytest.raises(AccessDenied, match="not one of yours"):
                        await bob.call("runStart", run)
                    # his own clone is his to run in (and the template stays everyone's)
                    own = (await bob.call("envCreate", {"template": TEMPLATE, "label": ""}))[
                        "environment"
                    ]
                    started = await bob.call("runStart", {**run, "environment": own})
                    assert started["user"] == "bob" and started["environment"] == own
                    # alice's thread and snapshot, once on the hub, stay out of his reach
                    restored = {"snapshot": alice_base.id, "thread": alice_base.thread}
                    await alice.call("envRestore", {"environment": mine, **restored})
                    collect = {"environment": own, "thread": alice_base.thread, "head": None,
                               "run": None, "message": "m"}  # fmt: skip
                    with pytest.raises(OutOfScope, match="would move thread"):
                        await bob.call("envCollect", collect)
                    prepare = {"environment": own, "snapshot": alice_base.id, "have": []}
                    with pytest.raises(AccessDenied, match="not one of yours"):
                        await bob.call("envPrepareSnapshot", prepare)
                    # and alice's clone still answers her
                    ok = await alice.call(
                        "envExec", {"environment": mine, "argv": ["true"], "env": {}}
                    )
                    assert ok["exitCode"] == 0

                    async with open_session("carol") as carol:
                        seen = await carol.call("envList", {})
                        users = sorted(e["user"] for e in seen["environments"])
                        assert users == ["alice", "alice", "bob"]
                        done = await carol.call(
                            "envExec", {"environment": mine, "argv": ["true"], "env": {}}
                        )
                        assert done["exitCode"] == 0

            # bob is revoked: his next session is refused
            await hub.blocking(lambda: revoke_user(hub.users, hub.audit, "bob", "owner"))
            with pytest.raises(AuthError, match="revoked"):
                async with open_session("bob") as bob:
                    await bob.call("envList", {})
            seen = audit_of(hub)
            for action in ("envExec", "envReadFile", "envDelete", "envPrepareSnapshot"):
                assert ("bob", action, mine, "refused") in seen, action
            assert ("bob", "envExec", TEMPLATE, "refused") in seen
            assert ("bob", "runStart", mine, "refused") in seen
            assert ("bob", "envPrepareSnapshot", alice_base.id, "refused") in seen
            assert any(e[:2] == ("bob", "envCollect") and e[3] == "refused" for e in seen)
            assert ("alice", "envCreate", mine, "ok") in seen

    asyncio.run(main())


def test_only_the_owners_environments_are_templates(store: Store, tmp_path: Path) -> None:
    sandbox_or_skip()

    async def main() -> None:
        async with Hub(store) as hub:
            fixed = str(tmp_path / "fixed-checkout")
            await hub.blocking(lambda: hub.manager.create(TEMPLATE, "worktree"))
            await hub.blocking(
                lambda: hub.manager.create("fixed", "worktree", {"path": fixed}, start=False)
            )
            hybrid = {"agent": TEMPLATE, "tools": "fixed", "route": ["fs:*"]}
            await hub.blocking(lambda: hub.manager.create("both", "hybrid", hybrid, start=False))
            old = await hub.blocking(lambda: hub.manager.create("old", "worktree", start=False))
            await hub.blocking(lambda: hub.manager.delete("old"))
            await enrol(hub, "alice")
            async with open_session("alice") as session:
                clone = (await session.call("envCreate", {"template": TEMPLATE, "label": "l"}))[
                    "environment"
                ]
                for template, message in (
                    (clone, "not a template"),
                    ("fixed", "fixed path"),
                    ("both", "made of other environments"),
                    ("nowhere", "no environment named"),
                    (old.id, "no environment named"),
                ):
                    with pytest.raises(GatewayError, match=message):
                        await session.call("envCreate", {"template": template, "label": "l"})
                listed = await session.call("envList", {})
                assert [e["environment"] for e in listed["environments"]] == [clone]
            refused = [a for a in audit_of(hub) if a[1] == "envCreate" and a[3] == "refused"]
            assert len(refused) == 5

    asyncio.run(main())


def test_a_run_cannot_claim_the_hubs_thread(store: Store, tmp_path: Path) -> None:
    """team:runStart names the thread it brings: one of the hub's own is refused, even when
    the bundle carries no head for it (it was recorded as the user's, who could then move it)."""
    alice_store = user_store(tmp_path, "alice", {"a.txt": b"a\n"})
    base = take_snapshot(alice_store, message="base").snapshot
    hub_thread = take_snapshot(store, message="the owner's").snapshot.thread

    async def main() -> None:
        async with Hub(store) as hub:
            await hub.blocking(
                lambda: hub.manager.create(TEMPLATE, "worktree", {"sandbox": "none"})
            )
            await enrol(hub, "alice")
            async with open_session("alice") as session:
                serve_store(session, alice_store)
                # alice's CLI is hers to change: it serves her base whatever thread is asked
                registry = session.client.gateway.handlers
                prepare = registry.lookup("narrative", "prepareBundle")
                assert prepare is not None

                async def lying(ctx: HandlerContext, payload: dict[str, Any]) -> Any:
                    return await prepare(ctx, {**payload, "threads": [base.thread]})

                registry.register("narrative", "prepareBundle", lying, replace=True)
                run = {"environment": TEMPLATE, "argv": ["true"], "snapshot": base.id,
                       "thread": hub_thread}  # fmt: skip
                with pytest.raises(OutOfScope, match=hub_thread):
                    await session.call("runStart", run)
            runs = Path(store.git_dir) / "narrative" / "team" / "runs.json"
            owners = json.loads(runs.read_text())["threads"] if runs.exists() else {}
            assert hub_thread not in owners

    asyncio.run(main())


def test_the_hub_never_selects_a_users_clone(store: Store, tmp_path: Path) -> None:
    """A run that names no environment gets one the hub selects: never a user's clone, even
    when that is the only one running (it would run another user's agent in alice's clone)."""
    bob_store = user_store(tmp_path, "bob", {"b.txt": b"b\n"})
    base = take_snapshot(bob_store, message="base").snapshot

    async def main() -> None:
        async with Hub(store) as hub:
            config = {"sandbox": "none"}
            await hub.blocking(lambda: hub.manager.create(TEMPLATE, "worktree", config))
            await enrol(hub, "alice")
            await enrol(hub, "bob")
            async with open_session("alice") as alice:
                created = await alice.call("envCreate", {"template": TEMPLATE, "label": ""})
            clone = created["environment"]
            await hub.blocking(lambda: hub.manager.stop(TEMPLATE))  # the clone alone runs
            async with open_session("bob") as bob:
                serve_store(bob, bob_store)
                run = {"argv": ["true"], "snapshot": base.id, "thread": base.thread}
                started = await bob.call("runStart", run)
                assert started["environment"] != clone
                await hub.wait(started["id"])
            owner_run = await hub.submit(RunRequest(None, ["true"]))
            assert owner_run.environment != clone
            await hub.wait(owner_run.id)

    asyncio.run(main())


def test_a_long_command_holds_up_nobody_else(store: Store, tmp_path: Path) -> None:
    """While alice's command runs in her clone for seconds, bob's calls and the hub's own
    store work answer at once (her command runs on her own thread, not the store thread)."""
    sandbox_or_skip()

    async def main() -> None:
        async with Hub(store) as hub:
            await hub.blocking(lambda: hub.manager.create(TEMPLATE, "worktree"))
            await enrol(hub, "alice")
            await enrol(hub, "bob")
            async with open_session("alice") as alice, open_session("bob") as bob:
                mine = await alice.call("envCreate", {"template": TEMPLATE, "label": "a"})
                theirs = await bob.call("envCreate", {"template": TEMPLATE, "label": "b"})
                payload = {"argv": ["sleep", "6"], "env": {}, "timeout": None}
                slow = asyncio.ensure_future(
                    alice.call("envExec", {"environment": mine["environment"], **payload})
                )
                await asyncio.sleep(1)  # her command runs now
                started = asyncio.get_running_loop().time()
                quick = {"environment": theirs["environment"], "argv": ["true"]}
                done = await bob.call("envExec", {**quick, "env": {}, "timeout": None})
                assert done["exitCode"] == 0
                await bob.call("envList", {})
                await hub.blocking(hub.manager.environments)
                assert asyncio.get_running_loop().time() - started < 3, "held up by alice"
                assert not slow.done()
                assert (await slow)["exitCode"] == 0

    asyncio.run(main())
