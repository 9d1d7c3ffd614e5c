"""Emptying an environment's workspace and temporary directories between runs, by a script
run inside it (a container, a pod, a sandbox), so that nothing of one run reaches the next."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from .proctree import SWEEP_SCRIPT, compact

__all__ = [
    "EMPTY_SCRIPT",
    "SWEPT_CUE",
    "TEMP_DIRS",
    "empty_argv",
    "sweep_and_empty_argv",
    "sweep_empty_then_argv",
]

TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
"""What a run may write besides the workdir, emptied before the next run starts."""

# Empties each directory given, keeping the directory itself; the first must exist, a missing
# later one is skipped. A directory replaced by a symbolic link is refused: emptying through
# it would empty wherever it points.
EMPTY_SCRIPT = compact(r"""
[ -d "$1" ] || { echo "no directory $1" >&2; exit 1; }
for d in "$@"; do
    if [ -L "$d" ]; then echo "$d is a symbolic link" >&2; exit 1; fi
    [ -d "$d" ] || continue
    (cd -- "$d" && rm -rf -- ./* ./.[!.]* ./..?*) || exit 1
done
""")


def empty_argv(directories: Sequence[str]) -> list[str]:
    """The command that empties ``directories`` (see :data:`EMPTY_SCRIPT`)."""
    return ["sh", "-c", EMPTY_SCRIPT, "sh", *directories]


# SWEEP_SCRIPT in a subshell (a child of this shell: spared, as the sweep's own children are;
# its ``exit`` ends only the subshell), then EMPTY_SCRIPT: one round trip into an environment
# where each command is one (a pod or container exec) instead of two.
_SWEEP_AND_EMPTY_SCRIPT = "(" + SWEEP_SCRIPT + ") || exit 1\n" + EMPTY_SCRIPT


def sweep_and_empty_argv(init: bool, directories: Sequence[str]) -> list[str]:
    """The command that kills every process of a container but its own (as
    :func:`~providers.proctree.sweep_argv`), then empties ``directories`` (as
    :func:`empty_argv`)."""
    return ["sh", "-c", _SWEEP_AND_EMPTY_SCRIPT, "init" if init else "none", *directories]


SWEPT_CUE = "narrative: swept"
"""The line :func:`sweep_empty_then_argv` prints once nothing of an earlier run is left: the
moment from which a secret meant for the next run may be handed into the environment (any
earlier, a process the last run left could read it before the sweep kills it)."""


def sweep_empty_then_argv(init: bool, directories: Sequence[str], then: Sequence[str]) -> list[str]:
    """As :func:`sweep_and_empty_argv`, then prints :data:`SWEPT_CUE` and runs ``then`` in the
    same process (``exec``): what readies an environment for a run and starts its runtime in
    one round trip. The sweep runs in a subshell of that process, so it spares the process."""
    empty = " ".join(shlex.quote(a) for a in empty_argv(directories))
    cue = shlex.quote(SWEPT_CUE)
    script = f'({SWEEP_SCRIPT}) || exit 1\n{empty} || exit 1\necho {cue}\nexec "$@"\n'
    return ["sh", "-c", script, "init" if init else "none", *then]
