"""Finding a command's whole process tree inside an environment by a marker in its environment.

Commands that ``docker`` and ``e2b`` start carry ``NARRATIVE_EXEC_ID=<random>`` in their
environment; children inherit it, and it survives re-parenting, new sessions and a parent's
death, so every process of a tree can be found without knowing their pids or process groups.
:data:`SIGNAL_SCRIPT` is the POSIX ``sh`` that does it inside the environment (it needs ``grep``
with ``-z``, ``kill`` and ``sleep``); :func:`signal_argv` builds its command line.

Every command of a directory environment also carries :func:`environment_marker`, one variable
per environment, so that whatever a run left behind there (a daemon, a background job) is found
and killed before the next run starts in it, whichever command started it. In a container, where
a process can drop its environment (``env -i``) but nothing else runs, :data:`SWEEP_SCRIPT`
kills every process but the container's own.
"""

from __future__ import annotations

import hashlib
from typing import Literal

__all__ = [
    "MARKER_VAR",
    "SIGNAL_SCRIPT",
    "FIND_MAIN",
    "SWEEP_SCRIPT",
    "compact",
    "environment_marker",
    "signal_argv",
    "spawn_log_in_environment",
    "sweep_argv",
]

MARKER_VAR = "NARRATIVE_EXEC_ID"
"""Set in the environment of each command so that the command and its children can be found."""


def compact(script: str) -> str:
    """``script`` without its indentation and blank lines: what travels in an exec's URL,
    where each space costs three bytes (URL lengths are bounded: the test API server at 8 KiB,
    proxies in front of real ones often too). For scripts without multi-line strings."""
    return "\n".join(line.strip() for line in script.splitlines() if line.strip()) + "\n"


def spawn_log_in_environment(marker: str) -> str:
    """Where, inside a container or pod, the output of the process spawned with ``marker``
    goes (the providers that reach in by exec: docker, k8s)."""
    return f"/tmp/narrative-spawn-{marker}.log"


# The end of both scripts below: ``{find}`` (a shell function) sets $pids; they are all stopped
# before any is killed, so that no parent reacts to a child's death (a shell would go on to
# its next command), and the round repeats until none is left (a process may fork meanwhile).
_KILL_ALL = r"""for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    {find}
    [ -n "$pids" ] || exit 0
    for pid in $pids; do kill -STOP "$pid" 2>/dev/null; done
    for pid in $pids; do kill -9 "$pid" 2>/dev/null; done
    sleep 0.05
done
exit 1
"""

# $0: the variable, $1: its value, $2: ``term`` or ``kill`` (the default). ``term`` sends
# SIGTERM once to every marked process; ``kill`` is :data:`_KILL_ALL`. Plain ``kill PID``:
# dash's builtin takes neither ``--`` nor process groups. Zombies are not matched (their
# environ reads empty).
SIGNAL_SCRIPT = compact(
    r"""
m="$0=$1"
marked() {
    pids=
    for p in /proc/[0-9]*; do
        if grep -qzxF -- "$m" "$p/environ" 2>/dev/null; then
            pids="$pids ${p#/proc/}"
        fi
    done
}
if [ "$2" = term ]; then
    marked
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null; done
    exit 0
fi
"""
    + _KILL_ALL.format(find="marked")
)


# $0: ``init`` when PID 1 is an init whose first child is the container's command, else
# ``none`` (PID 1 is the command). Kills every other process of the PID namespace but this
# script and its own children (its ``sleep``), stopping them all first and repeating until none
# is left, as SIGNAL_SCRIPT does; the command is the init's child that started first (orphans
# re-parented to the init started later). /proc/<pid>/stat after the name's ``) ``: $1 state,
# $2 parent, ${20} start time. Builtins only while scanning: a subshell would be a target.
FIND_MAIN = r"""
find_main() {
    first= main=
    for p in /proc/[0-9]*; do
        read -r line < "$p/stat" 2>/dev/null || continue
        set -- ${line##*") "}
        [ "$2" = 1 ] || continue
        if [ -z "$first" ] || [ "${20}" -lt "$first" ]; then first=${20}; main=${p#/proc/}; fi
    done
}
"""
"""A shell function that sets ``$main`` to the pid of the container's command under an init:
PID 1's child that started first (orphans re-parented to the init started later; empty when
there is none). The process every sweep spares, and a ``k8s`` pod's warm runtime."""

SWEEP_SCRIPT = compact(
    FIND_MAIN
    + r"""
self=$$
main=
[ "$0" = init ] && find_main
others() {
    pids=
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        case " 1 $self $main " in *" $pid "*) continue;; esac
        read -r line < "$p/stat" 2>/dev/null || continue
        set -- ${line##*") "}
        [ "$1" = Z ] && continue
        [ "$2" = "$self" ] && continue
        pids="$pids $pid"
    done
}
"""
    + _KILL_ALL.format(find="others")
)


def sweep_argv(init: bool) -> list[str]:
    """The command that kills every process of a container but its init and command (``init``:
    PID 1 is the daemon's init, the command its first child)."""
    return ["sh", "-c", SWEEP_SCRIPT, "init" if init else "none"]


def signal_argv(
    marker: str, sig: Literal["term", "kill"] = "kill", var: str = MARKER_VAR
) -> list[str]:
    """The command that sends ``sig`` to every process carrying ``var=marker``."""
    return ["sh", "-c", SIGNAL_SCRIPT, var, marker, sig]


def environment_marker(env_id: str) -> tuple[str, str]:
    """``(variable, value)`` set in the environment of every command run in environment
    ``env_id``. The variable's name holds the environment, so that a nested environment's
    commands carry the marker of each environment they run in (a value would be overridden)."""
    digest = hashlib.sha256(env_id.encode()).hexdigest()[:16]
    return f"NARRATIVE_ENV_{digest.upper()}", "1"
