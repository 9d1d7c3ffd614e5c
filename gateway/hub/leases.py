"""Environment leases: one run at a time in an environment, across every hub of a store.

A run's hub holds an exclusive ``flock`` on ``<env state dir>/lease`` for as long as it drives
the run. Two CLIs each embedding a hub, a ``narrative serve`` and a CLI, or two serves: whoever
locks first gets the environment, the other is told it is busy. The kernel drops the lock when
the holder dies, so a crashed hub never leaves an environment claimed, and the hub that adopts
its runs takes their leases again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from gateway.errors import Busy
from narrative.store import Store
from providers.records import env_state_dir

__all__ = ["EnvironmentBusy", "EnvironmentLease"]


class EnvironmentBusy(Busy):
    """Another run holds the environment."""

    def __init__(self, name: str, holder: str | None) -> None:
        by = f" with run {holder}" if holder else ""
        super().__init__(f"environment {name!r} is busy{by}")
        self.name = name
        self.holder = holder


class EnvironmentLease:
    """An exclusive claim on one environment, held by this process until :meth:`release`."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path
        self._companions: list[EnvironmentLease] = []

    def hold_too(self, other: EnvironmentLease) -> None:
        """Hold ``other`` with this lease: noted and released with it (the environments a
        hybrid environment is made of)."""
        self._companions.append(other)

    @classmethod
    def acquire(cls, store: Store, env_id: str) -> EnvironmentLease | None:
        """Claim the environment, or None when someone holds it (never waits)."""
        path = _lease_path(store, env_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd, path)

    @classmethod
    def holder(cls, store: Store, env_id: str) -> str | None:
        """The run that holds the environment's lease, as its holder wrote it (best effort)."""
        try:
            with open(_lease_path(store, env_id), encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def note(self, run_id: str) -> None:
        """Say which run holds the lease (for the message another caller gets)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, run_id.encode(), 0)
        for other in self._companions:
            other.note(run_id)

    def release(self) -> None:
        """Give the environment up, and those held with it (idempotent)."""
        companions, self._companions = self._companions, []
        for other in companions:
            other.release()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the lock


def _lease_path(store: Store, env_id: str) -> str:
    return os.path.join(env_state_dir(store, env_id), "lease")
