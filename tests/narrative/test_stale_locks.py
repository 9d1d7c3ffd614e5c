"""Ref locks left by a killed writer do not block the next writer.

Our lock files name their owner (host, boot, pid, process start time): a lock whose owner is
gone on this host is broken at once; a live owner's lock, another host's lock and git's own
(empty) lock files are respected until they are older than STALE_LOCK_SECONDS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from narrative.errors import LockTimeout
from narrative.refs import STALE_LOCK_SECONDS, RefStore, lock_owner_stamp
from narrative.store import Store

REF = "refs/narrative/threads/locked"

# Holds the ref lock forever: fsync (called while the lock is held) never returns.
_HOLDER = """
import os, sys, time
from narrative.refs import RefStore
os.fsync = lambda fd: time.sleep(3600)
RefStore(sys.argv[1]).update(sys.argv[2], bytes.fromhex(sys.argv[3]))
"""


def _lock_path(store: Store) -> Path:
    return Path(store.git_dir, *REF.split("/")).with_suffix(".lock")


def _write_lock(store: Store, content: bytes) -> None:
    path = _lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _update_takes(store: Store, timeout: float) -> float:
    oid = store.odb.write_loose("blob", b"after\n")
    started = time.monotonic()
    RefStore(store.git_dir, lock_timeout=timeout).update(REF, oid)
    assert RefStore(store.git_dir).read(REF) == oid
    assert not _lock_path(store).exists()
    return time.monotonic() - started


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_lock_of_a_sigkilled_writer_is_broken_at_once(store: Store) -> None:
    oid = store.odb.write_loose("blob", b"before\n")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, store.git_dir, REF, oid.hex()])
    try:
        deadline = time.monotonic() + 30
        while not _lock_path(store).exists():
            assert holder.poll() is None and time.monotonic() < deadline, "holder never locked"
            time.sleep(0.01)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _lock_path(store).exists()  # left behind by the kill
    assert _update_takes(store, timeout=STALE_LOCK_SECONDS / 3) < 2.0


def test_lock_naming_a_dead_or_reused_pid_is_broken_at_once(store: Store) -> None:
    magic, host, boot, pid, start = lock_owner_stamp().split()
    dead = b" ".join([magic, host, boot, str(_dead_pid()).encode(), start]) + b"\n"
    _write_lock(store, dead)
    assert _update_takes(store, timeout=5.0) < 2.0
    # our own pid, but another start time: the pid was reused, the owner is gone
    reused = b" ".join([magic, host, boot, pid, str(int(start) + 1).encode()]) + b"\n"
    _write_lock(store, reused)
    assert _update_takes(store, timeout=5.0) < 2.0


@pytest.mark.parametrize("owner", ["live", "other-host", "git-empty", "git-oid"])
def test_locks_that_cannot_be_judged_dead_wait_for_their_age(store: Store, owner: str) -> None:
    magic, _host, boot, pid, start = lock_owner_stamp().split()
    content = {
        "live": lock_owner_stamp(),
        "other-host": b" ".join([magic, b"elsewhere", boot, pid, start]) + b"\n",
        "git-empty": b"",
        "git-oid": b"ab" * 20 + b"\n",
    }[owner]
    _write_lock(store, content)
    with pytest.raises(LockTimeout):
        _update_takes(store, timeout=0.5)
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(_lock_path(store), (old, old))
    if owner == "live":  # a live owner's lock is never broken, whatever its age
        with pytest.raises(LockTimeout):
            _update_takes(store, timeout=0.5)
    else:
        _update_takes(store, timeout=5.0)
