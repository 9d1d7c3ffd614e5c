"""A sandbox that bwrap fails to set up: the command never ran, so it is started again.

bwrap remounts every mount below ``/`` read-only while it sets a sandbox up; a mount that goes
away meanwhile (Docker starting or stopping a container) fails it with "Can't bind mount
/oldroot/ on /newroot/" (bubblewrap issue 650). Measured here: 4 commands in 18,000 while the
Docker tests ran. A spawned runtime or agent then silently never ran, and an exec failed with
bwrap's message. Here bwrap is replaced, on ``PATH``, by a script that fails its first
invocations as bwrap does and then runs the real one.
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from narrative.ids import new_id
from narrative.store import Store
from providers.base import ProviderContext
from providers.errors import ExecFailed
from providers.worktree import WorktreeConfig, WorktreeProvider
from tests.providers.contract_targets import sandbox_or_skip
from tests.providers.docker_support import new_owner

_MESSAGE = "bwrap: Can't bind mount /oldroot/ on /newroot/: Unable to apply mount flags"


@pytest.fixture
def failing_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``bwrap`` first on PATH that fails while ``failures`` (a file) holds a number above
    zero, counting it down, and runs the real one otherwise; each call is one line of
    ``calls``."""
    sandbox_or_skip()
    real = shutil.which("bwrap")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "bwrap"
    script.write_text(
        "#!/bin/sh\n"
        f"echo call >> {tmp_path / 'calls'}\n"
        f"left=$(cat {tmp_path / 'failures'})\n"
        'if [ "$left" -gt 0 ]; then\n'
        f"  echo $((left - 1)) > {tmp_path / 'failures'}\n"
        f'  echo "{_MESSAGE}: remount /newroot/x: Invalid argument" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def _calls(state: Path) -> int:
    path = state / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _provider(store: Store) -> tuple[WorktreeProvider, str]:
    provider = WorktreeProvider(
        ProviderContext(store, "owner-test", new_id("environment"), "box"), WorktreeConfig()
    )
    return provider, provider.create()


def test_a_command_whose_sandbox_failed_to_start_is_run_again(
    failing_bwrap: Path, store: Store
) -> None:
    provider, rid = _provider(store)
    (failing_bwrap / "failures").write_text("2")
    done = provider.exec(rid, ["sh", "-c", "echo ran >> runs.txt; echo out; echo err >&2"])
    assert (done.exit_code, done.stdout, done.stderr) == (0, b"out\n", b"err\n")
    assert _calls(failing_bwrap) == 3
    assert (Path(rid) / "runs.txt").read_text() == "ran\n"  # once: the failed ones never ran


def test_a_spawn_whose_sandbox_failed_to_start_is_started_again(
    failing_bwrap: Path, store: Store
) -> None:
    provider, rid = _provider(store)
    (failing_bwrap / "failures").write_text("2")
    log = failing_bwrap / "spawn.log"
    handle = provider.spawn(rid, ["sh", "-c", "echo up; exec sleep 60"], log_path=str(log))
    assert _calls(failing_bwrap) == 3
    deadline = time.monotonic() + 15
    while b"up" not in log.read_bytes():
        assert time.monotonic() < deadline, log.read_bytes()
        time.sleep(0.05)
    assert provider.alive(rid, handle)
    assert log.read_bytes().count(_MESSAGE.encode()) == 2  # each failed attempt, for the record
    provider.signal(rid, handle, "kill")


def test_a_command_that_fails_once_started_is_not_run_again(
    failing_bwrap: Path, store: Store
) -> None:
    provider, rid = _provider(store)
    (failing_bwrap / "failures").write_text("0")
    done = provider.exec(rid, ["sh", "-c", 'echo "$0" >&2; exit 1', _MESSAGE])
    assert done.exit_code == 1 and _MESSAGE.encode() in done.stderr
    assert _calls(failing_bwrap) == 1


def test_a_sandbox_that_never_starts_is_an_error_naming_bwrap_s_reason(
    failing_bwrap: Path, store: Store
) -> None:
    provider, rid = _provider(store)
    (failing_bwrap / "failures").write_text("100")
    with pytest.raises(ExecFailed, match=r"sandbox did not start.*Can.t bind mount"):
        provider.exec(rid, ["true"])
    assert _calls(failing_bwrap) == 5
    with pytest.raises(ExecFailed, match="sandbox did not start"):
        provider.spawn(rid, ["sleep", "60"])
    assert _calls(failing_bwrap) == 10


@pytest.mark.long
def test_sandboxed_commands_start_while_containers_come_and_go(
    store: Store, docker_api: Any, docker_image: str
) -> None:
    """The race itself, with the real bwrap and engine: containers are started and removed in
    a loop (each mounts and unmounts an overlay below ``/``) while sandboxed commands run.
    Before the fix about 4 in 1,500 failed this way here; every one must run."""
    import docker.errors

    sandbox_or_skip()
    stop = threading.Event()
    churned: list[str] = []

    def churn() -> None:
        config = docker_api.create_host_config(binds=["/usr:/usr:ro"], network_mode="none")
        labels = {"narrative.owner": new_owner()}  # swept with the session's test containers
        while not stop.is_set():
            made = docker_api.create_container(
                docker_image, command=["/usr/bin/true"], host_config=config, labels=labels
            )
            try:
                docker_api.start(made)
                docker_api.wait(made)
                docker_api.remove_container(made, force=True)
            except docker.errors.APIError as exc:
                # another worker's session, ending, sweeps test containers: this one too
                if exc.status_code not in (404, 409):
                    raise
            churned.append(made["Id"])

    churning = threading.Thread(target=churn, name="container-churn", daemon=True)
    churning.start()
    try:
        provider, rid = _provider(store)
        results = [provider.exec(rid, ["true"]) for _ in range(1500)]
    finally:
        stop.set()
        churning.join(60)
    failed = [result.stderr[-300:] for result in results if result.exit_code != 0]
    assert failed == []
    assert len(churned) >= 10, "the containers did not come and go meanwhile"


def test_a_sandbox_starts_in_a_process_holding_more_than_1024_descriptors(store: Store) -> None:
    """A hub holds a descriptor per connection: the start's pipe may be numbered above 1023,
    which ``select()`` cannot wait on."""
    sandbox_or_skip()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        provider, rid = _provider(store)
        assert provider.exec(rid, ["echo", "ran"]).stdout == b"ran\n"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
