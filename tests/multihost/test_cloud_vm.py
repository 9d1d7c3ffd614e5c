"""The ``cloud-vm`` provider between hosts: the EC2 API is moto's server, the "instance" is a
container running ``sshd`` that stands in for every machine moto launches.

``dev`` (this checkout) runs moto's server on its own address and the provider; the sshd
container (image ``narrative-host:1``, the machine's ``/usr`` read-only, ``--network none``)
gets one end of a veth pair, the other end is in ``dev``'s network namespace, on a /24 of
its own (no default route, no NAT). ``address_override`` maps every address moto invents to
the container's. Host keys: ``first-use`` (moto's console prints no fingerprints; the console
path is tested against moto in tests/providers/test_cloud_provider.py), sandbox ``none``
(bubblewrap cannot make namespaces in the container).

What runs against what: the API side against moto, the machine side against the container's
sshd; no real cloud.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from providers.contract import CHECKS
from tests.moto_support import AWS_ENV_SET
from tests.multihost.conftest import require_namespaces
from tests.multihost.hosts import Host, Network, SshKey, make_ssh_key
from tests.multihost.ssh_hosts import build_wheelhouse

IMAGE = "narrative-host:1"
DOCKER_HOST = "unix:///tmp/nd-docker/docker.sock"
REQUIRE_DOCKER = os.environ.get("NARRATIVE_REQUIRE_DOCKER") == "1"
AMI = "ami-03cf127a"
MOTO_PORT = 5055


def _docker(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_HOST": os.environ.get("DOCKER_HOST", DOCKER_HOST)}
    return subprocess.run(
        ["docker", *argv], capture_output=True, text=True, check=check, env=env, timeout=60
    )


def _require_docker() -> None:
    reason = None
    if shutil.which("docker") is None:
        reason = "no docker CLI"
    elif (probe := _docker("version", check=False)).returncode != 0:
        reason = f"no Docker engine: {probe.stderr.strip()[:200]}"
    elif _docker("image", "inspect", IMAGE, check=False).returncode != 0:
        import docker

        from providers.docker.image import build_image

        # the skeleton image loaded offline, as the docker provider does (nothing pulled)
        build_image(docker.APIClient(base_url=os.environ.get("DOCKER_HOST", DOCKER_HOST)), IMAGE)
    if reason:
        if REQUIRE_DOCKER:
            pytest.fail(f"NARRATIVE_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(reason)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class CloudLab:
    network: Network
    dev: Host
    container: str
    machine_address: str
    endpoint: str
    wheels: str
    key_file: str
    host_fingerprint: str
    """The fingerprint of the container's (the machines') SSH host key."""

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint,
            "image_id": AMI,
            "instance_type": "t3.micro",
            "ssh_cidr": "10.232.0.0/16",
            "ready_timeout": 30,
            "address_override": {"0.0.0.0/0": self.machine_address},
            "user": "admin",
            "key_file": self.key_file,
            "wheelhouse": self.wheels,
            "host_keys": "first-use",
            "host_key_timeout": 30,
            "sandbox": "none",
            **extra,
        }

    def env(self) -> dict[str, str]:
        return {**self.dev.checkout_env(), **AWS_ENV_SET}

    def python(self, script: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return self.dev.run(
            [self.dev.python(), "-c", script], env=self.env(), check=False, timeout=timeout
        )

    def narrative(self, *args: str, cwd: str, check: bool = True) -> Any:
        return self.dev.run(
            [self.dev.narrative(), *args], env=self.env(), cwd=cwd, check=check, timeout=240
        )

    def ec2(self, call: str, **kwargs: Any) -> Any:
        """A call of a plain boto3 client (the oracle), from the test thread on dev's network."""
        import boto3

        saved = {k: os.environ.get(k) for k in AWS_ENV_SET}
        os.environ.update(AWS_ENV_SET)
        try:
            with self.dev.enter_net():
                client = boto3.client("ec2", region_name="us-east-1", endpoint_url=self.endpoint)
                return getattr(client, call)(**kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def states(self) -> dict[str, str]:
        reply = self.ec2("describe_instances")
        return {
            i["InstanceId"]: i["State"]["Name"]
            for r in reply["Reservations"]
            for i in r["Instances"]
        }


def _machine_files(root: Path, key: SshKey) -> None:
    """/etc and the login user's home of the stand-in machine."""
    etc = root / "etc"
    (etc / "ssh").mkdir(parents=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
        "admin:x:1000:1000:admin:/home/admin:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text("root:x:0:\nadmin:x:1000:\nnogroup:x:65534:\n")
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            str(etc / "ssh/ssh_host_ed25519_key"),
        ],
        check=True,
    )
    (etc / "ssh/sshd_config").write_text(
        "Port 22\nHostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
        "PermitRootLogin no\nAllowAgentForwarding no\nX11Forwarding no\n"
        "AllowStreamLocalForwarding yes\nStreamLocalBindUnlink yes\n"
        "Subsystem sftp internal-sftp\nStrictModes no\n"
    )
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/authorized_keys").write_text(key.public_line + "\n")
    for path in [home, home / ".ssh", home / ".ssh/authorized_keys"]:
        os.chown(path, 1000, 1000)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudLab]:
    require_namespaces()
    _require_docker()
    pytest.importorskip("moto.server")
    wheelhouse = build_wheelhouse(str(tmp_path_factory.mktemp("wheelhouse")))
    key = make_ssh_key(tmp_path_factory.mktemp("key") / "id_ed25519")
    root = tmp_path_factory.mktemp("machine")
    _machine_files(root, key)
    name = f"nd-cloudvm-{os.getpid()}"
    with Network("cloud") as network:
        dev = network.add_host("dev", sees_checkout=True)
        key_file = f"{dev.home}/.ssh/id_ed25519"
        dev.write_file(key_file, key.private_bytes, mode=0o600)
        dev.write_file(f"{key_file}.pub", key.public_line + "\n")
        wheels = f"{dev.home}/wheels"
        for wheel in sorted(wheelhouse.glob("*.whl")):
            dev.write_file(f"{wheels}/{wheel.name}", wheel.read_bytes())
        _docker(
            "run", "-d", "--rm", "--name", name, "--network", "none",
            "-v", "/usr:/usr:ro",
            "-v", f"{root}/etc/passwd:/etc/passwd:ro",
            "-v", f"{root}/etc/group:/etc/group:ro",
            "-v", f"{root}/etc/ssh:/etc/ssh:ro",
            "-v", f"{root}/home:/home/admin",
            "--tmpfs", "/run:mode=755", "--tmpfs", "/tmp:mode=1777",
            IMAGE, "/bin/sh", "-c", "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e",
        )  # fmt: skip
        try:
            pid = _docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
            subnet = network.subnet
            dev_end, machine_end = f"cvd{os.getpid() % 10000}", f"cvm{os.getpid() % 10000}"
            _sh("ip", "link", "add", dev_end, "type", "veth", "peer", "name", machine_end)
            _sh("ip", "link", "set", dev_end, "netns", dev.netns)
            _sh("ip", "link", "set", machine_end, "netns", pid)
            dev_ip, machine_ip = f"10.232.{subnet}.1", f"10.232.{subnet}.2"
            netns = ["ip", "netns", "exec", dev.netns]
            _sh(*netns, "ip", "addr", "add", f"{dev_ip}/24", "dev", dev_end)
            _sh(*netns, "ip", "link", "set", dev_end, "up")
            enter = ["nsenter", "-t", pid, "-n"]
            _sh(*enter, "ip", "addr", "add", f"{machine_ip}/24", "dev", machine_end)
            _sh(*enter, "ip", "link", "set", machine_end, "up")
            _sh(*enter, "ip", "link", "set", "lo", "up")
            moto = dev.popen(
                [dev.python(), "-m", "moto.server", "-H", dev.address, "-p", str(MOTO_PORT)],
                env={**dev.checkout_env(), **AWS_ENV_SET},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            endpoint = f"http://{dev.address}:{MOTO_PORT}"
            listed = subprocess.run(
                ["ssh-keygen", "-lf", f"{root}/etc/ssh/ssh_host_ed25519_key.pub"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[1]
            lab = CloudLab(network, dev, name, machine_ip, endpoint, wheels, key_file, listed)
            deadline = time.monotonic() + 30
            while True:
                try:
                    lab.ec2("describe_instances")
                    break
                except Exception:
                    assert moto.poll() is None, "moto's server ended"
                    assert time.monotonic() < deadline, "moto's server does not answer"
                    time.sleep(0.3)
            yield lab
        finally:
            _docker("rm", "-f", name, check=False)


def _contract_script(config: dict[str, Any], check: str) -> str:
    return (
        "import json, sys, tempfile, pathlib\n"
        "from providers.contract import CHECKS, ContractTarget\n"
        f"target = ContractTarget('cloud-vm', json.loads({json.dumps(json.dumps(config))}))\n"
        "with tempfile.TemporaryDirectory() as scratch:\n"
        f"    CHECKS[{check!r}](target, pathlib.Path(scratch))\n"
        "print('contract-ok')\n"
    )


@pytest.mark.parametrize("check", list(CHECKS))
def test_contract_on_a_cloud_vm(lab: CloudLab, check: str) -> None:
    """Every check of the provider contract, run on the developer's machine: machines
    launched in moto, driven over SSH in the sshd container."""
    done = lab.python(_contract_script(lab.settings(), check))
    assert done.returncode == 0 and b"contract-ok" in done.stdout, done.stderr.decode()[-3000:]


def _init(lab: CloudLab, name: str) -> str:
    ws = f"{lab.dev.home}/{name}"
    lab.dev.write_file(f"{ws}/a.txt", "a\n")
    lab.narrative("init", cwd=ws)
    return ws


def test_delete_terminates_sweep_reaps_leaked_and_idle_machines(lab: CloudLab) -> None:
    """Through the CLI: create shows the first-use host key; delete terminates the instance
    (and its key pair and group) in moto; ``env sweep`` terminates a leaked machine found by
    its owner tag, and machines idle past their time-to-live, but not one still running a
    process of its environment, nor a recorded one in use."""
    ws = _init(lab, "sweepy")
    config = [
        p
        for k, v in lab.settings().items()
        for p in ("--config", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")
    ]
    lab.narrative("env", "create", "one", "--provider", "cloud-vm", *config, cwd=ws)
    shown = json.loads(lab.narrative("env", "show", "one", "--json", cwd=ws).stdout)
    resource = shown["resource_id"]
    machine = resource.split(":")[1]
    assert lab.states()[machine] == "running"
    fingerprint = resource.split(":")[3] + ":" + resource.split(":")[4]
    assert fingerprint.startswith("SHA256:"), resource
    assert any("first-use" in w and fingerprint in w for w in shown["warnings"]), shown
    lab.narrative("env", "delete", "one", cwd=ws)
    assert lab.states()[machine] == "terminated"
    names = [k["KeyName"] for k in lab.ec2("describe_key_pairs")["KeyPairs"]]
    assert f"narrative-{shown['id']}" not in names

    lab.narrative("env", "create", "two", "--provider", "cloud-vm", *config, cwd=ws)
    kept = json.loads(lab.narrative("env", "show", "two", "--json", cwd=ws).stdout)
    kept_machine = kept["resource_id"].split(":")[1]
    store = json.loads(lab.narrative("info", "--json", cwd=ws).stdout)["store"]
    # an environment idle past its 1 s time-to-live by its tags, but running a process
    short = [*config, "--config", "idle_ttl=1"]
    lab.narrative("env", "create", "busy", "--provider", "cloud-vm", *short, cwd=ws)
    busy = json.loads(lab.narrative("env", "show", "busy", "--json", cwd=ws).stdout)
    busy_machine = busy["resource_id"].split(":")[1]
    lab.narrative("env", "exec", "busy", "--", "sh", "-c", "sleep 300 >/dev/null 2>&1 &", cwd=ws)
    owner_script = (
        "import json, sys\n"
        "from narrative.store import Store\n"
        "from providers.manager import EnvironmentManager\n"
        "from providers.cloud.driver import CloudMachineConfig\n"
        "from providers.cloud.drivers import open_driver\n"
        f"manager = EnvironmentManager(Store.open({store!r}))\n"
        "settings = json.loads(sys.argv[1])\n"
        "public = open(settings.pop('key_file') + '.pub').read()\n"
        "ids = []\n"
        "for env, ttl in (('env-leak1', 3600), ('env-idle1', 1)):\n"
        "    driver = open_driver(CloudMachineConfig(idle_ttl=ttl, **settings))\n"
        "    spec = driver.config.launch_spec(name=env, owner=manager.owner, env_id=env,"
        " public_key=public)\n"
        "    ids.append(driver.launch(spec).id)\n"
        "print(json.dumps(ids))\n"
    )
    machine_settings = {
        k: v
        for k, v in lab.settings().items()
        if k in ("endpoint_url", "image_id", "instance_type", "ssh_cidr", "key_file")
    }
    done = lab.dev.run(
        [lab.dev.python(), "-c", owner_script, json.dumps(machine_settings)],
        env=lab.env(),
        cwd=ws,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    leaked, idle = json.loads(done.stdout)
    time.sleep(2.5)  # the idle one's time-to-live (1 s) passes; the others' (1 h) does not
    lab.narrative("env", "sweep", cwd=ws)
    states = lab.states()
    assert states[leaked] == "terminated", states
    assert states[idle] == "terminated", states
    assert states[kept_machine] == "running", states
    assert states[busy_machine] == "running", states  # its process runs: in use
    lab.narrative("env", "stop", "busy", cwd=ws)  # ends the process
    time.sleep(2.5)
    lab.narrative("env", "sweep", cwd=ws)
    states = lab.states()
    assert states[busy_machine] == "terminated", states
    assert states[kept_machine] == "running", states
    alive = lab.narrative("env", "exec", "two", "--", "echo", "still here", cwd=ws)
    assert alive.stdout == b"still here\n"
    lab.narrative("env", "delete", "two", cwd=ws)
    assert lab.states()[kept_machine] == "terminated"


_CONSOLE_SCRIPT = """
import json, sys
import providers.cloud.provider as cloud_provider
from narrative.errors import NarrativeError
from narrative.store import Store
from providers.cloud.ec2 import Ec2Driver
from providers.manager import EnvironmentManager

settings, console = json.loads(sys.argv[1]), sys.argv[2]


class ConsoleDriver(Ec2Driver):
    # moto's console text has no fingerprints: this one prints what cloud-init would
    def _console_output(self, machine_id):
        return console


cloud_provider.open_driver = lambda config, name="cloud-vm": ConsoleDriver(config)
manager = EnvironmentManager(Store.open(sys.argv[3]))
try:
    record = manager.create(sys.argv[4], "cloud-vm", settings)
    print(json.dumps({"resource": record.resource_id}))
except NarrativeError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def _console(*fingerprints: str) -> str:
    lines = [f"ec2: 256 {fp} root@ip-10-0-0-9 (ED25519)" for fp in fingerprints]
    return "\n".join(
        [
            "[    6.1] cloud-init[412]: Generating public/private ed25519 key pair.",
            "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
            *lines,
            "ec2: -----END SSH HOST KEY FINGERPRINTS-----",
        ]
    )


def test_console_host_keys_pin_the_printed_key_and_refuse_another(lab: CloudLab) -> None:
    """host_keys=console (the default): the key the machine's sshd offers is trusted when its
    fingerprint is in the console's cloud-init block (the console text is the one stand-in:
    moto prints none), and refused, the machine terminated, when it is not."""
    ws = _init(lab, "console")
    store = json.loads(lab.narrative("info", "--json", cwd=ws).stdout)["store"]
    settings = {**lab.settings(), "host_keys": "console"}
    other = "SHA256:" + "Q" * 43

    def create(name: str, console: str) -> dict[str, str]:
        done = lab.dev.run(
            [lab.dev.python(), "-c", _CONSOLE_SCRIPT, json.dumps(settings), console, store, name],
            env=lab.env(),
            cwd=ws,
            check=False,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return dict(json.loads(done.stdout.decode().splitlines()[-1]))

    before = set(lab.states())
    trusted = create("printed", _console(other, lab.host_fingerprint))
    assert "resource" in trusted, trusted
    assert trusted["resource"].split(":", 3)[3].startswith(lab.host_fingerprint), trusted
    refused = create("forged", _console(other))
    assert "not among those its console printed" in refused.get("error", ""), refused
    assert lab.host_fingerprint in refused["error"], refused
    states = {k: v for k, v in lab.states().items() if k not in before}
    machine = trusted["resource"].split(":")[1]
    assert states.pop(machine) == "running", states
    assert list(states.values()) == ["terminated"], states
    lab.narrative("env", "delete", "printed", cwd=ws)
    assert lab.states()[machine] == "terminated"
