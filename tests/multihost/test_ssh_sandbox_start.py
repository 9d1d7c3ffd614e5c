"""A sandbox that bwrap fails to set up on an SSH host: the command never ran, so it is started
again (the ``ssh`` provider's side of tests/providers/test_sandbox_start.py).

bwrap fails now and then while the host's mounts change (bubblewrap issue 650). Here the box's
``bwrap`` is replaced, in the box's own mount namespace, by a script that fails while
``/tmp/bwrap-failures`` holds a number above zero, exactly as bwrap does (its message on
stderr, exit 1, nothing run), counting it down, and runs the real one otherwise; each call is
a line of ``/tmp/bwrap-calls``. The provider runs on ``dev`` (this checkout), as the contract
tests do: each test is one script there, whose findings come back as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Network, make_ssh_key
from tests.multihost.ssh_hosts import Lab, make_lab

_MESSAGE = "bwrap: Can't bind mount /oldroot/ on /newroot/: Unable to apply mount flags"

_FAKE_BWRAP = f"""#!/bin/sh
echo call >> /tmp/bwrap-calls
left=$(cat /tmp/bwrap-failures 2>/dev/null || echo 0)
if [ "$left" -gt 0 ]; then
    echo $((left - 1)) > /tmp/bwrap-failures
    echo "{_MESSAGE}: remount \\"/newroot/run/netns/x\\": Invalid argument" >&2
    exit 1
fi
exec /run/real-bwrap "$@"
"""

_INSTALL = """set -e
touch /run/real-bwrap /run/fake-bwrap
mount --bind /usr/bin/bwrap /run/real-bwrap
cat > /run/fake-bwrap
chmod 755 /run/fake-bwrap
mount --bind /run/fake-bwrap /usr/bin/bwrap
"""
"""Run on the box as root, in its mount namespace only: the real bwrap stays reachable at
/run/real-bwrap, and the fake takes its place for every caller (login shell, env, setsid)."""

_SETUP = """
import json, logging, sys, time
from narrative.ids import new_id
from narrative.store import Store
from providers.base import ProviderContext
from providers.errors import ExecFailed, SandboxUnavailable
from providers.ssh.config import SSHConfig
from providers.ssh.provider import SSHProvider

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
logging.getLogger("asyncssh").setLevel(logging.WARNING)
config = SSHConfig(**json.loads(sys.argv[1]))
store = Store.init(sys.argv[2])
provider = SSHProvider(ProviderContext(store, "owner-test", new_id("environment"), "b"), config)
out = {}

def fail(n):
    '''The box's bwrap fails its next n calls; its calls are counted from here.'''
    provider.session.check(f"echo {n} > /tmp/bwrap-failures && : > /tmp/bwrap-calls", "fail")

def calls():
    return len(provider.session.check("cat /tmp/bwrap-calls", "calls").splitlines())

def wait_for(predicate):
    deadline = time.monotonic() + 20
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)

fail(0)
rid = provider.create()
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A developer machine and a box with the failing bwrap."""
    require_namespaces()
    key = make_ssh_key(tmp_path_factory.mktemp("key") / "id_ed25519")
    no_wheels = tmp_path_factory.mktemp("no-wheels")  # the runtime is configured: none needed
    with Network("sshstart") as network:
        lab = make_lab(network, key, no_wheels)
        lab.box.run(["sh", "-c", _INSTALL], as_user=False, input=_FAKE_BWRAP.encode())
        yield lab


def _run(lab: Lab, name: str, body: str) -> tuple[dict[str, Any], str]:
    """``body`` run on dev after :data:`_SETUP` (``provider``: an ssh provider for the box,
    ``rid``: its environment, deleted after): what it put in ``out``, and what it logged."""
    settings = {**lab.settings(), "runtime": ["true"]}
    del settings["wheelhouse"]
    workspace = f"{lab.dev.home}/{name}"
    lab.dev.run(["mkdir", "-p", workspace])
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    script = (
        f"{_SETUP}try:\n{indented}\nfinally:\n    provider.delete(rid)\nprint(json.dumps(out))\n"
    )
    done = lab.dev.run(
        [lab.dev.python(), "-c", script, json.dumps(settings), workspace],
        env=lab.dev.checkout_env(),
        check=False,
        timeout=240,
    )
    logged = done.stderr.decode(errors="replace")
    assert done.returncode == 0, logged[-3000:]
    return json.loads(done.stdout.decode().splitlines()[-1]), logged


def test_an_exec_whose_sandbox_failed_to_start_is_run_again(lab: Lab) -> None:
    """Its output and exit status are the command's alone (streamed too: nothing of bwrap's);
    it ran once; each failed attempt was logged with bwrap's reason."""
    out, logged = _run(
        lab,
        "exec",
        """
fail(2)
seen = []
done = provider.exec(
    rid,
    ["sh", "-c", "echo ran >> runs.txt; echo out; echo err >&2; exit 3"],
    on_output=lambda stream, chunk: seen.append([stream, chunk.decode()]),
)
out["calls"] = calls()
out["result"] = [done.exit_code, done.stdout.decode(), done.stderr.decode(), done.timed_out]
out["streamed"] = seen
out["runs"] = provider.exec(rid, ["cat", "runs.txt"]).stdout.decode()
procs = f"~/.narrative/envs/{rid[4:]}/procs"
out["procs"] = provider.session.check(f"ls -A {procs}", "listing procs").decode().split()
""",
    )
    assert out["result"] == [3, "out\n", "err\n", False], out
    assert out["procs"] == [], out  # nothing left of the attempts
    for name, text in (("stdout", "out\n"), ("stderr", "err\n")):
        assert "".join(chunk for stream, chunk in out["streamed"] if stream == name) == text, out
    assert out["runs"] == "ran\n"  # once: the failed attempts never ran it
    assert out["calls"] == 3
    assert logged.count("did not start: " + _MESSAGE) == 2, logged


def test_a_spawn_whose_sandbox_failed_to_start_is_started_again(lab: Lab) -> None:
    """The handle names the process that runs: it is alive, its log holds its output (and
    nothing of bwrap's), a signal ends it; without a log path its output goes nowhere."""
    out, logged = _run(
        lab,
        "spawn",
        """
fail(2)
handle = provider.spawn(rid, ["sh", "-c", "echo up; exec sleep 60"], log_path="spawn.log")
out["calls"] = calls()
wait_for(lambda: b"up" in provider.read_spawn_log(rid, handle).data)
out["log"] = provider.read_spawn_log(rid, handle).data.decode()
out["alive"] = provider.alive(rid, handle)
provider.signal(rid, handle, "kill")
wait_for(lambda: not provider.alive(rid, handle))
fail(1)
quiet = provider.spawn(rid, ["sh", "-c", "echo said; echo ran >> quiet.txt; exec sleep 60"])
out["quiet_calls"] = calls()
wait_for(lambda: provider.exec(rid, ["test", "-e", "quiet.txt"]).exit_code == 0)
out["quiet_alive"] = provider.alive(rid, quiet)
out["quiet_runs"] = provider.exec(rid, ["cat", "quiet.txt"]).stdout.decode()
procs = f"~/.narrative/envs/{rid[4:]}/procs"
out["procs"] = provider.session.check(f"ls -A {procs}", "listing procs").decode().split()
out["handle"] = handle
provider.signal(rid, quiet, "kill")
""",
    )
    assert (out["calls"], out["quiet_calls"]) == (3, 2), out
    assert out["log"] == "up\n", out  # its output only: nothing of the failed attempts
    assert out["alive"] and out["quiet_alive"], out
    assert out["quiet_runs"] == "ran\n", out
    marker = out["handle"].rsplit(":", 1)[1]
    assert out["procs"] == [f"{marker}.log"], out  # the quiet one's output went nowhere
    assert logged.count("did not start: " + _MESSAGE) == 3, logged


_HOSTILE = (
    # looks like a sandbox bwrap failed to set up: closes its standard output and every other
    # descriptor it may hold, writes bwrap's message wherever it can (its standard error,
    # bwrap's init's), empties its workspace and /tmp
    'exec >&-; for fd in 3 4 5 6 7 8 9; do eval "exec $fd>&-"; done; '
    '{ echo "$0" > /proc/1/fd/2; } 2>/dev/null; '
    'rm -rf ./* ./.[!.]* /tmp/* 2>/dev/null; echo "$0" >&2; '
)


def test_a_command_that_fails_once_started_is_not_run_again(lab: Lab) -> None:
    """Whatever a started command does (prints bwrap's message and exits 1 as bwrap does, or
    with the status of a command line that could not run it, closes its descriptors, writes to
    bwrap's standard error, empties its workspace and /tmp, kills every process it sees), it
    ran once and its status is its own; so for a spawned one."""
    out, logged = _run(
        lab,
        "started",
        f"""
hostile = {_HOSTILE!r}
commands = {{
    "once": "echo ran >> runs.txt; echo \\"$0\\" >&2; exit 1",
    "exit 1": hostile + "exit 1",
    "exit 127": hostile + "exit 127",
    "exit 237": hostile + "exit 237",
    "kill all": hostile + "kill -KILL -1 2>/dev/null; kill -KILL $$",
}}
for name, command in commands.items():
    fail(0)
    done = provider.exec(rid, ["sh", "-c", command, {_MESSAGE!r}])
    out[name] = [done.exit_code, done.stderr.decode(), calls()]
    if name == "once":
        out["runs"] = provider.exec(rid, ["cat", "runs.txt"]).stdout.decode()
fail(0)
spawned = provider.spawn(rid, ["sh", "-c", hostile + "exit 1", {_MESSAGE!r}], log_path="l")
wait_for(lambda: not provider.alive(rid, spawned))
out["spawn"] = [provider.read_spawn_log(rid, spawned).data.decode(), calls()]
""",
    )
    assert out["once"] == [1, _MESSAGE + "\n", 1], out
    assert out["runs"] == "ran\n", out
    for name, status in (("exit 1", 1), ("exit 127", 127), ("exit 237", 237), ("kill all", 137)):
        exit_code, stderr, calls = out[name]
        assert (exit_code, calls) == (status, 1) and _MESSAGE in stderr, out
    assert out["spawn"] == [_MESSAGE + "\n", 1], out
    assert "did not start" not in logged, logged


def test_a_sandbox_that_never_starts_is_an_error_naming_bwraps_reason(lab: Lab) -> None:
    """After five attempts: ExecFailed with bwrap's message, for an exec and for a spawn."""
    out, _logged = _run(
        lab,
        "never",
        """
fail(100)
for call in ("exec", "spawn"):
    try:
        getattr(provider, call)(rid, ["sh", "-c", "echo ran >> runs.txt"])
        out[call] = ["no error", calls()]
    except ExecFailed as exc:
        out[call] = [str(exc), calls()]
    fail(100)
fail(0)
out["runs"] = provider.exec(rid, ["ls", "-A"]).stdout.decode()
""",
    )
    for call in ("exec", "spawn"):
        error, calls = out[call]
        assert "its sandbox did not start (5 times)" in error and _MESSAGE in error, out
        assert calls == 5, out
    assert out["runs"] == "", out  # never ran


def test_creating_survives_a_failing_sandbox_check(lab: Lab) -> None:
    """The check that the host has a working bwrap is tried again when bwrap fails (once
    here); a bwrap that keeps failing still refuses the environment."""
    out, logged = _run(
        lab,
        "check",
        """
for failures, name in ((1, "once"), (100, "always")):
    fail(failures)
    try:
        SSHProvider.check_config(config)
        out[name] = ["no error", calls()]
    except SandboxUnavailable as exc:
        out[name] = [str(exc), calls()]
""",
    )
    assert out["once"] == ["no error", 2], out
    assert "bwrap did not set a sandbox up: " + _MESSAGE in logged, logged
    error, calls = out["always"]
    assert "no working bubblewrap" in error and _MESSAGE in error and calls == 5, out
