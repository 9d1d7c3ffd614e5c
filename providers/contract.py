"""The provider contract: what every environment provider must do, as checks any test runner
can call (each raises ``AssertionError`` on a breach; nothing here imports pytest).

A :class:`ContractTarget` names a registered provider (built-in or installed through the
``narrative.providers`` entry point) and the config of an environment as its users get one.
Each check in :data:`CHECKS` builds its own small store in a scratch directory and drives the
provider through :class:`~providers.manager.EnvironmentManager` and the lifecycle table, with
stock ``git`` as the oracle of what a collected result must hold. The project's own suite
(``tests/providers/test_contract.py``) runs every check against worktree, local, docker and
e2b; ``docs/providers.md`` shows how to run them against another provider.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path
from typing import Any

from narrative.errors import InvalidInput
from narrative.ids import new_id
from narrative.snapshot import take_snapshot
from narrative.store import Store

from .base import UP_FD_VAR, BaseProvider, Health, ProviderContext, Signal
from .errors import ExecFailed, ResourceGone
from .gitoracle import git_tree_of
from .lifecycle import EnvState, can_transition
from .manager import EnvironmentManager
from .records import EnvironmentRecord, creating

__all__ = ["CHECKS", "ContractTarget", "git_tree_of", "run_contract"]

DEADLINE = 20.0
"""Seconds a process may take to end after a signal, or a timed-out command to return."""


@dataclass
class ContractTarget:
    """One provider under test, as :func:`run_contract` and the checks take it."""

    provider: str
    """The registry name (built-in or from the ``narrative.providers`` entry point)."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The ``--config`` of an environment (merged over the provider's defaults)."""
    before_create: Callable[[], None] | None = None
    """Called before each resource is created (a test double's fresh sandbox, say)."""
    after_delete: Callable[[str], None] | None = None
    """What the backend's control plane does after a delete that a test double cannot (it is
    given the resource id); None for a real backend."""
    keeps_resource: bool = False
    """The resource outlives a delete by design (``local``: the user's own directory)."""
    lists_resources: bool = True
    """``list_resources`` finds this store's resources by their owner label, so
    :meth:`~providers.manager.EnvironmentManager.sweep` can remove leaked ones."""
    foreign_handles: tuple[str, ...] = ()
    """Process handles of the provider's own shape that it never issued (besides ``""`` and
    ``"garbage"``, which every provider must refuse)."""
    empties_temp: bool = True
    """Preparing a run empties the environment's temporary directory (False: the provider
    says in docs/security.md why it does not)."""
    stop_ends_processes: bool = True
    """Stopping the environment ends its processes (False: stopping pauses it, and starting
    resumes them, as an e2b sandbox's pause does)."""
    prepare: Callable[[EnvironmentManager], None] | None = None
    """Creates in a check's store what an environment of the provider needs there first (a
    hybrid environment's two environments), before each environment is created."""


def _new_store(scratch: Path) -> Store:
    """A store over a small workspace with what a collect must keep exactly: an executable,
    a symlink, binary and empty files, a deep path and a non-ASCII name."""
    workspace = scratch / f"ws-{uuid.uuid4().hex[:8]}"
    (workspace / "src").mkdir(parents=True)
    (workspace / "README.md").write_text("# contract\n")
    (workspace / "src" / "app.py").write_text("print('hello')\n")
    tool = workspace / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (workspace / "link").symlink_to("src/app.py")
    (workspace / "data.bin").write_bytes(bytes(range(256)) * 8)
    (workspace / "empty.txt").write_bytes(b"")
    (workspace / "a" / "b").mkdir(parents=True)
    (workspace / "a" / "b" / "deep.txt").write_text("deep\n")
    (workspace / "ünïcode name.txt").write_text("ü\n")
    (workspace / ".hidden").write_text("dot file\n")
    (workspace / ".gitignore").write_text("*.log\n")
    return Store.init(str(workspace))


def _create(
    target: ContractTarget, manager: EnvironmentManager, name: str, start: bool = True
) -> tuple[EnvironmentRecord, BaseProvider, str]:
    """A new environment of ``target`` through the manager: its record, provider, resource."""
    if target.prepare is not None:
        target.prepare(manager)
    if target.before_create is not None:
        target.before_create()
    record = manager.create(name, target.provider, dict(target.config), start=start)
    assert record.resource_id, f"no resource recorded for {name}: {record}"
    created = _CREATED.get(None)
    if created is not None:
        created.append((target, manager, name, record.resource_id))
    return record, manager.provider(record), record.resource_id


_CREATED: ContextVar[list[tuple[ContractTarget, EnvironmentManager, str, str]]] = ContextVar(
    "contract_created"
)
"""The environments the running check created (by :func:`_create`)."""


def _deleting_on_failure(
    check: Callable[[ContractTarget, Path], None],
) -> Callable[[ContractTarget, Path], None]:
    """``check``, deleting every environment it created when it fails: a breach found must
    not leave the provider's resources, or processes still running, behind it."""

    @wraps(check)
    def checked(target: ContractTarget, scratch: Path) -> None:
        created: list[tuple[ContractTarget, EnvironmentManager, str, str]] = []
        reset = _CREATED.set(created)
        try:
            check(target, scratch)
        except BaseException:
            for owner, manager, name, resource in created:
                # the check's error is the one to see; one deleted already is not found
                with contextlib.suppress(Exception):
                    _delete(owner, manager, name, resource)
            raise
        finally:
            _CREATED.reset(reset)

    return checked


def _refused(what: str, call: Callable[..., object], *args: Any) -> None:
    """``call(*args)`` raises :class:`InvalidInput`."""
    try:
        call(*args)
    except InvalidInput:
        return
    raise AssertionError(f"{what} was not refused")


def _ended(provider: BaseProvider, rid: str, handle: str) -> bool:
    return not provider.alive(rid, handle)


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _delete(
    target: ContractTarget, manager: EnvironmentManager, name: str, resource: str
) -> EnvironmentRecord:
    record = manager.delete(name)
    if target.after_delete is not None:
        target.after_delete(resource)
    return record


# -- the checks ---------------------------------------------------------------------------------


@_deleting_on_failure
def check_lifecycle(target: ContractTarget, scratch: Path) -> None:
    """create → start → stop → start → restart → delete through the manager: each state the
    table allows, the resource healthy while it lives and gone (or kept, by design) after."""
    manager = EnvironmentManager(_new_store(scratch))
    record, provider, resource = _create(target, manager, "life", start=False)
    assert record.state is EnvState.CREATED, record
    assert manager.start("life").state is EnvState.RUNNING
    assert provider.health(resource) is Health.OK
    provider.write_file(resource, "kept.txt", b"kept across stop and start")
    assert manager.stop("life").state is EnvState.STOPPED
    assert manager.start("life").state is EnvState.RUNNING
    assert manager.restart("life").state is EnvState.RUNNING
    assert manager.exec("life", ["cat", "kept.txt"]).stdout == b"kept across stop and start"
    record = _delete(target, manager, "life", resource)
    assert record.state is EnvState.ARCHIVED
    moves = [(EnvState(h["from"]), EnvState(h["to"])) for h in record.history]
    assert all(can_transition(a, b) for a, b in moves), moves
    assert [b for _, b in moves][-1] is EnvState.ARCHIVED
    if not target.keeps_resource:
        assert provider.health(resource) is Health.GONE, "the resource outlived its delete"


@_deleting_on_failure
def check_exec(target: ContractTarget, scratch: Path) -> None:
    """Exit codes, stdout and stderr apart and streamed, variables, the workspace as working
    directory, a missing program, a timeout that ends the command and its children."""
    manager = EnvironmentManager(_new_store(scratch))
    _, provider, rid = _create(target, manager, "exec")
    seen: list[tuple[str, bytes]] = []
    result = provider.exec(
        rid,
        ["sh", "-c", 'echo out; echo err >&2; printf "$X_CONTRACT"; exit 7'],
        env={"X_CONTRACT": "v"},
        on_output=lambda stream, chunk: seen.append((stream, chunk)),
    )
    assert (result.exit_code, result.timed_out) == (7, False), result
    assert (result.stdout, result.stderr) == (b"out\nv", b"err\n"), f"output: {result}"
    assert b"".join(c for s, c in seen if s == "stdout") == result.stdout
    assert b"".join(c for s, c in seen if s == "stderr") == result.stderr
    provider.write_file(rid, "here.txt", b"in the workspace")
    assert provider.exec(rid, ["cat", "here.txt"]).stdout == b"in the workspace"
    try:
        missing = provider.exec(rid, ["no-such-program-contract"])
    except ExecFailed as exc:
        assert "no-such-program-contract" in str(exc), exc
    else:  # a backend whose exec goes through a shell (e2b's envd) reports it as shells do
        assert missing.exit_code == 127, missing
    started = time.monotonic()
    timed = provider.exec(
        rid, ["sh", "-c", "echo begun; (sleep 1; echo late > late.txt) & sleep 60"], timeout=0.5
    )
    assert timed.timed_out and timed.exit_code != 0, timed
    assert timed.stdout == b"begun\n", timed
    assert time.monotonic() - started < DEADLINE
    time.sleep(1.5)
    assert provider.exec(rid, ["test", "-e", "late.txt"]).exit_code != 0, "a child outlived it"
    _delete(target, manager, "exec", rid)


@_deleting_on_failure
def check_files(target: ContractTarget, scratch: Path) -> None:
    """Binary files round-trip; paths out of the workspace are refused."""
    manager = EnvironmentManager(_new_store(scratch))
    _, provider, rid = _create(target, manager, "files")
    blob = bytes(range(256)) * 1024
    provider.write_file(rid, "deep/dir/data.bin", blob)
    assert provider.read_file(rid, "deep/dir/data.bin") == blob
    assert provider.read_file(rid, "./deep//dir/data.bin") == blob
    provider.write_file(rid, "deep/dir/data.bin", b"replaced")
    assert provider.exec(rid, ["cat", "deep/dir/data.bin"]).stdout == b"replaced"
    provider.delete_file(rid, "deep/dir/data.bin")
    assert provider.exec(rid, ["test", "-e", "deep/dir/data.bin"]).exit_code != 0
    for bad in ("/etc/passwd", "../x", "a/../../x", "", ".", "a\x00b"):
        _refused(f"writing {bad!r}", provider.write_file, rid, bad, b"x")
        _refused(f"reading {bad!r}", provider.read_file, rid, bad)
        _refused(f"deleting {bad!r}", provider.delete_file, rid, bad)
    _delete(target, manager, "files", rid)


@_deleting_on_failure
def check_restore_and_collect(target: ContractTarget, scratch: Path) -> None:
    """A restore makes the workspace hold exactly the snapshot (earlier files gone, modes and
    links kept); a collect gives the tree stock git computes for the same files."""
    store = _new_store(scratch)
    workspace = Path(store.workspace)
    base = take_snapshot(store, message="base").snapshot
    assert base.tree == git_tree_of(workspace, scratch)
    manager = EnvironmentManager(store)
    _, provider, rid = _create(target, manager, "restore")
    provider.write_file(rid, "stale.txt", b"must vanish on restore")
    provider.write_file(rid, "old/stale.txt", b"and its directory")
    provider.restore(rid, base)
    listing = provider.exec(rid, ["ls", "-A"]).stdout.decode().split()
    assert "stale.txt" not in listing and "old" not in listing, listing
    assert ".hidden" in listing, listing
    assert provider.exec(rid, ["./tool.sh"]).stdout == b"tool\n"  # the exec bit survived
    assert provider.exec(rid, ["cat", "link"]).stdout == b"print('hello')\n"
    assert provider.read_file(rid, "data.bin") == (workspace / "data.bin").read_bytes()
    thread = store.config.default_thread
    same = provider.collect(rid, thread, None, "unchanged")
    assert same.tree == base.tree, "the restored workspace differs from the snapshot"
    script = (
        "echo changed > README.md && rm data.bin && mkdir -p n && echo n > n/new.txt"
        " && chmod +x empty.txt && echo ignored > build.log"
    )
    assert provider.exec(rid, ["sh", "-c", script]).exit_code == 0
    changed = provider.collect(rid, thread, None, "changed")
    assert changed.thread == thread
    (workspace / "README.md").write_text("changed\n")
    (workspace / "data.bin").unlink()
    (workspace / "n").mkdir()
    (workspace / "n" / "new.txt").write_text("n\n")
    (workspace / "empty.txt").chmod(0o755)
    (workspace / "build.log").write_text("ignored\n")  # .gitignore keeps it out of both
    assert changed.tree == git_tree_of(workspace, scratch) != base.tree
    _delete(target, manager, "restore", rid)


def _exists(provider: BaseProvider, rid: str, path: str) -> bool:
    return provider.exec(rid, ["test", "-e", path]).exit_code == 0


_LEFTOVERS = (
    "echo u > untracked.txt && echo i > build.log && mkdir -p d/e && echo x > d/e/f"
    ' && ln -s /etc escape && echo t > "${TMPDIR:-/tmp}/leftover-$1"'
)
"""What a run leaves behind: untracked, ignored and nested files, a symlink out, and a file in
its temporary directory (named after ``$1``)."""


@_deleting_on_failure
def check_reset_between_runs(target: ContractTarget, scratch: Path) -> None:
    """Nothing of one run reaches the next in the same environment: preparing it for a run
    ends what the last one left running and empties the workspace (ignored files and links
    included) and the temporary directory; with a base, exactly the base is there."""
    store = _new_store(scratch)
    base = take_snapshot(store, message="base").snapshot
    manager = EnvironmentManager(store)
    _, provider, rid = _create(target, manager, "reused")
    manager.prepare_run("reused", base)
    tag = uuid.uuid4().hex[:12]
    assert provider.exec(rid, ["sh", "-c", _LEFTOVERS, "sh", tag]).exit_code == 0
    handle = manager.spawn("reused", ["sh", "-c", "echo up > spawned.txt && exec sleep 60"])
    _wait(lambda: _exists(provider, rid, "spawned.txt"), "the spawned process to run")
    manager.prepare_run("reused", None)
    _wait(lambda: not manager.alive("reused", handle), "the last run's process to end")
    assert provider.exec(rid, ["ls", "-A"]).stdout.split() == [], "the workspace was not emptied"
    temp = provider.exec(rid, ["sh", "-c", 'ls -A "${TMPDIR:-/tmp}"']).stdout.decode()
    if target.empties_temp:
        assert f"leftover-{tag}" not in temp, "the temporary directory kept the last run's file"
    else:
        provider.exec(rid, ["sh", "-c", 'rm -f "${TMPDIR:-/tmp}/leftover-$1"', "sh", tag])
    _runtime_start_resets(target, manager, provider, rid)
    manager.prepare_run("reused", base)
    again = provider.collect(rid, store.config.default_thread, None, "after a reset")
    assert again.tree == base.tree, "a reset with a base does not hold exactly the base"
    _delete(target, manager, "reused", rid)


_RUNTIME = (
    f'echo up > runtime.txt; [ -z "${{{UP_FD_VAR}:-}}" ] || echo up >&"${UP_FD_VAR}"; exec sleep 60'
)
"""Stands for a hub's runtime: says it is up where :data:`~providers.base.UP_FD_VAR` asks."""


def _runtime_start_resets(
    target: ContractTarget, manager: EnvironmentManager, provider: BaseProvider, rid: str
) -> None:
    """Starting a run's runtime (``start_runtime``, which a provider may do in one round
    trip) readies the environment as ``prepare_run`` does: the last run's process ends, its
    files go, and the runtime runs."""
    tag = uuid.uuid4().hex[:12]
    assert provider.exec(rid, ["sh", "-c", _LEFTOVERS, "sh", tag]).exit_code == 0
    left = manager.spawn("reused", ["sh", "-c", "echo up > spawned.txt && exec sleep 60"])
    _wait(lambda: _exists(provider, rid, "spawned.txt"), "the spawned process to run")
    runtime = manager.start_runtime("reused", ["sh", "-c", _RUNTIME], {})
    _wait(lambda: not manager.alive("reused", left), "the last run's process to end")
    assert manager.alive("reused", runtime), "the runtime does not run"
    # (a provider may start the runtime elsewhere: the remote one, on this machine)
    listed = provider.exec(rid, ["ls", "-A"]).stdout.split()
    assert set(listed) <= {b"runtime.txt"}, f"the workspace was not emptied: {listed}"
    if target.empties_temp:
        temp = provider.exec(rid, ["sh", "-c", 'ls -A "${TMPDIR:-/tmp}"']).stdout.decode()
        assert f"leftover-{tag}" not in temp, "the temporary directory kept the last run's file"
    else:
        provider.exec(rid, ["sh", "-c", 'rm -f "${TMPDIR:-/tmp}/leftover-$1"', "sh", tag])
    manager.signal("reused", runtime, "kill")
    _wait(lambda: not manager.alive("reused", runtime), "the runtime to end")


_TREE = "(while :; do echo beat >> beats; sleep 0.1; done) & sleep 60 & wait"
"""A shell with two children, one of which shows it runs by appending to ``beats``."""


@_deleting_on_failure
def check_spawn_signal_alive(target: ContractTarget, scratch: Path) -> None:
    """A spawned tree is alive; ``term`` and ``kill`` end all of it (its children stop
    writing); a signal after the end is no error; handles that are not the provider's and an
    empty argv are refused."""
    manager = EnvironmentManager(_new_store(scratch))
    _, provider, rid = _create(target, manager, "spawn")
    signals: tuple[Signal, ...] = ("term", "kill")
    for sig in signals:
        provider.exec(rid, ["rm", "-f", "beats"])
        handle = _running_tree(provider, rid, scratch / f"spawn-{sig}.log")
        assert provider.alive(rid, handle)
        provider.signal(rid, handle, sig)
        _wait(partial(_ended, provider, rid, handle), f"alive() to turn false after {sig}")
        _assert_still(provider, rid, f"a child outlived {sig}")
        provider.signal(rid, handle, "term")  # ended: no error
    for bad in ("", "garbage", *target.foreign_handles):
        _refused(f"signalling handle {bad!r}", provider.signal, rid, bad, "term")
        _refused(f"probing handle {bad!r}", provider.alive, rid, bad)
    _refused("spawning an empty argv", provider.spawn, rid, [])
    _delete(target, manager, "spawn", rid)


def _beats(provider: BaseProvider, rid: str) -> int:
    counted = provider.exec(rid, ["sh", "-c", "cat beats 2>/dev/null | wc -c"])
    assert counted.exit_code == 0, f"counting the beats failed: {counted.stderr[-2000:]!r}"
    return int(counted.stdout.strip())


@_deleting_on_failure
def check_reconnect(target: ContractTarget, scratch: Path) -> None:
    """A fresh store, manager and provider, knowing only the persisted record, reattach to
    the environment: its files and a process spawned by the first are still there."""
    store = _new_store(scratch)
    first = EnvironmentManager(store)
    _, earlier, rid = _create(target, first, "again")
    earlier.write_file(rid, "note.txt", b"kept across processes")
    handle = first.spawn("again", ["sleep", "60"])
    prepared = {r.name for r in first.environments()} - {"again"}  # by ``target.prepare``
    fresh = EnvironmentManager(Store.open(store.git_dir))
    reports = fresh.reconnect_all()
    assert all(r.health == "ok" for r in reports), reports
    reports = [r for r in reports if r.name not in prepared]
    assert [(r.name, r.health) for r in reports] == [("again", "ok")], reports
    again = fresh.get("again")
    assert again.resource_id == rid and again.state is EnvState.RUNNING
    provider = fresh.provider(again)
    assert provider is not earlier
    assert provider.read_file(rid, "note.txt") == b"kept across processes"
    assert fresh.alive("again", handle)
    fresh.signal("again", handle, "kill")
    _wait(lambda: not fresh.alive("again", handle), "the process to end")
    _delete(target, fresh, "again", rid)
    if not target.keeps_resource:
        try:
            provider.reconnect(rid)
        except ResourceGone:
            pass
        else:
            raise AssertionError("reconnect to a deleted resource did not raise ResourceGone")


@_deleting_on_failure
def check_stop_ends_processes(target: ContractTarget, scratch: Path) -> None:
    """Stopping the environment ends every process in it (a spawned tree, children and all);
    a fresh process reattaching to every environment (``reconnect_all``, as ``env watch``
    starts) leaves it stopped, neither started nor resumed; started again, none of the
    processes runs and the files are still there."""
    manager = EnvironmentManager(_new_store(scratch))
    _, provider, rid = _create(target, manager, "halt")
    handle = _running_tree(provider, rid, scratch / "spawn.log")
    assert manager.stop("halt").state is EnvState.STOPPED
    stopped = provider.health(rid)
    fresh = EnvironmentManager(Store.open(manager.store.git_dir))
    fresh.reconnect_all()
    record = fresh.get("halt")
    assert record.state is EnvState.STOPPED, record
    again = fresh.provider(record).health(rid)
    assert again is stopped, f"reconnecting changed a stopped environment: {stopped} -> {again}"
    assert manager.start("halt").state is EnvState.RUNNING
    if target.stop_ends_processes:
        assert not manager.alive("halt", handle), "the spawned process outlived the stop"
        _assert_still(provider, rid, "a process outlived the stop")
    else:
        assert manager.alive("halt", handle), "the paused process was not resumed"
    _delete(target, manager, "halt", rid)


@_deleting_on_failure
def check_delete(target: ContractTarget, scratch: Path) -> None:
    """Delete ends the environment's processes and removes its resource, nothing of it left
    listed; a second delete is no error."""
    manager = EnvironmentManager(_new_store(scratch))
    _, provider, rid = _create(target, manager, "gone")
    handle = _running_tree(provider, rid, scratch / "spawn.log")
    _delete(target, manager, "gone", rid)
    assert not _runs(provider, rid, handle), "the spawned process outlived the delete"
    if target.keeps_resource:  # the directory stays: its files show whether anything writes
        _assert_still(provider, rid, "a process outlived the delete")
    provider.delete(rid)  # idempotent
    assert rid not in provider.list_resources()
    if not target.keeps_resource:
        assert provider.health(rid) is Health.GONE
        try:
            provider.exec(rid, ["true"])
        except (ResourceGone, ExecFailed):
            pass
        else:
            raise AssertionError("a deleted resource still runs commands")


def _runs(provider: BaseProvider, rid: str, handle: str) -> bool:
    """Whether the spawned ``handle`` still runs, its resource deleted."""
    try:
        return provider.alive(rid, handle)
    except (ResourceGone, ExecFailed):
        return False  # the resource is gone, and its processes with it


def _running_tree(provider: BaseProvider, rid: str, log: Path) -> str:
    """The handle of :data:`_TREE` spawned with its output to ``log``, once it runs."""
    handle = provider.spawn(rid, ["sh", "-c", _TREE], log_path=str(log))
    try:
        _wait(lambda: _beats(provider, rid) > 2, "the spawned tree to run")
    except AssertionError as exc:  # what it said, if it did not start
        said = provider.read_spawn_log(rid, handle, log_path=str(log)).data[-2000:]
        alive = provider.alive(rid, handle)
        raise AssertionError(f"{exc} (running: {alive}; its output: {said!r})") from None
    return handle


def _assert_still(provider: BaseProvider, rid: str, breach: str) -> None:
    """Nothing appends to ``beats`` any more (a child of :data:`_TREE` would)."""
    ended = _beats(provider, rid)
    time.sleep(0.5)
    assert _beats(provider, rid) == ended, breach


@_deleting_on_failure
def check_labels_and_sweep(target: ContractTarget, scratch: Path) -> None:
    """A resource carries the store's owner label: ``list_resources`` finds it, and a sweep
    removes it once no record knows it (a leak), with every process it ran, leaving recorded
    environments alone."""
    manager = EnvironmentManager(_new_store(scratch))
    _, provider, kept = _create(target, manager, "kept")
    if not target.lists_resources:
        assert manager.sweep([target.provider]) == []
        _delete(target, manager, "kept", kept)
        return
    listed = provider.list_resources()
    assert kept in listed, f"{kept} is not listed: {listed}"
    # a leak: a resource created for this store that no record knows (a crash mid-create)
    if target.before_create is not None:
        target.before_create()
    context = ProviderContext(manager.store, manager.owner, new_id("environment"), "leaked")
    leaky = type(provider)(context, provider.config)
    leaked = leaky.create()
    try:
        leaky.start(leaked)
        handle = _running_tree(leaky, leaked, scratch / "leaked.log")
        assert leaked in provider.list_resources()
        assert manager.sweep([target.provider]) == [leaked]
        assert not _runs(provider, leaked, handle), "a leaked process outlived the sweep"
    except BaseException:  # no record knows it: it is deleted here or never
        with contextlib.suppress(Exception):
            leaky.delete(leaked)
        raise
    if target.after_delete is not None:
        target.after_delete(leaked)
    assert leaked not in provider.list_resources()
    assert provider.health(leaked) is Health.GONE
    assert provider.health(kept) is Health.OK
    _sweep_spares_a_creation(target, manager, provider)
    _delete(target, manager, "kept", kept)
    assert kept not in provider.list_resources()


def _sweep_spares_a_creation(
    target: ContractTarget, manager: EnvironmentManager, provider: BaseProvider
) -> None:
    """A sweep while an environment is created (its record written, its resource made, the
    resource's id not recorded yet) leaves that resource alone."""
    planned = EnvironmentRecord(name="coming", provider=target.provider, config=dict(target.config))
    record = manager.records.add(planned)
    context = ProviderContext(manager.store, manager.owner, record.id, record.name)
    maker = type(provider)(context, provider.config)
    with creating(manager.store, record.id):
        if target.before_create is not None:
            target.before_create()
        made = maker.create()
        try:
            swept = manager.sweep([target.provider])
            assert made not in swept, "a sweep deleted the resource of an environment in creation"
        finally:
            maker.delete(made)


CHECKS: dict[str, Callable[[ContractTarget, Path], None]] = {
    "lifecycle": check_lifecycle,
    "exec": check_exec,
    "files": check_files,
    "restore_and_collect": check_restore_and_collect,
    "spawn_signal_alive": check_spawn_signal_alive,
    "reset_between_runs": check_reset_between_runs,
    "reconnect": check_reconnect,
    "stop_ends_processes": check_stop_ends_processes,
    "delete": check_delete,
    "labels_and_sweep": check_labels_and_sweep,
}
"""Every check of the contract, by name."""


def run_contract(target: ContractTarget, scratch: Path) -> None:
    """Run every check against ``target`` (each in a directory of its own under ``scratch``)."""
    for name, check in CHECKS.items():
        directory = scratch / name
        directory.mkdir(parents=True)
        check(target, directory)
