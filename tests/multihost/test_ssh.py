"""The ``ssh`` provider between hosts: the contract suite, a run through the tunnel with the
runtime installed from the wheelhouse, and host-key trust.

``dev`` is the developer's machine (this checkout, the hub embedded in its commands, listening
on its own loopback only, so the box can reach it through the SSH tunnel alone); ``box`` is a
plain host with sshd and the system Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.contract import CHECKS
from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Network, make_ssh_key
from tests.multihost.ssh_hosts import Lab, make_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Lab]:
    """One developer machine and one box, shared by this module's tests."""
    require_namespaces()
    key = make_ssh_key(tmp_path_factory.mktemp("key") / "id_ed25519")
    with Network("ssh") as network:
        yield make_lab(network, key, wheelhouse)


def _contract_script(config: dict[str, str], check: str) -> str:
    return (
        "import json, sys, tempfile, pathlib\n"
        "from providers.contract import CHECKS, ContractTarget\n"
        f"target = ContractTarget('ssh', json.loads({json.dumps(json.dumps(config))}))\n"
        "with tempfile.TemporaryDirectory() as scratch:\n"
        f"    CHECKS[{check!r}](target, pathlib.Path(scratch))\n"
        "print('contract-ok')\n"
    )


def _hybrid_contract_script(ssh_config: dict[str, str], check: str) -> str:
    """The contract against a hybrid environment whose agent environment is on the box (ssh)
    and whose tools environment is a worktree on the developer's machine."""
    return (
        "import json, tempfile, pathlib\n"
        "from providers.contract import CHECKS, ContractTarget\n"
        f"ssh_config = json.loads({json.dumps(json.dumps(ssh_config))})\n"
        "def prepare(manager):\n"
        "    known = {r.name for r in manager.environments()}\n"
        "    if 'agent-far' not in known:\n"
        "        manager.create('agent-far', 'ssh', ssh_config)\n"
        "    if 'tools-here' not in known:\n"
        "        manager.create('tools-here', 'worktree')\n"
        "config = {'agent': 'agent-far', 'tools': 'tools-here', 'route': ['fs:*']}\n"
        "target = ContractTarget('hybrid', config, prepare=prepare, keeps_resource=True,\n"
        "                        lists_resources=False)\n"
        "with tempfile.TemporaryDirectory() as scratch:\n"
        f"    CHECKS[{check!r}](target, pathlib.Path(scratch))\n"
        "print('contract-ok')\n"
    )


@pytest.mark.parametrize("check", list(CHECKS))
def test_contract_on_a_remote_host(lab: Lab, check: str) -> None:
    """Every check of the provider contract, run on the developer's machine against the box."""
    settings = lab.settings()
    done = lab.dev.run(
        [lab.dev.python(), "-c", _contract_script(settings, check)],
        env=lab.dev.checkout_env(),
        check=False,
        timeout=240,
    )
    assert done.returncode == 0 and b"contract-ok" in done.stdout, done.stderr.decode()[-3000:]


@pytest.mark.parametrize("check", list(CHECKS))
def test_hybrid_contract_with_its_agent_on_a_remote_host(lab: Lab, check: str) -> None:
    """Every check of the contract against a hybrid environment made of an ssh environment
    on the box (where its operations run) and a worktree on the developer's machine."""
    done = lab.dev.run(
        [lab.dev.python(), "-c", _hybrid_contract_script(lab.settings(), check)],
        env=lab.dev.checkout_env(),
        check=False,
        timeout=240,
    )
    assert done.returncode == 0 and b"contract-ok" in done.stdout, done.stderr.decode()[-3000:]


def test_run_installs_the_runtime_and_reaches_the_hub_through_the_tunnel(lab: Lab) -> None:
    """A run on a box with no narrative: the runtime is installed from the wheelhouse the
    developer's machine sends, dials the hub through the SSH tunnel (the hub listens on the
    developer's loopback only), and the result comes home to be merged."""
    assert lab.sh_on_box("command -v narrative") == ""
    assert lab.sh_on_box("ls -d ~/.fresh 2>/dev/null") == ""
    ws = lab.init_workspace({"notes.txt": "draft\n"})
    config = lab.config(work_dir="~/.fresh")
    lab.narrative("env", "create", "far", "--provider", "ssh", *config, cwd=ws)
    assert lab.sh_on_box("ls ~/.fresh/runtime").strip(), "no runtime was installed"
    script = "cat notes.txt; echo remote > made.txt; hostname"
    done = lab.narrative("-q", "run", "start", "--env", "far", "--", "sh", "-c", script, cwd=ws)
    run_id = done.stdout.decode().split()[-1]
    assert b"draft" in done.stderr and b"box" in done.stderr, done.stderr
    shown = lab.json("run", "show", run_id, cwd=ws)
    assert shown["status"] == "succeeded", shown
    hub_url = next(e["hub"]["url"] for e in shown["events"] if e["type"] == "run.created")
    assert hub_url.startswith("ws://127.0.0.1:"), hub_url  # unreachable from the box
    spawned = next(e for e in shown["events"] if e["type"] == "runtime.spawned")
    assert any("ws+unix://" in arg for arg in spawned["argv"]), spawned
    lab.narrative("merge", run_id, cwd=ws)
    assert lab.dev.read_file(f"{ws}/made.txt") == b"remote\n"
    lab.assert_store_sound(ws)
    lab.narrative("env", "delete", "far", cwd=ws)
    assert lab.sh_on_box("ls ~/.fresh/envs") == ""


def test_an_unknown_host_key_is_refused_with_its_fingerprint(lab: Lab) -> None:
    """Strict by default: a host whose key is not in known_hosts is refused, the refusal shows
    the key's fingerprint; pinning that fingerprint trusts it; a wrong pin is refused."""
    ws = lab.init_workspace({"a.txt": "a\n"}, name="trust")
    empty = f"{lab.dev.home}/empty_known_hosts"
    lab.dev.write_file(empty, "")
    refused = lab.narrative(
        "env",
        "create",
        "t1",
        "--provider",
        "ssh",
        *lab.config(known_hosts=empty),
        cwd=ws,
        check=False,
    )
    fingerprint = lab.box.host_key_fingerprint()
    assert refused.returncode == 1
    message = refused.stderr.decode()
    assert "not trusted" in message and fingerprint in message, message
    assert "Traceback" not in message
    wrong = "SHA256:" + "A" * 43
    refused = lab.narrative(
        "env",
        "create",
        "t2",
        "--provider",
        "ssh",
        *lab.config(known_hosts=empty, host_key=wrong),
        cwd=ws,
        check=False,
    )
    assert refused.returncode == 1 and "does not match" in refused.stderr.decode()
    lab.narrative(
        "env",
        "create",
        "t3",
        "--provider",
        "ssh",
        *lab.config(known_hosts=empty, host_key=fingerprint),
        cwd=ws,
    )
    lab.narrative("env", "delete", "t3", cwd=ws)
    listed = lab.json("env", "list", cwd=ws)
    assert [e["name"] for e in listed["items"]] == [], listed


def test_a_wheelhouse_for_another_python_is_refused(lab: Lab) -> None:
    """The wheels are checked against the host's Python and architecture before anything is
    sent: a mismatch is one clear error, nothing installed."""
    ws = lab.init_workspace({"a.txt": "a\n"}, name="mismatch")
    odd = f"{lab.dev.home}/odd-wheels"
    lab.dev.write_file(f"{odd}/pydantic_core-2.0.0-cp312-cp312-manylinux_2_17_aarch64.whl", b"x")
    before = lab.sh_on_box("ls ~/.narrative/runtime 2>/dev/null")
    refused = lab.narrative(
        "env",
        "create",
        "odd",
        "--provider",
        "ssh",
        *lab.config(work_dir="~/.other", wheelhouse=odd),
        cwd=ws,
        check=False,
    )
    message = refused.stderr.decode()
    assert refused.returncode == 1 and "does not fit" in message and "Traceback" not in message
    assert lab.sh_on_box("ls ~/.other/runtime 2>/dev/null") == ""
    assert lab.sh_on_box("ls ~/.narrative/runtime 2>/dev/null") == before


def test_the_sandbox_hides_the_remote_users_home_and_other_environments(lab: Lab) -> None:
    """Under the default sandbox an agent on the box sees none of the remote user's files
    (keys included) but its own workspace, nor another environment's workspace there."""
    ws = lab.init_workspace({"a.txt": "a\n"}, name="sandbox")
    lab.box.write_file(f"{lab.box.home}/.ssh/id_rsa", "SECRET KEY\n", mode=0o600)
    for name in ("s1", "s2"):
        lab.narrative("env", "create", name, "--provider", "ssh", *lab.config(), cwd=ws)
    lab.narrative("run", "start", "--env", "s2", "--", "sh", "-c", "echo mine > other.txt", cwd=ws)
    probe = "cat ~/.ssh/id_rsa; ls ~/.narrative/envs; ls -A ~; ps -e | wc -l"
    done = lab.narrative(
        "run", "start", "--env", "s1", "--", "sh", "-c", probe, cwd=ws, check=False
    )
    seen = done.stderr.decode() + done.stdout.decode()
    assert "SECRET KEY" not in seen
    assert seen.count("env-") == 1, seen  # its own environment only
    for name in ("s1", "s2"):
        lab.narrative("env", "delete", name, cwd=ws)


def test_a_sweep_ends_the_processes_of_a_leaked_environment_on_the_box(lab: Lab) -> None:
    """An environment whose record was lost (the manager died between making the resource and
    recording it) is swept, and what its agent left running on the box ends with it. Before,
    the sweep looked for the processes of an environment named "env-sweep"."""
    ws = lab.init_workspace({"a.txt": "a\n"}, name="sweep")
    for name in ("kept", "leaked"):
        config = lab.config(sandbox="none")
        lab.narrative("env", "create", name, "--provider", "ssh", *config, cwd=ws)
    daemon = "setsid sleep 307 < /dev/null > /dev/null 2>&1 &"
    lab.narrative("env", "exec", "leaked", "--", "sh", "-c", daemon, cwd=ws)
    running = "pgrep -fc 'slee[p] 307' || true"
    assert lab.sh_on_box(running).strip() == "1"
    ids = {name: lab.json("env", "show", name, cwd=ws)["id"] for name in ("kept", "leaked")}
    records = f"{lab.json('info', cwd=ws)['store']}/narrative/environments.json"
    doc = json.loads(lab.dev.read_file(records))
    doc["environments"] = [e for e in doc["environments"] if e["name"] != "leaked"]
    lab.dev.write_file(records, json.dumps(doc))
    lab.narrative("env", "sweep", cwd=ws)
    assert lab.sh_on_box(running).strip() == "0"
    on_box = lab.sh_on_box("ls ~/.narrative/envs").split()
    assert ids["kept"] in on_box and ids["leaked"] not in on_box
    lab.narrative("env", "delete", "kept", cwd=ws)


def test_readme_ssh_walkthrough(tmp_path: Path, wheelhouse: Path) -> None:
    """'## Agents on an SSH host' as written, on a developer host, with ``box`` a plain host
    whose user is ``agent``: the key and known_hosts where ssh keeps them, and the wheelhouse
    where narrative caches the one it builds (the hosts have no package index)."""
    from providers.ssh.install import runtime_key
    from tests.e2e.test_readme import README, parse_blocks, walkthrough_script

    require_namespaces()
    key = make_ssh_key(tmp_path / "id_ed25519")
    with Network("readme-ssh") as network:
        dev = network.add_host("dev", sees_checkout=True)
        box = network.add_host("box", sshd=True, user="agent")
        box.authorize(key.public_line)
        dev.write_file(f"{dev.home}/.ssh/id_ed25519", key.private_bytes, mode=0o600)
        dev.write_file(f"{dev.home}/.ssh/known_hosts", f"box,{box.host_key_line()}\n")
        cache = f"{dev.home}/.cache/narrative/wheelhouse/{runtime_key()}"
        for wheel in wheelhouse.glob("*.whl"):
            dev.write_file(f"{cache}/{wheel.name}", wheel.read_bytes())
        dev.write_file(f"{cache}/complete", runtime_key())
        script = walkthrough_script(parse_blocks(README.read_text()), "Agents on an SSH host")
        assert "--provider ssh" in script
        bin_dir = str(Path(dev.narrative()).parent)
        env = {**dev.checkout_env(), "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}
        done = dev.run(["bash", "-c", script], env=env, check=False, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr).decode()[-3000:]
        assert b"hello from afar" in done.stdout
