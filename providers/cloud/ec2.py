"""The EC2 machine driver (``boto3``, the ``cloud`` extra).

Per environment ``ENV`` it makes, all tagged with the owner label and ``narrative:env=ENV``:

* a key pair ``narrative-ENV`` imported from the environment's public key (the private key
  never leaves this machine);
* a security group ``narrative-ENV`` whose only ingress rule is TCP port 22 from ``ssh_cidr``.
  Its egress is EC2's default (everything out): the runtime on the machine dials the hub and
  installs nothing from the network, but a rule against egress would not stop an agent that
  controls the machine, so none is pretended;
* one instance from ``image_id`` with that key and group, no instance profile (so no cloud
  credentials on the machine) and instance metadata reachable with a session token only
  (IMDSv2).

:meth:`Ec2Driver.terminate` terminates the instance, waits for it to be gone (a group in use
cannot be deleted), then deletes the key pair and the group; anything gone already is fine.
It refuses an instance without ``narrative:managed=true``: a wrong id in a record must not end
someone's server. :meth:`Ec2Driver.sweep_leftovers` deletes key pairs and groups of this owner
left by a launch that was interrupted before its instance existed.

Credentials come from boto3's usual chain (environment, shared config, instance role) and are
never written anywhere by this module. Errors of botocore are translated in
:func:`api_errors`, the one place that knows them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from narrative.errors import InvalidInput

from ..errors import ProviderError, ProviderUnavailable
from .driver import (
    LIVE_STATES,
    TAG_ENV,
    TAG_MANAGED,
    TAG_OWNER,
    CloudMachineConfig,
    LaunchSpec,
    Machine,
    MachineDriver,
)

__all__ = ["Ec2Driver", "api_errors", "resource_name"]

log = logging.getLogger(__name__)

_GONE_CODES = frozenset(
    {
        "InvalidInstanceID.NotFound",
        "InvalidInstanceID.Malformed",
        "InvalidGroup.NotFound",
        "InvalidKeyPair.NotFound",
    }
)
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")


def resource_name(env_id: str) -> str:
    """The name of an environment's key pair and security group: ``narrative-ENV``."""
    if not _NAME_RE.fullmatch(env_id):
        raise InvalidInput(f"environment id {env_id!r} cannot name a cloud resource")
    return f"narrative-{env_id}"


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def api_errors(action: str, resource: str = "") -> Iterator[None]:
    """Translate what botocore raises inside into the providers error tree.

    Raises:
        ProviderUnavailable: no credentials, or the endpoint does not answer.
        InvalidInput: EC2 refused the public key's format.
        ProviderError: EC2 refused the call (its code and message included).
    """
    where = f"ec2 {action}" + (f" {resource}" if resource else "")
    try:
        yield
    except botocore.exceptions.NoCredentialsError as exc:
        raise ProviderUnavailable(
            f"{where}: no AWS credentials (set them up as for the aws CLI: environment "
            f"variables, ~/.aws/credentials or an instance role)"
        ) from exc
    except botocore.exceptions.ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", "")
        if _code(exc) == "InvalidKeyPair.Format":
            raise InvalidInput(f"{where}: the public key is refused: {message}") from exc
        raise ProviderError(f"{where}: {_code(exc)}: {message}") from exc
    except botocore.parsers.ResponseParserError as exc:  # e.g. an HTML error page
        raise ProviderError(f"{where}: unreadable reply from the EC2 API: {exc}") from exc
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        # Connection refused or timed out, a bad endpoint URL, a broken response.
        raise ProviderUnavailable(f"{where}: EC2 API unreachable: {exc}") from exc


def _ssh_rule(cidr: str) -> dict[str, Any]:
    """The ingress rule admitting TCP port 22 from ``cidr`` (IPv4 or IPv6), and nothing else."""
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    if ipaddress.ip_network(cidr).version == 6:
        rule["Ipv6Ranges"] = [{"CidrIpv6": cidr, "Description": "narrative SSH"}]
    else:
        rule["IpRanges"] = [{"CidrIp": cidr, "Description": "narrative SSH"}]
    return rule


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in sorted(tags.items())]


def _tag_dict(resource: Mapping[str, Any]) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in resource.get("Tags") or []}


def _machine(instance: Mapping[str, Any]) -> Machine:
    launched = instance.get("LaunchTime")
    return Machine(
        id=str(instance["InstanceId"]),
        state=str(instance.get("State", {}).get("Name", "unknown")),
        public_address=instance.get("PublicIpAddress") or None,
        private_address=instance.get("PrivateIpAddress") or None,
        launched_at=launched.astimezone(UTC) if launched else datetime.now(UTC),
        tags=_tag_dict(instance),
    )


class Ec2Driver(MachineDriver):
    """Machines on EC2 (or an EC2-compatible endpoint such as moto's server)."""

    name: ClassVar[str] = "ec2"

    def __init__(self, config: CloudMachineConfig) -> None:
        super().__init__(config)
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The boto3 EC2 client, made on first use (no network until then)."""
        if self._client is None:
            with api_errors("connect"):
                self._client = boto3.session.Session().client(
                    "ec2",
                    region_name=self.config.region,
                    endpoint_url=self.config.endpoint_url,
                    # Retries: botocore's standard mode, 3 attempts unless AWS_MAX_ATTEMPTS or
                    # the shared config says otherwise.
                    config=botocore.config.Config(
                        connect_timeout=10, read_timeout=60, retries={"mode": "standard"}
                    ),
                )
        return self._client

    # -- launch ---------------------------------------------------------------------------------

    def _launch(self, spec: LaunchSpec, now: datetime) -> Machine:
        name = resource_name(spec.env_id)
        owned = {TAG_OWNER: spec.owner, TAG_ENV: spec.env_id, TAG_MANAGED: "true"}
        self._import_key(name, spec.public_key, owned)
        try:
            group_id = self._security_group(name, spec.ssh_cidr, owned)
            with api_errors("run-instances", spec.env_id):
                reply = self.client.run_instances(
                    ImageId=spec.image_id,
                    InstanceType=spec.instance_type,
                    MinCount=1,
                    MaxCount=1,
                    KeyName=name,
                    SecurityGroupIds=[group_id],
                    # botocore's retry after a lost reply gets the same instance, not a
                    # second one; unique per launch, as a relaunch must get a new one.
                    ClientToken=f"{name}-{now.astimezone(UTC):%Y%m%dT%H%M%S%fZ}"[:64],
                    MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
                    TagSpecifications=[
                        {"ResourceType": kind, "Tags": _tag_list(spec.all_tags(now))}
                        for kind in ("instance", "volume")
                    ],
                    **({"SubnetId": self.config.subnet_id} if self.config.subnet_id else {}),
                )
        except BaseException:
            try:
                self._remove_key_and_group(name)
            except ProviderError:  # the launch's own error is the one to report
                log.warning("could not remove the key pair and group %s", name, exc_info=True)
            raise
        return _machine(reply["Instances"][0])

    def _import_key(self, name: str, public_key: str, tags: Mapping[str, str]) -> None:
        """Import the key pair; one left by an interrupted launch of the same environment is
        replaced (its key may differ)."""

        def import_key() -> None:
            self.client.import_key_pair(
                KeyName=name,
                PublicKeyMaterial=public_key.strip().encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": _tag_list(tags)}],
            )

        with api_errors("import-key-pair", name):
            try:
                import_key()
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "InvalidKeyPair.Duplicate":
                    raise
                self.client.delete_key_pair(KeyName=name)
                import_key()

    def _security_group(self, name: str, cidr: str, tags: Mapping[str, str]) -> str:
        """The environment's group, allowing exactly TCP port 22 from ``cidr`` in."""
        kwargs: dict[str, Any] = {}
        if self.config.subnet_id:
            with api_errors("describe-subnets", self.config.subnet_id):
                subnets = self.client.describe_subnets(SubnetIds=[self.config.subnet_id])
            kwargs["VpcId"] = subnets["Subnets"][0]["VpcId"]
        with api_errors("create-security-group", name):
            try:
                group_id = str(
                    self.client.create_security_group(
                        GroupName=name,
                        Description="narrative cloud-vm: SSH only",
                        TagSpecifications=[
                            {"ResourceType": "security-group", "Tags": _tag_list(tags)}
                        ],
                        **kwargs,
                    )["GroupId"]
                )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "InvalidGroup.Duplicate":
                    raise
                group_id = self._reset_leftover_group(name, tags, kwargs.get("VpcId"))
        with api_errors("authorize-security-group-ingress", name):
            self.client.authorize_security_group_ingress(
                GroupId=group_id, IpPermissions=[_ssh_rule(cidr)]
            )
        return group_id

    def _reset_leftover_group(self, name: str, tags: Mapping[str, str], vpc_id: str | None) -> str:
        """The group ``name`` left by an interrupted launch of this environment, emptied of
        ingress rules; a group of that name that is not ours is refused."""
        filters = [{"Name": "group-name", "Values": [name]}]
        if vpc_id:
            filters.append({"Name": "vpc-id", "Values": [vpc_id]})
        filters += [{"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()]
        groups = self.client.describe_security_groups(Filters=filters)["SecurityGroups"]
        if not groups:
            raise ProviderError(f"a security group named {name} exists and is not narrative's")
        group = groups[0]
        if group.get("IpPermissions"):
            self.client.revoke_security_group_ingress(
                GroupId=group["GroupId"], IpPermissions=group["IpPermissions"]
            )
        return str(group["GroupId"])

    # -- describe, list, tag --------------------------------------------------------------------

    def _instance(self, machine_id: str) -> dict[str, Any] | None:
        """The instance as EC2 describes it (terminated ones too); None when unknown."""
        with api_errors("describe-instances", machine_id):
            try:
                reply = self.client.describe_instances(InstanceIds=[machine_id])
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _GONE_CODES:
                    return None
                raise
        for reservation in reply.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return dict(instance)
        return None

    def describe(self, machine_id: str) -> Machine | None:
        instance = self._instance(machine_id)
        if instance is None:
            return None
        machine = _machine(instance)
        return machine if machine.live else None

    def list_labelled(self, owner: str) -> list[Machine]:
        filters = [
            {"Name": f"tag:{TAG_OWNER}", "Values": [owner]},
            {"Name": "instance-state-name", "Values": sorted(LIVE_STATES)},
        ]
        machines = []
        with api_errors("describe-instances", f"owner {owner}"):
            for page in self.client.get_paginator("describe_instances").paginate(Filters=filters):
                for reservation in page.get("Reservations", []):
                    machines += [_machine(i) for i in reservation.get("Instances", [])]
        return sorted(machines, key=lambda m: (m.launched_at, m.id))

    def _console_output(self, machine_id: str) -> str:
        with api_errors("get-console-output", machine_id):
            # botocore decodes the base64 of the reply; None until the machine printed anything
            return str(self.client.get_console_output(InstanceId=machine_id).get("Output") or "")

    def _set_tags(self, machine_id: str, tags: Mapping[str, str]) -> None:
        with api_errors("create-tags", machine_id):
            self.client.create_tags(Resources=[machine_id], Tags=_tag_list(tags))

    # -- terminate ------------------------------------------------------------------------------

    def terminate(self, machine_id: str) -> None:
        instance = self._instance(machine_id)
        if instance is None:
            return
        tags = _tag_dict(instance)
        if tags.get(TAG_MANAGED) != "true" or not tags.get(TAG_ENV):
            raise ProviderError(
                f"instance {machine_id} was not launched by narrative "
                f"(no {TAG_MANAGED}=true tag); it is left alone"
            )
        if _machine(instance).state != "terminated":
            with api_errors("terminate-instances", machine_id):
                try:
                    self.client.terminate_instances(InstanceIds=[machine_id])
                except botocore.exceptions.ClientError as exc:
                    if _code(exc) not in _GONE_CODES:
                        raise
            self._wait_terminated(machine_id)
        self._remove_key_and_group(resource_name(tags[TAG_ENV]))
        log.info("terminated %s", machine_id)

    def _wait_terminated(self, machine_id: str) -> None:
        """Until EC2 reports the instance terminated: its security group cannot be deleted
        before (DependencyViolation)."""
        deadline = time.monotonic() + self.config.ready_timeout
        delay = 0.2
        while (instance := self._instance(machine_id)) is not None:
            if _machine(instance).state == "terminated":
                return
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"instance {machine_id} is not terminated after "
                    f"{self.config.ready_timeout:g} s; delete it again later to finish"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _remove_key_and_group(self, name: str) -> None:
        """Delete the key pair and the security group ``name``; gone already is fine."""
        with api_errors("delete-key-pair", name):
            self.client.delete_key_pair(KeyName=name)  # no error for a missing key
        with api_errors("describe-security-groups", name):
            groups = self.client.describe_security_groups(
                Filters=[
                    {"Name": "group-name", "Values": [name]},
                    {"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]},
                ]
            )["SecurityGroups"]
        for group in groups:
            with api_errors("delete-security-group", group["GroupId"]):
                try:
                    self.client.delete_security_group(GroupId=group["GroupId"])
                except botocore.exceptions.ClientError as exc:
                    if _code(exc) not in _GONE_CODES:
                        raise

    def sweep_leftovers(self, owner: str) -> list[str]:
        """Delete key pairs and security groups of ``owner`` whose environment has no
        instance that is not terminated (left by an interrupted launch); their names."""
        with api_errors("describe-instances", f"owner {owner}"):
            in_use = {
                m.env_id
                for page in self.client.get_paginator("describe_instances").paginate(
                    Filters=[{"Name": f"tag:{TAG_OWNER}", "Values": [owner]}]
                )
                for reservation in page.get("Reservations", [])
                for m in map(_machine, reservation.get("Instances", []))
                if m.state != "terminated"
            }
        owned = [{"Name": f"tag:{TAG_OWNER}", "Values": [owner]}]
        with api_errors("describe-key-pairs", f"owner {owner}"):
            keys = self.client.describe_key_pairs(Filters=owned)["KeyPairs"]
            groups = self.client.describe_security_groups(Filters=owned)["SecurityGroups"]
        names = {
            resource_name(env)
            for resource in [*keys, *groups]
            if (env := _tag_dict(resource).get(TAG_ENV)) and env not in in_use
        }
        for name in sorted(names):
            log.info("sweeping leftover key pair and security group %s", name)
            self._remove_key_and_group(name)
        return sorted(names)
