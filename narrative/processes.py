"""Asking about processes on this machine: whether one is alive, when it started (which tells
a pid's owner from a later process that reuses the number)."""

from __future__ import annotations

import os

__all__ = ["pid_alive", "process_start_time"]


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such
    process (or no /proc to ask)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after the last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None
