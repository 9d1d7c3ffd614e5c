"""How much a run in a container of the ``docker`` provider used: its cgroup counters."""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from ..usage import ProcessUsage, UsageMeter
from .client import SDK_ERRORS

__all__ = ["CgroupMeter"]

log = logging.getLogger(__name__)


class CgroupMeter(UsageMeter):
    """The container's cgroup counters, read through the Engine API from outside it: CPU
    time as the difference from the meter's start, peak memory as the largest of the samples
    (the kernel's own peak covers the container's whole life, not one run); memory excludes
    the inactive page cache, as ``docker stats`` does."""

    samples: ClassVar[bool] = True

    def __init__(self, api: Any, container: str, measured_by: str) -> None:
        super().__init__(measured_by)
        self._api, self._container = api, container
        self._peak: int | None = None
        self._lock = threading.Lock()  # the sampler's last sample may overlap finish()
        self._cpu_start = self._read()

    def _read(self) -> int | None:
        """One sample: the memory in use now (kept if the largest), and the CPU nanoseconds
        used so far."""
        try:
            stats = self._api.stats(self._container, stream=False, one_shot=True)
        except SDK_ERRORS as exc:
            log.info("cannot read the stats of %s: %s", self._container, exc)
            return None
        memory = stats.get("memory_stats") or {}
        usage = memory.get("usage")
        if isinstance(usage, int):
            inner = memory.get("stats") or {}
            cache = inner.get("total_inactive_file", inner.get("inactive_file", 0))
            used = usage - cache if isinstance(cache, int) and cache <= usage else usage
            with self._lock:
                self._peak = max(self._peak or 0, used)
        total = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        return total if isinstance(total, int) else None

    def sample(self) -> None:
        self._read()

    def finish(self, handle: str | None) -> ProcessUsage:
        end = self._read()
        start = self._cpu_start
        cpu = (end - start) / 1e9 if end is not None and start is not None else None
        with self._lock:
            return ProcessUsage(cpu, self._peak, self.measured_by)
