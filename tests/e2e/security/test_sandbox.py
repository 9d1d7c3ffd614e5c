"""Attack 7 of issue 13: an agent in a ``worktree`` or ``local`` environment runs in a
bubblewrap sandbox, and one in a Docker environment in a container without a network; the
same attacks run against all three. Driven through the real CLI and hub (``narrative env create``,
``narrative run start --env box -- sh -c ...``), an agent that really tries reads a fake
``~/.ssh/id_rsa``, the store and the gateway key, writes into the user's workspace (and its
``.git``), the store and a directory under /tmp outside its checkout, and reads the runtime's
token from ``/proc/*/environ``: every attempt fails, the user's files and the store's are
byte-identical afterwards, and no canary appears. The negative control (``sandbox=none``) shows
the same agent succeeding, so the test can fail.

Where ``bwrap`` is missing the sandboxed tests skip, unless ``NARRATIVE_REQUIRE_SANDBOX=1``
(CI), where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from gateway.hub.server import control_token
from narrative.store import Store
from providers.keys import key_path
from tests.conftest import Cli, git, tree_bytes
from tests.e2e.security.conftest import env_create_args, over_isolated_providers
from tests.gateway.hub.hub_support import check_loopback_isolation

HAVE_BWRAP = shutil.which("bwrap") is not None
REQUIRE_SANDBOX = os.environ.get("NARRATIVE_REQUIRE_SANDBOX") == "1"
FAKE_KEY = "-----BEGIN FAKE PRIVATE KEY----- do-not-leak -----END FAKE PRIVATE KEY-----\n"
ATTACKS = (
    "ssh_key",
    "store_read",
    "gateway_key",
    "workspace_write",
    "git_config_write",
    "store_write",
    "tmp_write",
    "runtime_environ",
)

#: The agent: each attempt prints ``ATTACK <name> SUCCEEDED`` only when it got what it wanted.
AGENT = r"""
attempt() {
    name=$1; shift
    if out=$("$@" 2>/dev/null) && [ -n "$out" ]; then
        echo "ATTACK $name SUCCEEDED"
    else
        echo "ATTACK $name denied"
    fi
}
attempt ssh_key grep -F do-not-leak "$SSH_KEY"
attempt store_read cat "$STORE/HEAD"
attempt gateway_key sh -c 'od -An -tx1 "$0" | head -c 64' "$KEY"
attempt workspace_write sh -c 'echo pwned > "$0/CANARY" && echo written' "$WS"
attempt git_config_write sh -c 'echo "[core] fsmonitor=x" >> "$0/.git/config" && echo ok' "$WS"
attempt store_write sh -c 'echo pwned > "$0/CANARY" && echo written' "$STORE"
attempt tmp_write sh -c 'echo pwned > "$0/CANARY" && echo written' "$OUTSIDE"
attempt runtime_environ sh -c 'cat /proc/[0-9]*/environ | tr "\0" "\n" | grep ^NARRATIVE_TOKEN='
echo "agent finished" > inside.txt
"""


@pytest.fixture
def sandbox_required() -> None:
    if not HAVE_BWRAP:
        if REQUIRE_SANDBOX:
            pytest.fail("bwrap is missing and NARRATIVE_REQUIRE_SANDBOX=1")
        pytest.skip("bwrap (bubblewrap) is not installed")


def store_files(store_dir: Path) -> dict[str, bytes]:
    """The store's files a run has no business changing (objects, refs and the hub's run
    records change legitimately: the run is recorded)."""
    recorded = ("objects", "refs", "narrative", "logs", "packed-refs", "index")
    files = tree_bytes(store_dir)
    return {k: v for k, v in files.items() if k.split(os.sep)[0] not in recorded}


def digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()


def user_files(workspace: Path) -> str:
    """Digest of the user's workspace, ``.git`` included (the store, when it lives inside,
    is checked by :func:`store_files`)."""
    files = tree_bytes(workspace)
    return digest({k: v for k, v in files.items() if not k.startswith(".narrative")})


def attack(cli: Cli, workspace: Path, tmp_path: Path, env_args: list[str]) -> dict[str, str]:
    """Create environment ``box`` and run the agent there through the hub; what each attempt
    achieved, and the checks on everything outside the environment."""
    home = Path(os.environ["HOME"])
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "id_rsa").write_text(FAKE_KEY)
    git("init", "-q", cwd=workspace)
    git("add", "-A", cwd=workspace)
    git("commit", "-qm", "user's work", cwd=workspace)
    cli.run("init")
    store = Store.open(workspace=str(workspace))
    store_dir = Path(store.git_dir)
    key = Path(key_path(store))
    outside = tmp_path / "outside"
    outside.mkdir()
    cli.run("env", "create", "box", *env_args)
    control_token(store, "test")  # creates the gateway key: there must be one to steal
    before = (user_files(workspace), digest(store_files(store_dir)))
    targets = {
        "SSH_KEY": str(home / ".ssh" / "id_rsa"),
        "STORE": str(store_dir),
        "KEY": str(key),
        "WS": str(workspace),
        "OUTSIDE": str(outside),
    }
    # written into the script: the user's environment variables do not reach a container
    prelude = "".join(f"{name}={shlex.quote(value)}\n" for name, value in targets.items())
    command = ["run", "start", "--env", "box", "--json", "--", "sh", "-c", prelude + AGENT]
    proc = cli.run(*command, check=False)
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded", proc.stderr
    results = {}
    for line in proc.stderr.splitlines():
        if line.startswith("ATTACK "):
            _, name, outcome = line.split()
            results[name] = outcome
    assert sorted(results) == sorted(ATTACKS), proc.stderr
    after = (user_files(workspace), digest(store_files(store_dir)))
    results["_workspace_same"] = str(before[0] == after[0])
    results["_store_same"] = str(before[1] == after[1])
    canaries = (workspace / "CANARY", store_dir / "CANARY", outside / "CANARY")
    results["_canaries"] = " ".join(str(p) for p in canaries if p.exists())
    diff = cli.run("diff", run["id"], "--name-status").stdout
    results["_result_written"] = str("inside.txt" in diff)
    return results


@over_isolated_providers
def test_an_agent_in_its_environment_reaches_nothing_outside_its_checkout(
    provider: str, request: pytest.FixtureRequest, cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    """Every provider as users get it: worktree and local sandboxed (the default), Docker."""
    isolated_env = env_create_args(request, provider, tmp_path)
    results = attack(cli, workspace, tmp_path, isolated_env)
    denied = set(ATTACKS)
    if "docker" in isolated_env:
        # the agent shares the container and its uid with the runtime, so it can read the
        # runtime's token; that token is worth nothing beyond this run (test_tokens.py)
        denied.discard("runtime_environ")
    assert {name: results[name] for name in denied} == dict.fromkeys(denied, "denied"), results
    assert results["_workspace_same"] == "True" and results["_store_same"] == "True", results
    assert results["_canaries"] == "", results
    assert results["_result_written"] == "True", results  # its own checkout stays writable


@pytest.mark.parametrize("provider", ["worktree", "local"])
def test_negative_control_without_the_sandbox_every_attack_succeeds(
    cli: Cli, workspace: Path, tmp_path: Path, provider: str
) -> None:
    config = ["--provider", provider, "--config", "sandbox=none"]
    if provider == "local":
        config += ["--config", f"path={tmp_path / 'local-env'}"]
    results = attack(cli, workspace, tmp_path, config)
    succeeded = {name for name in ATTACKS if results[name] == "SUCCEEDED"}
    expected = set(ATTACKS)
    if os.geteuid() != 0 or not Path("/proc/self/environ").exists():
        # the runtime is non-dumpable: only root (CAP_SYS_PTRACE) reads its environ unsandboxed
        expected.discard("runtime_environ")
    assert succeeded >= expected, results
    assert results["_workspace_same"] == "False" and results["_store_same"] == "False", results
    assert results["_canaries"], results


def test_sandbox_none_is_shown_as_a_warning(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    created = cli.run("env", "create", "open", "--provider", "worktree", "--config", "sandbox=none")
    assert "warning: no sandbox" in created.stderr
    shown = cli.json("env", "show", "open")
    assert shown["warnings"] and "no sandbox" in shown["warnings"][0]
    assert "warning: no sandbox" in cli.run("env", "show", "open").stdout
    if HAVE_BWRAP:
        cli.run("env", "create", "boxed", "--provider", "worktree")
        assert cli.json("env", "show", "boxed")["warnings"] == []


def test_without_bwrap_env_create_refuses_and_says_how_to_install(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    """``bwrap`` hidden from PATH: creating a sandboxed environment fails with the install
    hint; with ``sandbox=none`` it works."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir)}
    cli.run("init")
    refused = cli.run("env", "create", "box", "--provider", "worktree", env=env, check=False)
    assert refused.returncode == 1
    assert "apt-get install bubblewrap" in refused.stderr and "sandbox=none" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert cli.items("env", "list", "--all") == []  # refused before anything was recorded
    cli.run("env", "create", "open", "--provider", "worktree", "--config", "sandbox=none", env=env)


def test_network_none_runs_through_the_hub_but_cannot_reach_host_loopback(
    sandbox_required: None, cli: Cli, workspace: Path
) -> None:
    """``network=none``: the sandbox has only a loopback of its own, the run still goes through
    the hub (its runtime dials the unix socket bound into the sandbox), and the agent cannot
    connect to a server on the host's 127.0.0.1. The negative control (``network=host``, the
    default) reaches that server, so the probe can fail."""
    cli.run("init")
    cli.run("env", "create", "offline", "--provider", "worktree", "--config", "network=none")
    cli.run("env", "create", "online", "--provider", "worktree")
    links = cli.run("env", "exec", "offline", "--", "cat", "/proc/net/dev")
    assert "lo:" in links.stdout and "eth" not in links.stdout and "veth" not in links.stdout
    command = ["run", "start", "--env", "offline", "--direct", "--", "sh", "-c", "echo > a.txt"]
    direct = cli.run(*command, check=False)
    assert direct.returncode == 0, direct.stderr
    spawned = check_loopback_isolation(cli, workspace, "offline", "online")
    assert any(arg.startswith("ws+unix:///") for arg in spawned["argv"]), spawned
