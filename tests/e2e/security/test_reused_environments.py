"""Reused environments (issue 13, clarification "Reused environments"): between two runs in one
environment, the processes the first left are killed and the checkout is reset to the next
run's input; nothing of one run is visible to the next.

Driven through the real CLI, directly (``narrative run start --direct``) and through the hub
(``narrative run start``), for ``worktree`` and ``local`` in their sandbox, ``worktree`` with
``sandbox=none`` and ``docker`` on the private engine. Run 1's agent leaves a ``sleep 1000``
job, a daemonised python that appends to ``canary-<tag>.log`` every 100 ms, an untracked and an
ignored file, a file in its temp dir and a symlink ``src -> <outside dir>`` in place of the
tracked ``src/``; in a sandbox or container also a loop that dropped its environment (``env -i``)
and its session (without a sandbox such a process is out of reach: docs/security.md). Run 2's
agent, in the same environment, lists what it finds: exactly the base's files, no canary (it
would grow), no such process, nothing in its temp dir; the user's workspace and the outside
directory are untouched.

The negative controls run the same two runs with the reset disabled (the CLI's
``prepare_run`` patched back to a plain restore and ``start_runtime`` to a plain spawn,
through a ``sitecustomize`` on its ``PYTHONPATH``) and show run 2 seeing what run 1 left, so
the test can fail.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from narrative.errors import NarrativeError
from narrative.restore import materialize, materialize_confined
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import Cli, git, tree_bytes
from tests.e2e.security.conftest import ISOLATED_PROVIDERS, env_create_args
from tests.e2e.security.test_sandbox import digest

# two runs through the hub per case on every provider, about 75 s in all: run by
# `make test-long` (and CI), to keep `make test` under ten minutes
pytestmark = pytest.mark.long

DAEMON = textwrap.dedent(
    """
    import os, sys, time
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    for fd in (0, 1, 2):
        os.close(fd)
    while True:
        with open(sys.argv[1], "a") as f:
            f.write("alive\\n")
        time.sleep(0.1)
    """
)

AGENT_1 = r"""
rm -rf src && ln -s "$OUTSIDE" src
echo untracked > untracked.txt
echo ignored > build.log
echo temp > "${TMPDIR:-/tmp}/run1-temp.txt"
sleep "1000.$TAG" </dev/null >/dev/null 2>&1 &
python3 -c "$DAEMON" "canary-$TAG.log"
if [ "$ESCAPE" = 1 ]; then
    # a process that drops its whole environment (and any marker in it) and its session
    setsid env -i sh -c 'while :; do echo escaped >> "$0"; sleep 0.1; done' "canary-$TAG.log" \
        </dev/null >/dev/null 2>&1 &
fi
sleep 0.3
echo "AGENT1 done"
"""

# Run 1's processes are told by $TAG in their command lines (this script's own holds "$TAG").
AGENT_2 = r"""
for f in $(ls -A); do echo "LIST $f"; done
if [ -d src ] && [ ! -L src ]; then echo "SRC dir"; fi
canary="canary-$TAG.log"
a=$(cat "$canary" 2>/dev/null | wc -l)
sleep 0.5
b=$(cat "$canary" 2>/dev/null | wc -l)
echo "CANARY $a $b"
n=0
for p in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
    case "$c" in *"sleep 1000.$TAG"*|*"$canary"*) n=$((n + 1));; esac
done
echo "PROCS $n"
for f in $(ls -A "${TMPDIR:-/tmp}"); do echo "TMP $f"; done
"""

BASE_FILES = {".gitignore", "README.md", "src"}

# Leaves everything as it was before the fix: the direct run's provider restore, and for a run
# through the hub nothing (its runtime restores the input).
NO_RESET = textwrap.dedent(
    """
    import os
    if os.environ.pop("REUSE_TEST_NO_RESET", None) == "1":
        from providers.manager import EnvironmentManager

        def prepare_run(self, name, snapshot):
            _record, provider, resource = self.require_active(name)
            if snapshot is not None:
                provider.restore(resource, snapshot)

        def start_runtime(self, name, argv, env):
            return self.spawn(name, argv, env=env, runtime=True)

        EnvironmentManager.prepare_run = prepare_run
        EnvironmentManager.start_runtime = start_runtime
    """
)

KINDS = [*ISOLATED_PROVIDERS, "worktree-nosandbox"]
"""Every isolated provider, and the negative control of a worktree without its sandbox."""


@pytest.fixture
def no_reset(tmp_path: Path) -> dict[str, str]:
    """Environment variables for a CLI whose reset between runs is disabled."""
    site = tmp_path / "no-reset-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_RESET)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "REUSE_TEST_NO_RESET": "1"}


def _tagged_pids(tag: str) -> list[int]:
    """This machine's processes with ``tag`` in their command line (run 1's leftovers, in a
    sandbox or a container on the local engine too)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
            if tag.encode() in f.read():
                found.append(int(name))
    return found


@pytest.fixture
def tag() -> Iterator[str]:
    """In the command line of each process run 1 leaves; whatever carries it is killed
    afterwards (a negative control leaves them running)."""
    value = str(uuid.uuid4().int % 10**12)
    yield value
    for pid in _tagged_pids(value):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _environment(cli: Cli, tmp_path: Path, kind: str, hub: bool, request: Any) -> None:
    """Environment ``box`` of ``kind``, as users get it (the same for a direct run and one
    through the hub: a container's runtime is this checkout, mounted read-only)."""
    if kind == "worktree-nosandbox":
        args = ["--provider", "worktree", "--config", "sandbox=none"]
    else:
        args = env_create_args(request, kind, tmp_path)
    cli.run("env", "create", "box", *args)
    if kind == "docker":
        request.addfinalizer(lambda: cli.run("env", "delete", "box", check=False))


def _run(cli: Cli, hub: bool, script: str, env: dict[str, str]) -> list[str]:
    mode = [] if hub else ["--direct"]
    proc = cli.run("run", "start", *mode, "--env", "box", "--", "sh", "-c", script, env=env)
    return (proc.stdout + proc.stderr).splitlines()


def _exports(variables: dict[str, str]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in variables.items())


def two_runs(
    cli: Cli, workspace: Path, tmp_path: Path, kind: str, hub: bool, request: Any, **extra: str
) -> dict[str, Any]:
    """Run 1's agent leaves what it can, run 2's reports what it sees; with the checks on
    everything outside the environment."""
    (workspace / ".gitignore").write_text("*.log\n")
    git("init", "-q", cwd=workspace)
    git("add", "-A", cwd=workspace)
    git("commit", "-qm", "user's work", cwd=workspace)
    cli.run("init")
    _environment(cli, tmp_path, kind, hub, request)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's\n")
    before = (digest(tree_bytes(workspace)), digest(tree_bytes(outside)))
    # without a sandbox, TMPDIR is the user's: here one of the test's own
    temp = tmp_path / "user-tmp"
    temp.mkdir()
    extra = {**extra, "TMPDIR": str(temp)}
    # in the script itself: a container's commands do not see the caller's environment
    tag = {"TAG": request.getfixturevalue("tag")}
    given = {
        **tag,
        "OUTSIDE": str(outside),
        "DAEMON": DAEMON,
        "ESCAPE": "0" if kind == "worktree-nosandbox" else "1",
    }
    first = _run(cli, hub, _exports(given) + AGENT_1, extra)
    assert "AGENT1 done" in first, first
    seen = _run(cli, hub, _exports(tag) + AGENT_2, extra)
    report: dict[str, Any] = {
        "files": {line[5:] for line in seen if line.startswith("LIST ")} - {".narrative"},
        "src_dir": "SRC dir" in seen,
        "temp": {line[4:] for line in seen if line.startswith("TMP ")},
    }
    canary = next(line for line in seen if line.startswith("CANARY "))
    report["canary"] = tuple(int(n) for n in canary.split()[1:])
    report["procs"] = int(next(line for line in seen if line.startswith("PROCS ")).split()[1])
    report["outside_same"] = digest(tree_bytes(outside)) == before[1]
    report["workspace_same"] = digest(tree_bytes(workspace)) == before[0]
    return report


@pytest.mark.parametrize("hub", [False, True], ids=["direct", "hub"])
@pytest.mark.parametrize("kind", KINDS)
def test_nothing_of_one_run_reaches_the_next(
    cli: Cli, workspace: Path, tmp_path: Path, kind: str, hub: bool, request: Any
) -> None:
    seen = two_runs(cli, workspace, tmp_path, kind, hub, request)
    assert seen["files"] == BASE_FILES, seen
    assert seen["src_dir"], seen
    assert seen["canary"] == (0, 0), seen
    assert seen["procs"] == 0, seen
    if kind != "worktree-nosandbox":  # without a sandbox, the temp dir is the user's own
        assert "run1-temp.txt" not in seen["temp"], seen
    assert seen["outside_same"] and seen["workspace_same"], seen
    # nothing of run 1 runs on this machine either (the sandbox=none case)
    time.sleep(0.3)
    assert _tagged_pids(request.getfixturevalue("tag")) == []


# Where something of run 1 reached run 2 before the reset: through the hub every provider kept
# the ignored files (its runtime restores over them); without a sandbox, or in a container,
# run 1's processes and temp files survived.
NEGATIVE = [
    ("worktree", True),
    ("local", True),
    ("worktree-nosandbox", False),
    ("worktree-nosandbox", True),
    ("docker", False),
    ("docker", True),
]


@pytest.mark.parametrize(
    ("kind", "hub"), NEGATIVE, ids=[f"{k}-{'hub' if h else 'direct'}" for k, h in NEGATIVE]
)
def test_negative_control_without_the_reset_run_2_sees_run_1(
    cli: Cli,
    workspace: Path,
    tmp_path: Path,
    kind: str,
    hub: bool,
    request: Any,
    no_reset: dict[str, str],
) -> None:
    seen = two_runs(cli, workspace, tmp_path, kind, hub, request, **no_reset)
    leaked = (
        seen["files"] != BASE_FILES
        or seen["canary"] != (0, 0)
        or seen["procs"] != 0
        or "run1-temp.txt" in seen["temp"]
    )
    assert leaked, seen


def _swap_in_symlinks(target: Path, outside: Path, stop: threading.Event) -> None:
    """What a process of the previous run would do while the checkout is restored: move the
    freshly created ``src`` away and put a symlink to ``outside`` in its place."""
    n = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            os.rename(target / "src", target / f"moved-{n}")
            os.symlink(outside, target / "src")
            n += 1


def _restore_under_attack(
    store: Store, tmp_path: Path, restore: Callable[[Store, Any, str], Any], attempts: int
) -> list[str]:
    """Restore a snapshot with many files under ``src/`` into fresh directories while
    ``src`` is swapped for a symlink; what landed in the outside directory."""
    src = Path(store.workspace) / "src"
    for i in range(300):
        (src / f"f{i}.py").write_text(f"x = {i}\n")
    snapshot = take_snapshot(store, message="input").snapshot
    outside = tmp_path / "outside"
    outside.mkdir()
    for attempt in range(attempts):
        target = tmp_path / f"target-{attempt}"
        target.mkdir()
        stop = threading.Event()
        swapper = threading.Thread(target=_swap_in_symlinks, args=(target, outside, stop))
        swapper.start()
        try:
            restore(store, snapshot, str(target))
        except (NarrativeError, OSError):
            pass  # refused part way: what matters is where the files went
        finally:
            stop.set()
            swapper.join()
        if os.listdir(outside):
            break
    return sorted(os.listdir(outside))


def test_restore_into_a_checkout_never_follows_a_planted_symlink(
    store: Store, tmp_path: Path
) -> None:
    assert _restore_under_attack(store, tmp_path, materialize_confined, attempts=20) == []


def test_negative_control_a_plain_restore_follows_the_planted_symlink(
    store: Store, tmp_path: Path
) -> None:
    assert _restore_under_attack(store, tmp_path, materialize, attempts=20) != []
