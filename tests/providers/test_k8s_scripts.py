"""The scripts the ``k8s`` provider runs in a pod to start a hub's runtime and to wait for it to
end, run here by a real ``sh``: a runtime's spawn returns as soon as the runtime says it is up
(:func:`gateway.hub.runtime.announce_up`) or ends, or when its hold runs out, so that a hub
starting fifty runtimes does not look into each pod again and again; and one exec waits for a
runtime asked to exit. No background process may keep the exec's output open (an exec ends
only when its output does)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.k8s.podexec import (
    ALIVE_SCRIPT,
    AWAIT_END_SCRIPT,
    SIGNAL_PID_SCRIPT,
    SPAWN_SCRIPT,
    on_line,
)

REPO = Path(__file__).resolve().parents[2]


class Spawned:
    def __init__(self, marker: str, said: str, seconds: float) -> None:
        self.marker, self.said, self.seconds = marker, said, seconds

    def alive(self) -> bool:
        return subprocess.run(["sh", "-c", ALIVE_SCRIPT, self.marker], check=False).returncode == 0

    def await_end(self, tenths: int, *then: str) -> int:
        return self.await_end_output(tenths, *then).returncode

    def await_end_output(self, tenths: int, *then: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["sh", "-c", AWAIT_END_SCRIPT, self.marker, str(tenths), *then]
        return subprocess.run(argv, check=False, timeout=30, capture_output=True)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    markers: list[str] = []

    def run(argv: list[str], hold: str) -> Spawned:
        marker = secrets.token_hex(12)
        markers.append(marker)
        env = {**os.environ, "NARRATIVE_EXEC_ID": marker}
        script = ["sh", "-c", SPAWN_SCRIPT, "spawn", str(tmp_path / "log"), "", hold, "", *argv]
        started = time.monotonic()
        # capture_output: this returns only when every holder of the output closed it
        done = subprocess.run(script, env=env, capture_output=True, check=True, timeout=60)
        seconds = time.monotonic() - started
        return Spawned(marker, done.stdout.decode().strip(), seconds)

    yield run
    for marker in markers:
        subprocess.run(["sh", "-c", SIGNAL_PID_SCRIPT, marker, "KILL"], check=False)
        for suffix in ("pid", "up"):
            Path(f"/tmp/narrative-spawn-{marker}.{suffix}").unlink(missing_ok=True)


def test_the_spawn_returns_once_the_runtime_is_up_and_leaves_it_running(spawn) -> None:
    announce = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from gateway.hub.runtime import announce_up, take_up_fd;"
        "fd = take_up_fd(); assert fd is not None and not __import__('os').get_inheritable(fd);"
        "time.sleep(0.5); announce_up(fd); time.sleep(60)"
    )
    got = spawn([sys.executable, "-I", "-c", announce, str(REPO)], "30")
    assert got.said == "up"
    assert got.seconds < 20  # not the hold
    assert got.alive()
    assert got.await_end(3) == 1  # still runs: waited 0.3 s, no more


def test_the_spawn_returns_when_the_runtime_ends_before_it_is_up(spawn) -> None:
    got = spawn(["sh", "-c", "sleep 0.3; exit 3"], "30")
    assert got.said == "ended"
    assert got.seconds < 20
    assert not got.alive()
    assert got.await_end(0) == 0


def test_a_runtime_that_never_says_so_is_held_no_longer_than_the_hold(spawn) -> None:
    got = spawn(["sleep", "60"], "1")
    assert got.said == "waiting"
    assert 1 <= got.seconds < 15
    assert got.alive()


def test_a_plain_spawn_does_not_wait(spawn) -> None:
    got = spawn(["sleep", "60"], "")
    assert got.said == ""
    assert got.seconds < 10
    assert got.alive()


def test_await_end_returns_as_soon_as_the_process_ends(spawn) -> None:
    got = spawn(["sleep", "0.5"], "")
    started = time.monotonic()
    assert got.await_end(300) == 0
    assert time.monotonic() - started < 20  # not the 30 s it was allowed
    assert not got.alive()


def test_await_end_runs_the_command_it_is_given_once_the_process_ended_and_only_then(
    spawn, tmp_path: Path
) -> None:
    """The k8s provider reads a runtime's log in the exec that saw it end: the command runs
    after the end, never while the process runs, and its failure is not the wait's."""
    got = spawn(["sleep", "60"], "")
    still = got.await_end_output(2, "sh", "-c", "echo read too early; exit 3")
    assert still.returncode == 1 and still.stdout == b""
    subprocess.run(["sh", "-c", SIGNAL_PID_SCRIPT, got.marker, "KILL"], check=True)
    ended = got.await_end_output(100, "sh", "-c", "echo read; exit 3")
    assert ended.returncode == 0 and ended.stdout == b"read\n"
    gone = Spawned("0" * 24, "", 0.0)  # never spawned: no pid file
    assert gone.await_end_output(5, "echo", "a", "b").stdout == b"a b\n"
    assert gone.await_end(5) == 0


def test_a_line_is_seen_however_the_output_is_cut() -> None:
    """The sweep's cue triggers its action once, split across chunks or not; a line that
    only ends with it, stderr, or a cue without its newline do not."""
    calls: list[int] = []
    watch = on_line("narrative: swept", lambda: calls.append(1))
    for chunk in (b"xnarrative: swept\n", b"narr", b"ative: swe", b"pt"):
        watch("stdout", chunk)
    watch("stderr", b"\nnarrative: swept\n")
    assert calls == []
    watch("stdout", b"\nup\n")
    assert calls == [1]
    watch("stdout", b"narrative: swept\n")
    assert calls == [1]
    first = on_line("narrative: swept", lambda: calls.append(2))
    first("stdout", b"narrative: swept\nup\n")
    assert calls == [1, 2]
