"""What a run cost: wall time, CPU time, peak memory, bytes sent each way, and its phases.

The agent controls its environment, so every number here is measured from outside it: the
wall time and the phases by the hub's (or the CLI's) clock, the bytes by the hub as it serves
the input and pulls the result, CPU and memory by the provider (``wait4`` of the process it
spawned, the container's cgroup counters). A provider that cannot measure leaves the number
null and says so in ``measured_by``; nothing is estimated.

The record is kept next to the run's event log (``<store>/narrative/runs/<id>/usage.json``),
local state of the store that ran it, so ``narrative run show`` reads it after the hub is gone.
"""

from __future__ import annotations

import resource
import threading
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "ProcessUsage",
    "ReapedProcesses",
    "Sampler",
    "UsageMeter",
    "rusage_usage",
]


@dataclass(frozen=True)
class ProcessUsage:
    """CPU time and peak memory of what ran in an environment, and who measured them."""

    cpu_seconds: float | None
    peak_memory_bytes: int | None
    measured_by: str


def rusage_usage(usage: resource.struct_rusage, measured_by: str) -> ProcessUsage:
    """A process tree's usage from its ``wait4`` rusage: user + system CPU of the process and
    every descendant it waited for; the peak is the largest resident set among them (Linux
    reports ``ru_maxrss`` in KiB)."""
    return ProcessUsage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, measured_by)


class UsageMeter:
    """Measures one run in an environment, from its creation to :meth:`finish`.

    This one measures nothing (the provider cannot): its numbers are null and ``measured_by``
    says why. Providers that can measure subclass it.
    """

    samples: ClassVar[bool] = False
    """Whether :meth:`sample` does anything (else nobody need call it)."""

    def __init__(self, measured_by: str) -> None:
        self.measured_by = measured_by

    def sample(self) -> None:
        """Take one sample (called every fraction of a second while the run lasts, on a thread
        of its own: the last one may still be under way while :meth:`finish` runs)."""

    def finish(self, handle: str | None) -> ProcessUsage:
        """The usage since the meter was made; ``handle`` is the spawned process the run ran
        in, if it had one."""
        return ProcessUsage(None, None, self.measured_by)


SAMPLE_INTERVAL = 0.2
"""Seconds between two samples of a meter that samples (a peak memory read from samples)."""


class Sampler:
    """Calls a meter's :meth:`UsageMeter.sample` every :data:`SAMPLE_INTERVAL` seconds on a
    thread of its own, from :meth:`start` to :meth:`stop` (nothing for a meter that does not
    sample)."""

    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        if self.meter.samples:
            self._thread = threading.Thread(target=self._run, name="usage-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.meter.sample()

    def stop(self, wait: bool = True) -> None:
        """No sample after this; ``wait``: until the one under way (if any) has ended. A
        meter's end reading need not wait for it (the Docker daemon answers both at its next
        tick: stopping first, then finishing, cost a tick more, up to 1 s)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join()


class ReapedProcesses:
    """The rusage of spawned processes, recorded by whoever reaps them (``wait4``), kept until
    read once (a process that is never asked about is forgotten after ``limit`` others)."""

    def __init__(self, limit: int = 256) -> None:
        self._done: dict[str, resource.struct_rusage] = {}
        self._changed = threading.Condition()
        self._limit = limit

    def record(self, handle: str, usage: resource.struct_rusage) -> None:
        with self._changed:
            self._done[handle] = usage
            while len(self._done) > self._limit:
                del self._done[next(iter(self._done))]
            self._changed.notify_all()

    def take(self, handle: str, timeout: float) -> resource.struct_rusage | None:
        """The rusage of ``handle`` once it has been reaped (waiting ``timeout`` seconds at
        most); None when it was not, or was not spawned by this process."""
        with self._changed:
            self._changed.wait_for(lambda: handle in self._done, timeout)
            return self._done.pop(handle, None)
