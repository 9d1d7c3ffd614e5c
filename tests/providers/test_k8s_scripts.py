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
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.base import OutputFn, SpawnLog
from providers.errors import ProviderError
from providers.k8s.podexec import (
    ALIVE_SCRIPT,
    AWAIT_END_SCRIPT,
    END_CUE,
    SIGNAL_PID_SCRIPT,
    SPAWN_SCRIPT,
    HeldExec,
    on_line,
)
from providers.k8s.spawning import HOLD_SAYS, SpawnEnds

REPO = Path(__file__).resolve().parents[2]


class Spawned:
    def __init__(self, marker: str, said: str, seconds: float) -> None:
        self.marker, self.said, self.seconds = marker, said, seconds
        self.printed = b""

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

    def run(argv: list[str], hold: str, after: str = "") -> Spawned:
        marker = secrets.token_hex(12)
        markers.append(marker)
        env = {**os.environ, "NARRATIVE_EXEC_ID": marker}
        log = str(tmp_path / "log")
        script = ["sh", "-c", SPAWN_SCRIPT, "spawn", log, "", hold, "", after, *argv]
        started = time.monotonic()
        # capture_output: this returns only when every holder of the output closed it
        done = subprocess.run(script, env=env, capture_output=True, check=True, timeout=60)
        seconds = time.monotonic() - started
        said, _, rest = done.stdout.decode().partition("\n")
        spawned = Spawned(marker, said.strip(), seconds)
        spawned.printed = rest.encode()
        return spawned

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


def test_ended_is_said_only_once_the_process_shows_as_ended(spawn) -> None:
    """The end of the FIFO comes while the process exits, a moment before /proc shows it gone
    (the flake of CI run 36). Here the moment is made a second long: the process closes its
    write end, then lives on."""
    got = spawn(["sh", "-c", "exec 3>&-; sleep 1; exit 3"], "30")
    assert got.said == "ended"
    assert not got.alive()


ANNOUNCE = (
    "import sys, time; sys.path.insert(0, sys.argv[1]);"
    "from gateway.hub.runtime import announce_up, take_up_fd;"
    "fd = take_up_fd(); time.sleep(float(sys.argv[2])); announce_up(fd);"
    "print('runtime log line', flush=True); time.sleep(float(sys.argv[3]))"
)


def held_spawn(
    tmp_path: Path, marker: str, up_after: float, end_after: float
) -> subprocess.Popen[bytes]:
    """The k8s provider's one exec a run: spawn, say "up", stay open until the runtime ended."""
    env = {**os.environ, "NARRATIVE_EXEC_ID": marker}
    log = str(tmp_path / "log")
    after = f"echo log:; cat {log}"
    runtime = [sys.executable, "-I", "-c", ANNOUNCE, str(REPO), str(up_after), str(end_after)]
    script = ["sh", "-c", SPAWN_SCRIPT, "spawn", log, "", "30", "", after, *runtime]
    return subprocess.Popen(script, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_held_spawn_says_up_then_stays_open_until_the_runtime_ended_and_reads_its_log(
    tmp_path: Path,
) -> None:
    """The runtime holds the FIFO's write end until it exits (announce_up keeps it): the exec
    prints ``up`` at once, then, only after the runtime's end, the cue and its whole log."""
    marker = secrets.token_hex(12)
    started = time.monotonic()
    proc = held_spawn(tmp_path, marker, 0.2, 2.0)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        said_at = time.monotonic() - started
        assert Spawned(marker, "up", 0).alive()  # "up" came while it runs
        rest, _ = proc.communicate(timeout=60)
        ended_at = time.monotonic() - started
    finally:
        proc.kill()
        subprocess.run(["sh", "-c", SIGNAL_PID_SCRIPT, marker, "KILL"], check=False)
    assert rest == f"{END_CUE}\nlog:\nruntime log line\n".encode()
    assert ended_at - said_at >= 1.5  # it waited for the end, not for a hold
    assert not Spawned(marker, "", 0).alive()


def test_a_held_spawn_whose_runtime_lets_go_of_its_fifo_early_still_waits_for_its_end(
    spawn,
) -> None:
    """An older runtime closes the FIFO once it said "up": the exec still waits until the
    process is gone (its recorded pid), so an end is never reported early."""
    early = (
        "import os, sys, time; fd = int(os.environ['NARRATIVE_UP_FD']);"
        "os.write(fd, b'up\\n'); os.close(fd); time.sleep(1.5)"
    )
    got = spawn([sys.executable, "-I", "-c", early], "30", "echo read")
    assert got.said == "up"
    assert got.printed == f"{END_CUE}\nread\n".encode()
    assert got.seconds >= 1.4
    assert not got.alive()


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


def _held(script: list[bytes | BaseException | None], release: threading.Event) -> HeldExec:
    """A held exec whose run prints ``script``'s chunks, waits for ``release`` at a None, and
    returns all it printed (or raises the exception in ``script``)."""

    def run(out: OutputFn) -> bytes:
        printed = b""
        for step in script:
            if step is None:
                assert release.wait(30)
            elif isinstance(step, BaseException):
                raise step
            else:
                out("stdout", step)
                printed += step
        return printed

    return HeldExec(run, HOLD_SAYS)


def test_a_held_exec_lets_its_caller_go_at_the_line_and_gives_its_end_later() -> None:
    release = threading.Event()
    held = _held([b"narrative: swept\n", b"u", b"p\n", None, b"more\n"], release)
    held.wait_line()  # returns while the run waits for release
    assert held.wait_end(0.2) is None
    release.set()
    assert held.wait_end(30) == b"narrative: swept\nup\nmore\n"


def test_a_held_exec_that_fails_before_its_line_raises_to_the_caller() -> None:
    held = _held([b"narrative: swept\n", ProviderError("spawn failed in pod p")], threading.Event())
    with pytest.raises(ProviderError, match="spawn failed"):
        held.wait_line()


def test_the_end_comes_from_the_exec_ending_and_the_log_after_the_scripts_last_cue() -> None:
    """What an agent prints into the held exec's output (a cue and a log of its own) neither
    ends the wait early nor replaces the log the script read after the real end."""
    cue = f"\n{END_CUE}\n".encode()
    release = threading.Event()
    forged = b"up\n" + cue.lstrip(b"\n") + b"5\nforgd" + cue + b"4\nreal"
    ends = SpawnEnds()
    ends.hold("k8s:" + "a" * 24, _held([b"up\n", None, forged[3:]], release))
    assert ends.from_held("k8s:" + "a" * 24, 0.2) is False  # the exec still runs
    release.set()
    assert ends.from_held("k8s:" + "a" * 24, 30) is True
    assert ends.take_log("k8s:" + "a" * 24, 0, 1 << 20) == SpawnLog(4, b"real")
    assert ends.from_held("k8s:" + "a" * 24, 1) is None  # taken: the caller looks itself


def test_a_held_exec_that_broke_off_or_ended_without_its_cue_sends_the_caller_to_look() -> None:
    ends = SpawnEnds()
    release = threading.Event()
    release.set()
    ends.hold("k8s:" + "b" * 24, _held([b"up\n", ProviderError("stream closed")], release))
    ends.hold("k8s:" + "c" * 24, _held([b"up\n", b"no cue\n"], release))
    assert ends.from_held("k8s:" + "b" * 24, 30) is None
    assert ends.from_held("k8s:" + "c" * 24, 30) is None
    assert ends.from_held("k8s:" + "d" * 24, 30) is None  # never held (a restarted hub)
