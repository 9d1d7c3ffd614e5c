"""The ``cloud-vm`` provider's API side against moto's EC2 server (a real boto3 client, fake
credentials), through the environment manager: the cap refuses a launch before anything is
made, a machine whose console never shows its host key fingerprints is terminated with a clear
error, bad configs and resource ids are refused. The console parser is checked on a realistic
cloud-init console. The machine side (SSH into an sshd standing in for the instance) is in
tests/multihost/test_cloud_vm.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from narrative.errors import InvalidInput
from narrative.ids import new_id
from narrative.store import Store
from providers.cloud.driver import (
    TAG_OWNER,
    CloudMachineConfig,
    parse_host_key_fingerprints,
)
from providers.errors import ProviderError, QuotaExceeded
from providers.manager import EnvironmentManager
from tests.moto_support import moto_server, post, use_test_credentials

# moto EC2 round trips: make test-long (CI runs it), to keep make test under ten minutes
pytestmark = [pytest.mark.heavy, pytest.mark.long]
boto3 = pytest.importorskip("boto3")

# What an EC2 instance's console shows at first boot (Debian 12 image, cloud-init 22.4),
# trimmed: kernel lines with timestamps, cloud-init's "ec2:" lines, the fingerprints, then
# the public keys.
CONSOLE = """\
[    0.000000] Linux version 6.1.0-13-cloud-amd64 (debian-kernel@lists.debian.org)
[    5.912345] cloud-init[412]: Cloud-init v. 22.4.2 running 'init' at Tue, 05 Dec 2026
[    6.102938] cloud-init[412]: Generating public/private ed25519 key pair.
[    6.103001] cloud-init[412]: SHA256:Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmF root@ip-1
<14>Dec  5 ec2:
<14>Dec  5 ec2: #############################################################
<14>Dec  5 ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
<14>Dec  5 ec2: 256 SHA256:n0Q2zX6zOe7QhRkYyvG9S1Lh8sV3cTq8m6mQ0bWQf5M root@ip-172-31 (ECDSA)
<14>Dec  5 ec2: 256 SHA256:2oP5yM2bXk0yYtq3V8Lr8e0uH1c0mXo6p1eNn8kqkqE root@ip-172-31 (ED25519)
<14>Dec  5 ec2: 3072 SHA256:9Q0b0gR1sPq2N7yJtTq0S8X1YgYk5d8x0aQm1W4n0uA root@ip-172-31 (RSA)
<14>Dec  5 ec2: -----END SSH HOST KEY FINGERPRINTS-----
<14>Dec  5 ec2: #############################################################
-----BEGIN SSH HOST KEY KEYS-----
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOk= root@ip-172-31-5-9
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0b3JrcyBmb3Igbm93IGJ1dCBub3QgcmVhbA root@ip-172-31-5-9
-----END SSH HOST KEY KEYS-----
[   12.000000] cloud-init[600]: Cloud-init v. 22.4.2 finished at Tue, 05 Dec 2026
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
ec2: 256 SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA forged@later (ED25519)
ec2: -----END SSH HOST KEY FINGERPRINTS-----
"""


def test_the_console_parser_reads_the_first_fingerprint_block_only() -> None:
    assert parse_host_key_fingerprints(CONSOLE) == [
        "SHA256:n0Q2zX6zOe7QhRkYyvG9S1Lh8sV3cTq8m6mQ0bWQf5M",
        "SHA256:2oP5yM2bXk0yYtq3V8Lr8e0uH1c0mXo6p1eNn8kqkqE",
        "SHA256:9Q0b0gR1sPq2N7yJtTq0S8X1YgYk5d8x0aQm1W4n0uA",
    ]
    assert parse_host_key_fingerprints("") == []
    unfinished = CONSOLE.split("-----END SSH HOST KEY FINGERPRINTS-----", maxsplit=1)[0]
    assert parse_host_key_fingerprints(unfinished.split("ec2: 256 SHA256:2o")[0]) == []
    assert (
        parse_host_key_fingerprints("256 SHA256:n0Q2zX6zOe7QhRkYyvG9S1Lh8sV3cTq8m6mQ0bWQf5M") == []
    )


@pytest.fixture(scope="module")
def ec2_endpoint() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
def ec2(ec2_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    use_test_credentials(monkeypatch)
    post(f"{ec2_endpoint}/moto-api/reset")
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=ec2_endpoint)


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return str(key)


@pytest.fixture
def manager(tmp_path: Path) -> EnvironmentManager:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("a\n")
    return EnvironmentManager(Store.init(str(workspace)))


def settings(endpoint: str, key_file: str, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "image_id": "ami-03cf127a",
        "instance_type": "t3.micro",
        "ssh_cidr": "198.51.100.0/24",
        "ready_timeout": 10,
        "key_file": key_file,
        "user": "admin",
        **extra,
    }


def live_instances(ec2: Any, owner: str) -> list[str]:
    reply = ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{TAG_OWNER}", "Values": [owner]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return sorted(i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"])


def test_a_console_without_fingerprints_times_out_and_terminates_the_machine(
    ec2: Any, ec2_endpoint: str, key_file: str, manager: EnvironmentManager
) -> None:
    """host_keys=console (the default) on a machine that prints no fingerprints (moto's
    console text): one clear error after host_key_timeout, and the machine, its key pair and
    its security group are gone."""
    config = settings(ec2_endpoint, key_file, host_key_timeout=1)
    with pytest.raises(ProviderError, match="printed no SSH host key fingerprints"):
        manager.create("box", "cloud-vm", config)
    assert live_instances(ec2, manager.owner) == []
    launched = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    assert [i["State"]["Name"] for i in launched] == ["terminated"]
    assert ec2.describe_key_pairs()["KeyPairs"] == []
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert [g["GroupName"] for g in groups] == ["default"]


def test_the_cap_refuses_a_launch_before_anything_is_made(
    ec2: Any, ec2_endpoint: str, key_file: str, manager: EnvironmentManager
) -> None:
    """max_machines live machines of this store: the next create is QuotaExceeded naming
    them, and EC2 holds nothing new (no instance, key pair or group)."""
    from providers.cloud.drivers import open_driver

    config = settings(ec2_endpoint, key_file, max_machines=2)
    driver = open_driver(
        CloudMachineConfig(
            **{k: config[k] for k in ("endpoint_url", "image_id", "instance_type", "ssh_cidr")}
        )
    )
    public = Path(f"{key_file}.pub").read_text()
    for env in ("env-x1", "env-x2"):
        spec = driver.config.launch_spec(
            name=env, owner=manager.owner, env_id=env, public_key=public
        )
        driver.launch(spec)
    before = live_instances(ec2, manager.owner)
    keys = ec2.describe_key_pairs()["KeyPairs"]
    with pytest.raises(QuotaExceeded) as refused:
        manager.create("third", "cloud-vm", config)
    assert all(machine in str(refused.value) for machine in before), refused.value
    assert live_instances(ec2, manager.owner) == before
    assert ec2.describe_key_pairs()["KeyPairs"] == keys


def test_bad_configs_and_resource_ids_are_refused(
    ec2_endpoint: str, key_file: str, manager: EnvironmentManager, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="host_key"):
        manager.create("p", "cloud-vm", settings(ec2_endpoint, key_file, host_keys="pinned"))
    with pytest.raises(InvalidInput, match="host_key"):
        manager.create(
            "q", "cloud-vm", settings(ec2_endpoint, key_file, host_key="SHA256:" + "A" * 43)
        )
    no_pub = tmp_path / "lonely_key"
    no_pub.write_text("not really a key\n")
    with pytest.raises(InvalidInput, match=r"lonely_key\.pub"):
        manager.create("r", "cloud-vm", settings(ec2_endpoint, str(no_pub)))
    from providers.base import ProviderContext
    from providers.cloud.provider import CloudVMConfig, CloudVMProvider

    context = ProviderContext(manager.store, manager.owner, new_id("environment"), "one")
    provider = CloudVMProvider(context, CloudVMConfig(**settings(ec2_endpoint, key_file)))
    fingerprint = "SHA256:" + "B" * 43
    for bad in (
        "",
        "garbage",
        "ssh:env-1",
        f"vm:i-1:env-1:{fingerprint}",
        f"vm:i-1:env 1:{fingerprint}:10.0.0.1",
        "vm:i-1:env-1:SHA256:short:10.0.0.1",
        f"vm:i-1:env-1:{fingerprint}:10.0.0.1;rm",
    ):
        with pytest.raises(InvalidInput):
            provider.read_file(bad, "a.txt")


def test_help_lists_every_setting() -> None:
    from click.testing import CliRunner

    from cli.main import cli
    from providers.cloud.provider import CloudVMConfig

    shown = CliRunner().invoke(cli, ["env", "create", "--provider", "cloud-vm", "--help"])
    assert shown.exit_code == 0, shown.output
    for name in CloudVMConfig.model_fields:
        if name != "type":
            assert f"{name}=" in shown.output, name


def test_health_follows_the_machine_state(
    ec2: Any, ec2_endpoint: str, key_file: str, manager: EnvironmentManager
) -> None:
    """Running without a trusted key, pending, stopped: unreachable; terminated, or another
    store's or environment's machine: gone (and delete leaves those alone)."""
    from providers.base import Health, ProviderContext
    from providers.cloud.provider import CloudVMConfig, CloudVMProvider, resource_id_of

    config = CloudVMConfig(**settings(ec2_endpoint, key_file))
    provider = CloudVMProvider(
        ProviderContext(manager.store, manager.owner, new_id("environment"), "h"), config
    )
    public = Path(f"{key_file}.pub").read_text()

    def launch(env: str, owner: str) -> str:
        spec = config.launch_spec(name=env, owner=owner, env_id=env, public_key=public)
        return provider.driver.launch(spec).id

    mine = launch("env-h1", manager.owner)
    theirs = launch("env-h2", "narrative-someone-else")
    address = provider.driver.dial_address(provider.driver.wait_ready(mine))
    rid = resource_id_of(mine, "env-h1", None, address)
    assert provider.list_resources() == [rid]  # by its owner tag: not the other store's
    assert provider.health(rid) is Health.UNREACHABLE  # running, but never trusted over SSH
    ec2.stop_instances(InstanceIds=[mine])
    assert provider.health(rid) is Health.UNREACHABLE
    assert provider.health(resource_id_of(mine, "env-other", None, None)) is Health.GONE
    foreign = resource_id_of(theirs, "env-h2", None, None)
    assert provider.health(foreign) is Health.GONE
    assert foreign not in provider.list_resources()
    provider.delete(foreign)  # not this store's: left alone
    assert live_instances(ec2, "narrative-someone-else") == [theirs]
    provider.delete(rid)
    assert provider.health(rid) is Health.GONE
    assert rid not in provider.list_resources()
