"""Background processes (``spawn``/``signal``/``alive``) against real processes, beyond the
provider contract (``test_contract.py``: alive, term and kill end a tree, foreign handles are
refused): where each provider puts the output, how a process outlives its caller, pid reuse,
the runtime log's copy on the host. Worktree and local on this machine, a real Docker engine,
and the e2b SDK against the envd stand-in.

The oracle is the host's ``/proc``: every test tree carries a variable of its own
(``SPAWN_TEST=<random>``, independent of the providers' markers), so its processes are found by
scanning ``/proc/*/environ`` — which sees container processes and the stand-in's too, since both
run on this kernel.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from narrative.errors import InvalidInput
from narrative.ids import new_id
from narrative.store import Store
from providers.base import SPAWN_LOG_LIMIT, BaseProvider, ProviderContext, SpawnLog
from providers.errors import ExecFailed, ProviderError
from providers.local import LocalConfig, LocalProvider
from providers.manager import EnvironmentManager
from providers.worktree import WorktreeConfig, WorktreeProvider
from tests.providers.e2b_support import envd_fixture, envd_server_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(120)

TREE = "sleep 60 & sleep 60 & wait"
"""A shell with two children: three processes, none of which ends on its own in a test's time."""
ENV_ID = new_id("environment")
"""This process's environment of the directory tests (a child process drives it too)."""
DEADLINE = 15.0


LONG_OUTPUT = ["sh", "-c", "seq 1 20000; echo done >&2"]
"""Prints over 100 KiB: more than :data:`SPAWN_LOG_LIMIT`, so a tail is a real cut."""


def check_log_tail(
    provider: BaseProvider, resource: str, handle: str, full: bytes, **kw: Any
) -> None:
    """``read_spawn_log`` against the whole log ``full``, read by other means."""
    assert len(full) > SPAWN_LOG_LIMIT and full.endswith(b"\n20000\ndone\n")
    size = len(full)
    assert provider.read_spawn_log(resource, handle, **kw) == SpawnLog(
        size, full[-SPAWN_LOG_LIMIT:]
    )
    assert provider.read_spawn_log(resource, handle, limit=10, **kw) == SpawnLog(size, full[-10:])
    piece = provider.read_spawn_log(resource, handle, since=size - 12, **kw)
    assert piece == SpawnLog(size, b"\n20000\ndone\n") and piece.start == size - 12
    assert provider.read_spawn_log(resource, handle, since=size, **kw) == SpawnLog(size, b"")
    # an offset beyond the end: the log was replaced, so its end is read afresh
    beyond = provider.read_spawn_log(resource, handle, since=size + 1, limit=5, **kw)
    assert beyond == SpawnLog(size, b"done\n")
    with pytest.raises(InvalidInput):
        provider.read_spawn_log(resource, "garbage", **kw)


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2]


def running(pid: int) -> bool:
    """Exists and is not a zombie."""
    return _state(pid) not in (None, "Z", "X")


def tagged(tag: str) -> set[int]:
    """Running processes whose environment carries ``SPAWN_TEST=tag``."""
    needle = f"SPAWN_TEST={tag}".encode()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and running(int(name)):
                    found.add(int(name))
        except OSError:
            continue
    return found


def wait_tree(tag: str, count: int = 3) -> set[int]:
    """The tagged processes, once there are ``count`` of them."""

    last: set[int] = set()

    def complete() -> set[int] | None:
        last.clear()
        last.update(tagged(tag))
        return set(last) if len(last) == count else None

    try:
        result: set[int] = wait_for(complete, what=f"{count} processes tagged {tag}")
    except AssertionError as exc:  # say what ran instead: too few, or one too many
        raise AssertionError(f"{exc}; found {describe(last) or 'none'}") from None
    return result


def describe(pids: set[int]) -> str:
    """Each process as ``pid state argv``, for a failure's message."""
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            argv = "?"
        out.append(f"{pid} {_state(pid)} {argv}")
    return "; ".join(out)


def spawn_tree(
    provider: BaseProvider, resource: str, count: int = 3, **kwargs: Any
) -> tuple[str, str, set[int]]:
    """Spawn :data:`TREE` and wait until all of its processes run; (handle, tag, pids)."""
    tag = uuid.uuid4().hex
    handle = provider.spawn(resource, ["sh", "-c", TREE], env={"SPAWN_TEST": tag}, **kwargs)
    return handle, tag, wait_tree(tag, count)


def assert_gone(pids: set[int]) -> None:
    wait_for(lambda: not any(running(pid) for pid in pids), what=f"{pids} to end")


def assert_ended(pids: set[int], alive: Callable[[], bool]) -> None:
    """The tagged processes end, then ``alive()`` turns false: the handle's leader may be
    untagged (bwrap when sandboxed) and end a moment after the tree it supervised."""
    assert_gone(pids)
    wait_for(lambda: not alive(), what="alive() to turn false")


# ---------------------------------------------------------------------------------------------
# worktree and local
# ---------------------------------------------------------------------------------------------


def _directory_provider(kind: str, store: Store, tmp_path: Path) -> BaseProvider:
    """Unsandboxed: these tests count the processes of a spawned tree, and bwrap adds its own
    (the sandbox is tested in tests/security/test_sandbox.py)."""
    context = ProviderContext(store, "owner-test", ENV_ID, "box")
    if kind == "local":
        return LocalProvider(context, LocalConfig(path=str(tmp_path / "local-env"), sandbox="none"))
    return WorktreeProvider(context, WorktreeConfig(sandbox="none"))


@pytest.fixture(params=["worktree", "local"])
def directory(
    request: pytest.FixtureRequest, store: Store, tmp_path: Path
) -> Iterator[tuple[BaseProvider, str]]:
    provider = _directory_provider(request.param, store, tmp_path)
    yield provider, provider.create()


def test_directory_env_cwd_log_and_session(
    directory: tuple[BaseProvider, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, resource = directory
    monkeypatch.setenv("GIT_DIR", "/nowhere/.git")  # must not reach the command
    monkeypatch.setenv("FROM_HOST", "host-value")
    log = tmp_path / "logs" / "runtime.log"
    log.parent.mkdir()
    log.write_bytes(b"earlier\n")
    script = (
        'echo "out $GREETING $FROM_HOST git=${GIT_DIR-unset} cwd=$(pwd)"; echo err >&2; '
        'read line; echo "stdin=${line:-eof}"; exec sleep 60'
    )
    tag = uuid.uuid4().hex
    handle = provider.spawn(
        resource,
        ["sh", "-c", script],
        env={"GREETING": "hello", "SPAWN_TEST": tag},
        log_path=str(log),
    )
    wait_for(lambda: b"stdin=" in log.read_bytes(), what="output in the log")
    (pid,) = wait_tree(tag, 1)
    text = log.read_text()
    assert text.startswith("earlier\n")  # appended, not truncated
    assert f"out hello host-value git=unset cwd={os.path.realpath(resource)}" in text
    assert "err\n" in text and "stdin=eof" in text
    # its own session and process group, apart from the caller's
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid != os.getpgid(0)
    provider.signal(resource, handle, "term")
    assert_gone({pid})


def test_directory_spawn_log_tail(directory: tuple[BaseProvider, str], tmp_path: Path) -> None:
    provider, resource = directory
    log = tmp_path / "runtime.log"
    handle = provider.spawn(resource, LONG_OUTPUT, log_path=str(log))
    wait_for(lambda: not provider.alive(resource, handle), what="the output to end")
    assert provider.spawn_log_on_host
    check_log_tail(provider, resource, handle, log.read_bytes(), log_path=str(log))
    # no log to read: none given, or it is missing
    assert provider.read_spawn_log(resource, handle) == SpawnLog(0, b"")
    missing = str(tmp_path / "missing.log")
    assert provider.read_spawn_log(resource, handle, log_path=missing) == SpawnLog(0, b"")


def test_directory_handle_guards_against_pid_reuse(directory: tuple[BaseProvider, str]) -> None:
    provider, resource = directory
    handle, _tag, pids = spawn_tree(provider, resource)
    kind, pid, start, _token = handle.split(":")
    # the same pid with another start time: what a handle looks like once the pid was reused
    reused = f"{kind}:{pid}:{int(start) + 1}:{'0' * 24}"
    assert not provider.alive(resource, reused)
    provider.signal(resource, reused, "kill")
    time.sleep(0.1)  # a kill would have landed by now (the kill path itself waits 10 ms)
    assert all(running(p) for p in pids)  # neither the group nor any marked process was hit
    provider.signal(resource, handle, "kill")
    assert_gone(pids)


def test_directory_process_outlives_the_caller(
    directory: tuple[BaseProvider, str], store: Store, tmp_path: Path
) -> None:
    """Spawned from a child Python process that exits; then found, signalled and reaped from
    this process with a fresh provider instance."""
    provider, resource = directory
    tag = uuid.uuid4().hex
    kind = "local" if isinstance(provider, LocalProvider) else "worktree"
    log = tmp_path / "spawn.log"
    program = f"""
import json, sys
from narrative.store import Store
from providers.base import ProviderContext
from providers.local import LocalConfig, LocalProvider
from providers.worktree import WorktreeConfig, WorktreeProvider
store = Store.open({store.git_dir!r})
context = ProviderContext(store, "owner-test", {ENV_ID!r}, "box")
if {kind!r} == "local":
    provider = LocalProvider(context, LocalConfig(path={str(tmp_path / "local-env")!r}))
else:
    provider = WorktreeProvider(context, WorktreeConfig())
handle = provider.spawn(
    {resource!r}, ["sh", "-c", {TREE!r}], env={{"SPAWN_TEST": {tag!r}}}, log_path={str(log)!r}
)
print(json.dumps(handle))
"""
    child = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    handle = json.loads(child.stdout)
    try:
        pids = wait_tree(tag)
    except AssertionError as exc:  # once in CI: what the sandbox said, if it did not start
        raise AssertionError(f"{exc}; its log: {log.read_bytes()[-2000:]!r}") from None
    fresh = _directory_provider(kind, store, tmp_path)
    assert fresh.alive(resource, handle)
    fresh.signal(resource, handle, "term")
    assert_ended(pids, lambda: fresh.alive(resource, handle))


def test_directory_missing_program_and_runtime(store: Store, tmp_path: Path) -> None:
    provider = _directory_provider("worktree", store, tmp_path)
    resource = provider.create()
    with pytest.raises(ExecFailed):
        provider.spawn(resource, ["/nonexistent/program"])
    assert provider.runtime_command()[:2] == [sys.executable, "-I"]  # isolated: see attack 6
    context = ProviderContext(store, "owner-test", ENV_ID, "box")
    custom = WorktreeProvider(context, WorktreeConfig(runtime=["/opt/narrative", "--quiet"]))
    assert custom.runtime_command() == ["/opt/narrative", "--quiet"]
    # the default really runs the CLI
    version = subprocess.run(
        [*provider.runtime_command(), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0 and "Usage" in version.stdout


def test_manager_spawn_signal_alive(store: Store) -> None:
    manager = EnvironmentManager(store)
    record = manager.create("box", "worktree")
    tag = uuid.uuid4().hex
    handle = manager.spawn("box", ["sh", "-c", f"echo started; {TREE}"], env={"SPAWN_TEST": tag})
    pids = wait_tree(tag)
    assert manager.alive("box", handle)
    log = Path(manager.logs.runtime_path("box"))
    assert log.parent.name == record.id
    wait_for(lambda: log.exists() and b"started" in log.read_bytes(), what="runtime.log")
    manager.signal("box", handle, "term")
    assert_ended(pids, lambda: manager.alive("box", handle))
    lines = manager.logs.lines("box")
    assert any(line.endswith(f"spawned {handle}") for line in lines)
    assert any(line.endswith(f"signal term {handle}") for line in lines)
    manager.stop("box")
    with pytest.raises(ProviderError, match="start it first"):
        manager.spawn("box", ["true"])


# ---------------------------------------------------------------------------------------------
# docker (real engine at DOCKER_HOST)
# ---------------------------------------------------------------------------------------------

PYTHON = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
"""The host's interpreter, run in containers from a read-only mount at the same path."""
PYTHON_MOUNTS: list[dict[str, Any]] = [{"source": "/usr", "target": "/usr", "read_only": True}]
if not sys.base_prefix.startswith("/usr/"):
    PYTHON_MOUNTS.append({"source": sys.base_prefix, "target": sys.base_prefix, "read_only": True})


@pytest.fixture
def container(make_docker_provider: Callable[..., Any]) -> tuple[Any, str]:
    provider = make_docker_provider()
    resource = provider.create()
    provider.start(resource)
    return provider, resource


def test_docker_env_log_and_outlives_caller(
    container: tuple[Any, str], make_docker_provider: Callable[..., Any], tmp_path: Path
) -> None:
    provider, resource = container
    assert provider.runtime_command() == ["narrative"]
    handle, _tag, pids = spawn_tree(provider, resource, log_path=str(tmp_path / "ignored.log"))
    marker = handle.rsplit(":", 1)[1]
    # a fresh client (no state shared with the one that spawned) finds and signals it
    provider.close()
    fresh = make_docker_provider(owner=provider.context.owner, env_id=provider.context.env_id)
    assert fresh.alive(resource, handle)
    fresh.signal(resource, handle, "term")
    assert_gone(pids)
    # the daemon marks the exec ended a moment after its process is gone
    wait_for(lambda: not fresh.alive(resource, handle), what="docker to see the exec end")
    # output went to the documented file inside the container
    probe = fresh.exec(
        resource,
        ["sh", "-c", f'echo "$GREETING $PWD"; cat /tmp/narrative-spawn-{marker}.log'],
        env={"GREETING": "hi"},
    )
    assert probe.stdout.startswith(b"hi /work\n")
    handle = fresh.spawn(
        resource, ["sh", "-c", 'echo "x=$X in $PWD"; echo e >&2'], env={"X": "1"}, log_path="l"
    )
    wait_for(lambda: not fresh.alive(resource, handle), what="short process to end")
    marker = handle.rsplit(":", 1)[1]
    assert fresh.exec(resource, ["cat", f"/tmp/narrative-spawn-{marker}.log"]).stdout == (
        b"x=1 in /work\ne\n"
    )
    # another container's handle is refused
    other = make_docker_provider()
    other_resource = other.create()
    other.start(other_resource)
    with pytest.raises(InvalidInput):
        other.alive(other_resource, handle)


def test_docker_spawn_log_tail_running_stopped_and_removed(container: tuple[Any, str]) -> None:
    provider, resource = container
    assert not provider.spawn_log_on_host
    handle = provider.spawn(resource, LONG_OUTPUT, log_path="ignored-on-the-host")
    wait_for(lambda: not provider.alive(resource, handle), what="the output to end")
    marker = handle.rsplit(":", 1)[1]
    full = provider.exec(resource, ["cat", f"/tmp/narrative-spawn-{marker}.log"]).stdout
    check_log_tail(provider, resource, handle, full)
    quiet = provider.spawn(resource, ["sh", "-c", "echo discarded"])  # no log asked for
    wait_for(lambda: not provider.alive(resource, quiet), what="the quiet process to end")
    assert provider.read_spawn_log(resource, quiet) == SpawnLog(0, b"")
    # the archive endpoint reads a stopped container, where no exec runs
    provider.stop(resource)
    assert provider.read_spawn_log(resource, handle, limit=5) == SpawnLog(len(full), b"done\n")
    provider.delete(resource)
    assert provider.read_spawn_log(resource, handle) == SpawnLog(0, b"")


def test_docker_manager_copies_the_runtime_log_to_the_host_once(
    store: Store, docker_image: str
) -> None:
    """Output that stays in the container reaches the host's runtime.log: a part while the
    process runs, the rest once it ended, and nothing twice however often it is synced."""
    from tests.providers.docker_support import HOST_MOUNTS

    manager = EnvironmentManager(store)
    config = {"image": docker_image, "mounts": HOST_MOUNTS, "stop_timeout": 2}
    manager.create("box", "docker", config=config)
    try:
        script = "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second; echo oops >&2"
        handle = manager.spawn("box", ["sh", "-c", script])
        log = Path(manager.logs.runtime_path("box"))
        wait_for(lambda: manager.logs.runtime_tail("box", handle) == ["first"], what="first line")
        manager.logs.sync_runtime("box")  # every process still running
        assert manager.alive("box", handle)
        assert log.read_text().splitlines()[1:] == ["first"]
        manager.exec("box", ["touch", "go"])
        wait_for(lambda: not manager.alive("box", handle), what="the process to end")
        assert manager.logs.runtime_tail("box", handle) == ["first", "second", "oops"]
        manager.logs.sync_runtime("box", handle)
        manager.logs.sync_runtime("box", handle)
        lines = manager.logs.runtime_lines("box")
        assert lines[0].startswith("--- narrative: ") and handle in lines[0]
        assert lines[1:] == ["first", "second", "oops"]
        assert manager.logs.runtime_lines("box", tail=2) == ["second", "oops"]
        # a finished process was copied for good: a later sync adds nothing
        manager.stop("box")
        manager.logs.sync_runtime("box")
        assert manager.logs.runtime_lines("box")[1:] == ["first", "second", "oops"]
    finally:
        provider: Any = manager.provider(manager.get("box"))
        manager.delete("box")
        provider.close()


def test_docker_missing_program_and_stopped_container(container: tuple[Any, str]) -> None:
    provider, resource = container
    with pytest.raises(ExecFailed, match="nonexistent"):
        provider.spawn(resource, ["/nonexistent/program"])
    handle, _tag, pids = spawn_tree(provider, resource)
    provider.stop(resource)
    assert_gone(pids)
    assert not provider.alive(resource, handle)
    provider.signal(resource, handle, "kill")  # not running: nothing to do, no error
    with pytest.raises(ExecFailed):
        provider.spawn(resource, ["sleep", "1"])


def test_docker_host_network_reaches_host_loopback(
    make_docker_provider: Callable[..., Any],
) -> None:
    """With ``network="host"`` a process in the container connects to a server this test
    listens on at 127.0.0.1 (the host's Python is mounted read-only at the same path)."""
    provider = make_docker_provider(network="host", mounts=PYTHON_MOUNTS)
    assert "network" in provider.capabilities_for(provider.cfg)
    resource = provider.create()
    provider.start(resource)
    assert provider.api.inspect_container(resource)["HostConfig"]["NetworkMode"] == "host"

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(DEADLINE)
        port = server.getsockname()[1]
        received: list[bytes] = []

        def accept() -> None:
            conn, _addr = server.accept()
            with conn:
                received.append(conn.recv(100))

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        client = (
            "import socket, sys; "
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=10); "
            "s.sendall(b'hello from the container'); s.close()"
        )
        handle = provider.spawn(resource, [PYTHON, "-I", "-S", "-c", client], log_path="l")
        acceptor.join(DEADLINE)
    marker = handle.rsplit(":", 1)[1]
    log = provider.exec(resource, ["cat", f"/tmp/narrative-spawn-{marker}.log"]).stdout
    assert received == [b"hello from the container"], log


def test_docker_default_network_cannot_reach_host_loopback(
    make_docker_provider: Callable[..., Any],
) -> None:
    """The counterpart: without ``network="host"`` the same connection is refused (the
    container's loopback is its own), so the test above cannot pass by accident."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        provider = make_docker_provider(mounts=PYTHON_MOUNTS)
        resource = provider.create()
        provider.start(resource)
        result = provider.exec(
            resource,
            [
                PYTHON,
                "-I",
                "-S",
                "-c",
                f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)",
            ],
            timeout=30,
        )
        assert result.exit_code != 0 and b"ConnectionRefused" in result.stderr


def test_docker_host_network_config() -> None:
    from providers.docker.config import DockerConfig

    assert DockerConfig(image="x", network="host").network == "host"
    assert DockerConfig(image="x", runtime=["/usr/local/bin/narrative"]).runtime == [
        "/usr/local/bin/narrative"
    ]
    with pytest.raises(ValueError):
        DockerConfig.model_validate({"image": "x", "network": "bridge"})


# ---------------------------------------------------------------------------------------------
# e2b (the real SDK against the envd stand-in)
# ---------------------------------------------------------------------------------------------


def test_e2b_outlives_caller_log_and_env(envd: Any, store: Store) -> None:
    from tests.providers.e2b_support import WORKDIR, make_provider, on_disk

    provider = make_provider(store, env={"FROM_CONFIG": "c"})
    assert provider.runtime_command() == ["narrative"]
    resource = provider.create()
    tag = uuid.uuid4().hex
    handle = provider.spawn(
        resource,
        ["sh", "-c", 'echo "$FROM_CONFIG $X"; ' + TREE],
        env={"X": "x", "SPAWN_TEST": tag},
        log_path="ignored-on-the-host",
    )
    pids = wait_tree(tag)
    marker = handle.rsplit(":", 1)[1]
    log = on_disk(envd, os.path.dirname(WORKDIR) + f"/.narrative-staging/spawn-{marker}.log")
    wait_for(lambda: log.exists() and log.read_bytes() == b"c x\n", what="log in the sandbox")
    # a fresh provider (new SDK connection) still sees it: the spawning stream is gone
    fresh = make_provider(store)
    assert fresh.alive(resource, handle)
    fresh.signal(resource, handle, "term")
    assert_gone(pids)
    wait_for(lambda: not fresh.alive(resource, handle), what="envd to forget the process")


def test_e2b_spawn_log_tail(envd: Any, store: Store) -> None:
    from tests.providers.e2b_support import WORKDIR, make_provider, on_disk

    provider = make_provider(store)
    resource = provider.create()
    assert not provider.spawn_log_on_host
    handle = provider.spawn(resource, LONG_OUTPUT, log_path="ignored-on-the-host")
    wait_for(lambda: not provider.alive(resource, handle), what="the output to end")
    marker = handle.rsplit(":", 1)[1]
    log = on_disk(envd, os.path.dirname(WORKDIR) + f"/.narrative-staging/spawn-{marker}.log")
    check_log_tail(provider, resource, handle, log.read_bytes())
    quiet = provider.spawn(resource, ["sh", "-c", "echo discarded"])  # no log asked for
    assert provider.read_spawn_log(resource, quiet) == SpawnLog(0, b"")
    envd.kill()  # the sandbox is gone: nothing to read, and no error
    assert provider.read_spawn_log(resource, handle) == SpawnLog(0, b"")
