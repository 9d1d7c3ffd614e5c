"""The warm runtime (``providers.zygote``) imports with the garbage collector off and never
collects itself; the runtime it forks for an order starts with it on, from the order's
workdir, its output in the order's log, its pid recorded and the up FIFO on fd 3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from providers.zygote import ORDER_FILE, ORDER_VERSION

REPO = Path(__file__).resolve().parents[2]

_SERVE = """
import gc, os, sys
sys.path.insert(0, sys.argv[1])
from providers.zygote import serve

def become(args):
    print("gc", gc.isenabled(), "args", " ".join(args), "cwd", os.getcwd(), flush=True)
    os.write(3, b"up\\n")
    os._exit(0)

print("parent gc", gc.isenabled(), flush=True)  # before serve: on, as in any process
serve(["json"], become)
"""


def test_a_forked_runtime_collects_garbage_and_takes_its_order(tmp_path: Path) -> None:
    work, log, up, pidfile = (tmp_path / n for n in ("work", "log", "up", "pid"))
    work.mkdir()
    os.mkfifo(up)
    parent_log = tmp_path / "parent.log"
    with parent_log.open("wb") as out:
        zygote = subprocess.Popen(
            [sys.executable, "-I", "-c", _SERVE, str(REPO)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while not _catches_usr1(zygote.pid):  # ready: SIGUSR1 caught (what the pod's shell reads)
            assert time.monotonic() < deadline and zygote.poll() is None, parent_log.read_text()
            time.sleep(0.05)
        fields = [ORDER_VERSION, str(log), "", str(up), str(pidfile), str(work), "m" * 24]
        Path(ORDER_FILE).write_bytes(b"".join(f.encode() + b"\0" for f in [*fields, "a", "b"]))
        os.kill(zygote.pid, signal.SIGUSR1)
        with open(up, "rb") as said:  # the child opens the FIFO's write end as fd 3
            assert said.readline() == b"up\n"
        assert f"gc True args a b cwd {work}" in log.read_text()
        child_pid = int(pidfile.read_text().split()[0])
        assert child_pid != zygote.pid
    finally:
        zygote.kill()
        zygote.wait()
        Path(ORDER_FILE).unlink(missing_ok=True)
    assert "parent gc True" in parent_log.read_text()


def _catches_usr1(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(
        (line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0"
    )
    return bool(int(caught, 16) & (1 << (signal.SIGUSR1 - 1)))
