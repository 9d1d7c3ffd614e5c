"""Asking about processes on this machine: whether one is alive, when it started (which tells
a pid's owner from a later process that reuses the number)."""

from __future__ import annotations

import os

__all__ = ["pid_alive", "proc_stat", "process_start_time"]


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (``[0]`` is the state,
    ``[2]`` the process group, ``[19]`` the start time); None when there is no such process
    (or no /proc to ask)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such
    process (or no /proc to ask)."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None
