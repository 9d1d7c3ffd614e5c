"""The cloud-vm machine driver against moto's EC2 server over HTTP (a real boto3 client, fake
credentials): launch, tags, the SSH-only security group, the key pair, terminate, the sweep by
owner label, the cap on live machines, the idle time-to-live and the address override. The
oracle is a second, plain boto3 client describing what EC2 holds."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from narrative.errors import InvalidInput
from providers.cloud.driver import (
    TAG_ENV,
    TAG_LAST_USED,
    TAG_MANAGED,
    TAG_OWNER,
    CloudMachineConfig,
    LaunchSpec,
    Machine,
    MachineDriver,
    format_time,
)
from providers.errors import MissingDependency, ProviderError, QuotaExceeded, ResourceGone
from tests.moto_support import moto_server, post, use_test_credentials

# moto EC2 round trips (~30 s): in make test-long (CI runs it), to keep make test under ten minutes
pytestmark = [pytest.mark.heavy, pytest.mark.long]

boto3 = pytest.importorskip("boto3")

OWNER = "narrative-test0000owner"
CIDR = "198.51.100.0/24"
ANYWHERE = [{"CidrIp": "0.0.0.0/0"}]
T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ec2_endpoint() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture(scope="module")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return Path(f"{key}.pub").read_text()


@pytest.fixture
def ec2(ec2_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A plain boto3 client of the emptied server: the oracle. The server checks, as EC2
    does, that the image, the instance type and the key pair of a launch exist (moto's
    switches, read on each call by the server thread of this process)."""
    import moto.settings

    for switch in (
        "ENABLE_AMI_VALIDATION",
        "ENABLE_KEYPAIR_VALIDATION",
        "EC2_ENABLE_INSTANCE_TYPE_VALIDATION",
    ):
        monkeypatch.setattr(moto.settings, switch, True)
    use_test_credentials(monkeypatch)
    post(f"{ec2_endpoint}/moto-api/reset")
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=ec2_endpoint)


def make_driver(endpoint: str, **overrides: Any) -> MachineDriver:
    from providers.cloud.drivers import open_driver

    settings: dict[str, Any] = {
        "endpoint_url": endpoint,
        "image_id": "ami-03cf127a",
        "instance_type": "t3.micro",
        "ssh_cidr": CIDR,
        "ready_timeout": 10,
        **overrides,
    }
    return open_driver(CloudMachineConfig(**settings))


@pytest.fixture
def driver(ec2: Any, ec2_endpoint: str) -> MachineDriver:
    return make_driver(ec2_endpoint, max_machines=3, idle_ttl=600)


def spec_for(driver: MachineDriver, env_id: str, key: str, owner: str = OWNER) -> LaunchSpec:
    config = driver.config
    return config.launch_spec(name=f"box-{env_id}", owner=owner, env_id=env_id, public_key=key)


def instances(ec2: Any) -> dict[str, dict[str, Any]]:
    """Every instance EC2 holds (terminated ones too), by id."""
    return {
        i["InstanceId"]: i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
    }


def key_names(ec2: Any) -> list[str]:
    return sorted(k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"])


def group_names(ec2: Any) -> list[str]:
    return sorted(
        g["GroupName"]
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if g["GroupName"] != "default"
    )


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def test_launch_makes_a_tagged_running_machine_reachable_by_ssh_only(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    launched = driver.launch(spec_for(driver, "env-a1", public_key), now=T0)
    machine = driver.wait_ready(launched.id, timeout=10)

    assert machine.id == launched.id and machine.state == "running"
    assert machine.public_address and machine.private_address
    assert driver.dial_address(machine) == machine.public_address
    instance = instances(ec2)[machine.id]
    tags = tags_of(instance)
    assert tags[TAG_OWNER] == OWNER and tags[TAG_ENV] == "env-a1"
    assert tags[TAG_MANAGED] == "true" and tags["Name"] == "box-env-a1"
    assert tags[TAG_LAST_USED] == format_time(T0) == "2026-12-05T12:00:00Z"
    assert machine.owner == OWNER and machine.env_id == "env-a1" and machine.last_used == T0
    assert instance["ImageId"] == "ami-03cf127a" and instance["InstanceType"] == "t3.micro"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert "IamInstanceProfile" not in instance

    # The key pair: imported from the public key, named after the environment.
    assert instance["KeyName"] == "narrative-env-a1"
    (pair,) = ec2.describe_key_pairs(KeyNames=["narrative-env-a1"])["KeyPairs"]
    assert tags_of(pair)[TAG_OWNER] == OWNER

    # The security group: exactly one ingress rule, TCP 22 from the configured network.
    (group_ref,) = instance["SecurityGroups"]
    assert group_ref["GroupName"] == "narrative-env-a1"
    (group,) = ec2.describe_security_groups(GroupIds=[group_ref["GroupId"]])["SecurityGroups"]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == [CIDR]
    assert not rule.get("Ipv6Ranges") and not rule.get("UserIdGroupPairs")
    assert not rule.get("PrefixListIds")
    assert tags_of(group)[TAG_ENV] == "env-a1"

    assert driver.describe(machine.id) == machine


def test_an_ipv6_source_network_is_the_only_one_admitted(
    ec2: Any, ec2_endpoint: str, public_key: str
) -> None:
    driver = make_driver(ec2_endpoint, ssh_cidr="2001:db8:7::/48")
    machine = driver.launch(spec_for(driver, "env-v6", public_key))

    (group_ref,) = instances(ec2)[machine.id]["SecurityGroups"]
    (group,) = ec2.describe_security_groups(GroupIds=[group_ref["GroupId"]])["SecurityGroups"]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIpv6"] for r in rule["Ipv6Ranges"]] == ["2001:db8:7::/48"]
    assert not rule.get("IpRanges")


def test_terminate_removes_the_machine_its_key_and_its_group_and_may_repeat(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    keep = driver.launch(spec_for(driver, "env-keep", public_key))
    gone = driver.launch(spec_for(driver, "env-gone", public_key))

    driver.terminate(gone.id)

    assert instances(ec2)[gone.id]["State"]["Name"] == "terminated"
    assert instances(ec2)[keep.id]["State"]["Name"] in ("pending", "running")
    assert key_names(ec2) == ["narrative-env-keep"]
    assert group_names(ec2) == ["narrative-env-keep"]
    assert driver.describe(gone.id) is None
    driver.terminate(gone.id)  # twice: nothing left to do, no error
    driver.terminate("i-0123456789abcdef0")  # unknown: no error either
    with pytest.raises(ResourceGone):
        driver.wait_ready(gone.id, timeout=1)
    assert key_names(ec2) == ["narrative-env-keep"]


def test_machine_for_finds_only_the_environments_live_machine(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    machine = driver.launch(spec_for(driver, "env-r", public_key))
    other = driver.launch(spec_for(driver, "env-s", public_key, owner="narrative-other"))

    assert driver.machine_for(machine.id, owner=OWNER, env_id="env-r").id == machine.id
    for machine_id, owner, env_id in (
        (machine.id, OWNER, "env-s"),  # another environment's
        (other.id, OWNER, "env-s"),  # another store's
        ("i-0123456789abcdef0", OWNER, "env-r"),  # unknown
    ):
        with pytest.raises(ResourceGone):
            driver.machine_for(machine_id, owner=owner, env_id=env_id)
    driver.terminate(machine.id)
    with pytest.raises(ResourceGone):
        driver.machine_for(machine.id, owner=OWNER, env_id="env-r")


def test_wait_ready_gives_up_on_a_machine_that_does_not_run(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    machine = driver.launch(spec_for(driver, "env-w", public_key))
    ec2.stop_instances(InstanceIds=[machine.id])  # stopped by someone: never ready

    with pytest.raises(ProviderError, match=r"not running with an address after 0.5 s \(state"):
        driver.wait_ready(machine.id, timeout=0.5)
    assert [m.id for m in driver.list_labelled(OWNER)] == [machine.id]  # stopped counts
    driver.terminate(machine.id)
    assert key_names(ec2) == [] and group_names(ec2) == []


def test_terminate_refuses_an_instance_narrative_did_not_launch(
    driver: MachineDriver, ec2: Any
) -> None:
    foreign = ec2.run_instances(ImageId="ami-03cf127a", MinCount=1, MaxCount=1)["Instances"][0]

    with pytest.raises(ProviderError, match="not launched by narrative"):
        driver.terminate(foreign["InstanceId"])

    assert instances(ec2)[foreign["InstanceId"]]["State"]["Name"] in ("pending", "running")


def test_list_labelled_finds_only_this_owners_live_machines(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    mine = [driver.launch(spec_for(driver, f"env-m{n}", public_key)).id for n in range(2)]
    theirs = driver.launch(spec_for(driver, "env-t0", public_key, owner="narrative-other"))
    ec2.run_instances(ImageId="ami-03cf127a", MinCount=1, MaxCount=1)  # untagged
    driver.terminate(mine[1])

    assert [m.id for m in driver.list_labelled(OWNER)] == [mine[0]]
    assert [m.id for m in driver.list_labelled("narrative-other")] == [theirs.id]
    assert driver.list_labelled("narrative-nobody") == []


def test_the_cap_refuses_a_launch_past_max_machines_before_any_write(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    launched = [driver.launch(spec_for(driver, f"env-c{n}", public_key)).id for n in range(3)]
    driver.launch(spec_for(driver, "env-o0", public_key, owner="narrative-other"))  # not counted
    before = (instances(ec2), key_names(ec2), group_names(ec2))

    with pytest.raises(QuotaExceeded, match="max_machines=3") as caught:
        driver.launch(spec_for(driver, "env-c3", public_key))

    assert caught.value.limit == 3 and caught.value.live == sorted(launched)
    assert (instances(ec2), key_names(ec2), group_names(ec2)) == before
    # A terminated machine frees its place.
    driver.terminate(launched[0])
    driver.launch(spec_for(driver, "env-c3", public_key))


def test_idle_time_to_live_reaps_only_the_idle_machine(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    ttl = timedelta(seconds=driver.config.idle_ttl)
    idle = driver.launch(spec_for(driver, "env-idle", public_key), now=T0)
    busy = driver.launch(spec_for(driver, "env-busy", public_key), now=T0)
    known = driver.launch(spec_for(driver, "env-known", public_key), now=T0)
    later = T0 + ttl + timedelta(seconds=1)

    driver.touch(busy.id, now=T0 + ttl)  # used just before `later`
    busy_now = driver.describe(busy.id)
    idle_now = driver.describe(idle.id)
    assert busy_now is not None and idle_now is not None
    assert busy_now.last_used == T0 + ttl
    # The tag's time, not the launch's, counts (moto launches them now, after T0).
    idle_now = replace(idle_now, launched_at=T0)
    assert driver.expired(idle_now, None, later)
    assert not driver.expired(idle_now, None, T0 + ttl)
    assert not driver.expired(busy_now, None, later)
    assert not driver.expired(idle_now, T0 + ttl, later)  # the caller's knowledge counts too

    # past the TTL of every launch time, moto's real one (today's clock) too: T0 is fixed
    far = max(later, datetime.now(UTC)) + timedelta(days=1)
    reaped = driver.reap_idle(OWNER, {busy.id: far, known.id: far - ttl}, far)

    assert reaped == [idle.id]
    states = {i: instances(ec2)[i]["State"]["Name"] for i in (idle.id, busy.id, known.id)}
    assert states[idle.id] == "terminated"
    assert states[busy.id] != "terminated" and states[known.id] != "terminated"
    assert key_names(ec2) == ["narrative-env-busy", "narrative-env-known"]


def test_one_machine_that_cannot_be_reaped_does_not_keep_the_others_alive(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    """An instance carrying the owner label and the managed tag but no environment (tagged by
    hand): terminate refuses it, and the reaper still ends the idle machine after it."""
    odd = ec2.run_instances(
        ImageId="ami-03cf127a",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [{"Key": TAG_OWNER, "Value": OWNER}, {"Key": TAG_MANAGED, "Value": "true"}],
            }
        ],
    )["Instances"][0]["InstanceId"]
    idle = driver.launch(spec_for(driver, "env-idle", public_key), now=T0)
    assert len(driver.list_labelled(OWNER)) == 2

    with pytest.raises(ProviderError, match=f"{odd}.*not launched by narrative"):
        driver.reap_idle(OWNER, now=datetime.now(UTC) + timedelta(days=1))

    assert instances(ec2)[idle.id]["State"]["Name"] == "terminated"
    assert instances(ec2)[odd]["State"]["Name"] != "terminated"


def test_the_address_override_maps_the_dialled_address(
    ec2: Any, ec2_endpoint: str, public_key: str
) -> None:
    plain = make_driver(ec2_endpoint)
    machine = plain.wait_ready(plain.launch(spec_for(plain, "env-o", public_key)).id)
    public, private = machine.public_address, machine.private_address
    assert public is not None and private is not None

    def dialled(override: dict[str, str]) -> str:
        return make_driver(ec2_endpoint, address_override=override).dial_address(machine)

    assert dialled({public: "10.9.0.2"}) == "10.9.0.2"
    assert dialled({private: "sshd"}) == "sshd"
    assert dialled({"192.0.2.1": "10.9.0.2"}) == public  # no match: dialled as it is
    # Networks: any address of moto's goes to the stand-in; the most specific match wins, and
    # the public address is looked up before the private one.
    assert dialled({"0.0.0.0/0": "standin"}) == "standin"
    assert dialled({"0.0.0.0/0": "standin", f"{public}/32": "exact"}) == "exact"
    assert dialled({"0.0.0.0/0": "any", f"{private}/32": "private"}) == "any"
    assert dialled({"::/0": "v6 only"}) == public
    pending = Machine(machine.id, "pending", None, None, machine.launched_at)
    with pytest.raises(ProviderError, match="no address"):
        plain.dial_address(pending)


def test_an_interrupted_launch_is_cleaned_up_and_leftovers_swept(
    driver: MachineDriver, ec2: Any, public_key: str
) -> None:
    from providers.cloud.ec2 import Ec2Driver

    assert isinstance(driver, Ec2Driver)
    # RunInstances refused: the key pair and group made for it are removed again.
    spec = spec_for(driver, "env-x", public_key)
    with pytest.raises(ProviderError, match="run-instances env-x: InvalidInstanceType"):
        driver.launch(replace(spec, instance_type="no.such"))
    with pytest.raises(ProviderError, match="run-instances env-x: InvalidAMIID"):
        driver.launch(replace(spec, image_id="ami-00000000"))
    assert key_names(ec2) == [] and group_names(ec2) == []

    # A launch that died after its key and group (no instance): swept by owner; a relaunch of
    # the same environment reuses the names.
    ec2.import_key_pair(
        KeyName="narrative-env-y",
        PublicKeyMaterial=public_key.encode(),
        TagSpecifications=[
            {
                "ResourceType": "key-pair",
                "Tags": [{"Key": TAG_OWNER, "Value": OWNER}, {"Key": TAG_ENV, "Value": "env-y"}],
            }
        ],
    )
    live = driver.launch(spec_for(driver, "env-z", public_key))
    assert driver.sweep_leftovers(OWNER) == ["narrative-env-y"]
    assert key_names(ec2) == ["narrative-env-z"]
    assert driver.describe(live.id) is not None


def test_a_relaunch_replaces_the_leftover_key_and_resets_the_leftover_group(
    driver: MachineDriver, ec2: Any, public_key: str, tmp_path: Path
) -> None:
    """An earlier launch of the environment died after its key and group: the new launch
    imports its own key over the old one and leaves the group with the SSH rule only."""
    old_key = tmp_path / "old"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(old_key)], check=True)
    mine = [
        {"Key": TAG_OWNER, "Value": OWNER},
        {"Key": TAG_ENV, "Value": "env-l"},
        {"Key": TAG_MANAGED, "Value": "true"},
    ]
    old_public = old_key.with_suffix(".pub").read_bytes()
    ec2.import_key_pair(KeyName="narrative-env-l", PublicKeyMaterial=old_public)
    group = ec2.create_security_group(
        GroupName="narrative-env-l",
        Description="left over",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": mine}],
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": ANYWHERE}],
    )

    machine = driver.launch(spec_for(driver, "env-l", public_key))

    instance = instances(ec2)[machine.id]
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group]
    (rule,) = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
    assert (rule["FromPort"], [r["CidrIp"] for r in rule["IpRanges"]]) == (22, [CIDR])
    (pair,) = ec2.describe_key_pairs(KeyNames=["narrative-env-l"])["KeyPairs"]
    assert tags_of(pair)[TAG_ENV] == "env-l"  # the new import, not the untagged old one

    # A group of that name that narrative did not make is not taken over.
    ec2.create_security_group(GroupName="narrative-env-f", Description="someone else's")
    with pytest.raises(ProviderError, match="not narrative's"):
        driver.launch(spec_for(driver, "env-f", public_key))
    assert "narrative-env-f" not in key_names(ec2)


def test_bad_input_is_one_clear_error(
    driver: MachineDriver, ec2: Any, public_key: str, ec2_endpoint: str
) -> None:
    private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n"
    for bad in ("not a key", private, f"{public_key}{public_key}", ""):
        with pytest.raises(InvalidInput, match="one OpenSSH public key line"):
            driver.launch(spec_for(driver, "env-k", bad))
    assert instances(ec2) == {} and key_names(ec2) == [] and group_names(ec2) == []
    with pytest.raises(ValueError, match="ssh_cidr"):
        CloudMachineConfig(image_id="ami-1", ssh_cidr="198.51.100.7/24")  # host bits set
    for override in ({"not-an-address": "x"}, {"10.0.0.1/8": "x"}, {"10.0.0.1": " "}):
        with pytest.raises(ValueError, match="address_override"):
            CloudMachineConfig(image_id="ami-1", ssh_cidr=CIDR, address_override=override)
    with pytest.raises(ValueError, match="extra"):
        CloudMachineConfig(image_id="ami-1", ssh_cidr=CIDR, secret_key="x")  # type: ignore[call-arg]


def test_an_unreachable_endpoint_is_provider_unavailable(
    ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from providers.errors import ProviderUnavailable

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no retries with backoff: the test is quick

    driver = make_driver("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        driver.list_labelled(OWNER)


def test_a_missing_sdk_is_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from providers.cloud.drivers import open_driver

    monkeypatch.setitem(sys.modules, "providers.cloud.ec2", None)
    with pytest.raises(MissingDependency, match=r"narrative-engine\[cloud\]"):
        open_driver(CloudMachineConfig(image_id="ami-1", ssh_cidr=CIDR))


def test_racing_launches_never_leave_more_than_max_machines_live(
    ec2: Any, ec2_endpoint: str, public_key: str
) -> None:
    """Six processes launch at once with room for two: each passes the first count before
    any machine exists, so only the count after the launch keeps the cap."""
    import threading

    max_machines, launchers = 2, 6
    barrier = threading.Barrier(launchers)
    outcomes: dict[int, str] = {}

    def launch(n: int) -> None:
        driver = make_driver(ec2_endpoint, max_machines=max_machines)  # one per "process"
        driver.list_labelled(OWNER)  # the client is made and connected before the race
        barrier.wait()
        try:
            outcomes[n] = driver.launch(spec_for(driver, f"env-r{n}", public_key)).id
        except QuotaExceeded:
            outcomes[n] = "refused"

    threads = [threading.Thread(target=launch, args=(n,)) for n in range(launchers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(outcomes) == launchers
    launched = sorted(v for v in outcomes.values() if v != "refused")
    live = sorted(m.id for m in make_driver(ec2_endpoint).list_labelled(OWNER))
    assert live == launched
    assert len(live) <= max_machines
    # A refused launch leaves nothing behind.
    kept = {tags_of(instances(ec2)[i])[TAG_ENV] for i in live}
    assert key_names(ec2) == group_names(ec2) == sorted(f"narrative-{env}" for env in kept)
