"""The machine driver interface: what the ``cloud-vm`` provider needs from a cloud API.

A driver launches one VM per environment, reachable over SSH only, and finds it again from its
id alone (no state of its own besides its configuration): every machine carries tags naming the
store's owner label (``narrative:owner``), the environment id (``narrative:env``) and
``narrative:managed=true``, and its last use (``narrative:last-used``), so that any process can
sweep leaked machines and decide which ones have idled past the time-to-live. The base class
holds what every cloud shares: the cap on the number of machines (:meth:`MachineDriver.launch`
refuses the one past ``max_machines`` before any write), the idle time-to-live
(:meth:`~MachineDriver.expired`, :meth:`~MachineDriver.reap_idle`) and the address actually
dialled (:meth:`~MachineDriver.dial_address`, through ``address_override``). A cloud's driver
implements the abstract methods (``_launch``, ``_set_tags``, ``describe``, ``terminate``,
``list_labelled``); see ``docs/cloud-vm.md`` for adding one.

Credentials never pass through here: drivers take them from their SDK's usual chain
(environment, shared config, instance role), and records keep only machine ids.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from narrative.errors import InvalidInput

from ..errors import ProviderError, QuotaExceeded, ResourceGone

__all__ = [
    "LIVE_STATES",
    "TAG_ENV",
    "TAG_HOST_KEY",
    "TAG_IDLE_TTL",
    "TAG_LAST_USED",
    "TAG_MANAGED",
    "TAG_NAME",
    "TAG_OWNER",
    "CloudMachineConfig",
    "LaunchSpec",
    "Machine",
    "MachineDriver",
    "format_time",
    "parse_host_key_fingerprints",
    "parse_time",
]

log = logging.getLogger(__name__)

TAG_OWNER = "narrative:owner"
"""The store's owner label (``ProviderContext.owner``): what the sweep and the cap count by."""
TAG_ENV = "narrative:env"
"""The environment id the machine was launched for."""
TAG_NAME = "narrative:name"
"""The environment's name (for people looking at the cloud console)."""
TAG_MANAGED = "narrative:managed"
"""Always ``true``: the machine was launched by narrative and may be terminated by it."""
TAG_LAST_USED = "narrative:last-used"
"""When the machine was last used (:func:`format_time`), set by :meth:`MachineDriver.touch`."""
TAG_IDLE_TTL = "narrative:idle-ttl"
"""The seconds of ``idle_ttl`` it was launched with: its own time-to-live, whichever
configuration reaps it."""
TAG_HOST_KEY = "narrative:host-key"
"""The fingerprint of the SSH host key the machine is trusted with (set once it is pinned)."""

_FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
_FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"
_FINGERPRINT_RE = re.compile(r"\bSHA256:[A-Za-z0-9+/]{43}(?![A-Za-z0-9+/])")

# One line: the key type, base64 of the key, an optional comment.
_PUBLIC_KEY_RE = re.compile(
    r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}( [^\n]*)?"
)

LIVE_STATES = frozenset({"pending", "running", "stopping", "stopped"})
"""Machine states that count against the cap (anything not on its way out)."""


def format_time(when: datetime) -> str:
    """``2026-12-05T22:30:00Z``: a tag value of a UTC instant, to the second."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """The instant of a :func:`format_time` tag value; None for a missing or garbled one."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_host_key_fingerprints(console: str) -> list[str]:
    """The SHA256 fingerprints of the first ``BEGIN SSH HOST KEY FINGERPRINTS`` block that
    cloud-init printed to a machine's console (lines may carry a prefix such as ``ec2:`` or a
    kernel timestamp); empty when there is no complete block. The first block is the one
    written at first boot, before anything else ran on the machine."""
    inside, found = False, list[str]()
    for line in console.splitlines():
        if _FINGERPRINTS_BEGIN in line:
            inside, found = True, []
        elif _FINGERPRINTS_END in line and inside:
            return found
        elif inside:
            found += _FINGERPRINT_RE.findall(line)
    return []


@dataclass(frozen=True)
class Machine:
    """One VM as the cloud describes it right now."""

    id: str
    """The cloud's id of the machine (EC2: ``i-...``): the environment's resource id."""
    state: str
    """The cloud's word for its state, lower case (EC2: ``pending``, ``running``,
    ``stopping``, ``stopped``, ``shutting-down``, ``terminated``)."""
    public_address: str | None
    private_address: str | None
    launched_at: datetime
    """When the cloud started it (timezone-aware, UTC)."""
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def owner(self) -> str | None:
        """The store owner label it carries."""
        return self.tags.get(TAG_OWNER)

    @property
    def env_id(self) -> str | None:
        """The environment it was launched for."""
        return self.tags.get(TAG_ENV)

    @property
    def last_used(self) -> datetime | None:
        """Its ``narrative:last-used`` tag, if set and readable."""
        return parse_time(self.tags.get(TAG_LAST_USED))

    @property
    def idle_ttl(self) -> int | None:
        """The idle time-to-live it was launched with (its ``narrative:idle-ttl`` tag)."""
        text = self.tags.get(TAG_IDLE_TTL, "")
        return int(text) if text.isdigit() and int(text) > 0 else None

    @property
    def live(self) -> bool:
        """Whether it counts against the cap (not shutting down or terminated)."""
        return self.state in LIVE_STATES


@dataclass(frozen=True)
class LaunchSpec:
    """What :meth:`MachineDriver.launch` makes (see :meth:`CloudMachineConfig.launch_spec`)."""

    name: str
    """The environment's name (the machine's ``Name``)."""
    owner: str
    """The store's owner label (``ProviderContext.owner``)."""
    env_id: str
    """The environment id: names the key pair and the firewall the machine gets."""
    public_key: str
    """An OpenSSH public key line (``ssh-ed25519 AAAA... comment``) the machine accepts."""
    image_id: str
    instance_type: str
    ssh_cidr: str
    """The only source network allowed to reach the machine, on TCP port 22 only."""
    tags: Mapping[str, str] = field(default_factory=dict)
    """More tags (the ``narrative:*`` ones above are set by the driver and win)."""

    def all_tags(self, now: datetime) -> dict[str, str]:
        """Every tag the machine is launched with; its last use starts as its launch."""
        return {
            **self.tags,
            "Name": self.name,
            TAG_OWNER: self.owner,
            TAG_ENV: self.env_id,
            TAG_NAME: self.name,
            TAG_MANAGED: "true",
            TAG_LAST_USED: format_time(now),
        }


class CloudMachineConfig(BaseModel):
    """Where and what to launch, how many, and for how long unused. Each field's docstring is
    its ``--help`` text (:func:`providers.base.config_help`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    driver: Literal["ec2"] = "ec2"
    """The cloud API (only ``ec2`` so far)."""
    region: str = "us-east-1"
    """The cloud region machines are launched in."""
    endpoint_url: str | None = None
    """Another endpoint for the cloud API (a test server such as moto); None: the cloud's own."""
    image_id: str
    """The machine image (EC2: an AMI id) with sshd and Python 3.11+."""
    instance_type: str = "t3.small"
    """The machine size (EC2: an instance type)."""
    subnet_id: str | None = None
    """The subnet to launch in (its network gets the firewall); None: the default network."""
    ssh_cidr: str
    """The only source network allowed in, on TCP port 22 only (e.g. your address/32)."""
    max_machines: int = Field(default=4, ge=1)
    """At most this many live machines with this store's owner label at a time."""
    idle_ttl: int = Field(default=3600, ge=1)
    """Seconds a machine may stay unused before it is terminated as idle."""
    ready_timeout: float = Field(default=300.0, gt=0)
    """Seconds to wait for a launched machine to run and have an address."""
    address_override: dict[str, str] = Field(default_factory=dict)
    """Machine address or network (CIDR) -> host actually dialled (a NAT, a bastion, or a
    test's stand-in for the machine); the most specific match wins, and an address matching
    none is dialled as it is."""
    tags: dict[str, str] = Field(default_factory=dict)
    """More tags for every machine (cost centre, team); not secrets."""

    @field_validator("ssh_cidr")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            raise ValueError(f"ssh_cidr must be a network such as 203.0.113.7/32: {exc}") from exc

    @field_validator("address_override")
    @classmethod
    def _override_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key, target in value.items():
            try:
                ipaddress.ip_network(key, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"address_override key {key!r} must be an address or a network: {exc}"
                ) from exc
            if not target.strip():
                raise ValueError(f"address_override maps {key!r} to nothing")
        return value

    def override_for(self, address: str) -> str | None:
        """The host ``address_override`` dials instead of ``address`` (the match with the
        longest prefix), or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a DNS name: the keys are addresses and networks only
            return None
        matches = [
            (network.prefixlen, target)
            for key, target in self.address_override.items()
            if ip in (network := ipaddress.ip_network(key))
        ]
        return max(matches)[1] if matches else None

    def launch_spec(self, *, name: str, owner: str, env_id: str, public_key: str) -> LaunchSpec:
        """The spec of an environment's machine under this configuration."""
        return LaunchSpec(
            name=name,
            owner=owner,
            env_id=env_id,
            public_key=public_key,
            image_id=self.image_id,
            instance_type=self.instance_type,
            ssh_cidr=self.ssh_cidr,
            tags={**self.tags, TAG_IDLE_TTL: str(self.idle_ttl)},
        )


class MachineDriver(ABC):
    """One cloud's API. Stateless apart from its configuration: a fresh process with the same
    configuration manages machines an earlier one launched."""

    name: ClassVar[str]
    """The ``driver`` value of :class:`CloudMachineConfig` that picks this class."""

    def __init__(self, config: CloudMachineConfig) -> None:
        self.config = config

    # -- what each cloud implements -------------------------------------------------------------

    @abstractmethod
    def _launch(self, spec: LaunchSpec, now: datetime) -> Machine:
        """Create the machine (its key, firewall and tags ``spec.all_tags(now)``) without
        waiting for it to run; clean up what it made when it fails."""

    @abstractmethod
    def describe(self, machine_id: str) -> Machine | None:
        """The machine now; None when it is terminated, shutting down, or unknown."""

    @abstractmethod
    def terminate(self, machine_id: str) -> None:
        """Terminate the machine and remove its key and firewall. Idempotent: a machine (or
        key, or firewall) that is gone already is fine; an unknown id is no error."""

    @abstractmethod
    def list_labelled(self, owner: str) -> list[Machine]:
        """Every live machine (:attr:`Machine.live`) carrying this owner label."""

    @abstractmethod
    def _set_tags(self, machine_id: str, tags: Mapping[str, str]) -> None:
        """Add or replace tags on the machine."""

    def _console_output(self, machine_id: str) -> str:
        """What the machine printed to its console so far (empty when nothing yet).

        Raises:
            ProviderError: this cloud's driver cannot read consoles (the default).
        """
        raise ProviderError(
            f"the {self.name} driver cannot read a machine's console: use host_keys=pinned "
            "with the host key's fingerprint, or host_keys=first-use"
        )

    # -- shared ---------------------------------------------------------------------------------

    def host_key_fingerprints(self, machine_id: str, timeout: float) -> list[str]:
        """The SSH host key fingerprints the machine printed to its console at first boot
        (:func:`parse_host_key_fingerprints`), waiting up to ``timeout`` seconds for them.

        Raises:
            ResourceGone: the machine is terminated meanwhile.
            ProviderError: none within ``timeout`` (the image does not run cloud-init, or
                prints no fingerprints).
        """
        deadline = time.monotonic() + timeout
        delay = 0.5
        while not (found := parse_host_key_fingerprints(self._console_output(machine_id))):
            if self.describe(machine_id) is None:
                raise ResourceGone(machine_id)
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"machine {machine_id} printed no SSH host key fingerprints to its console "
                    f"within {timeout:g} s (an image without cloud-init prints none): use "
                    "host_keys=pinned with a fingerprint checked out of band, or host_keys="
                    "first-use to trust the first key offered"
                )
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, 10.0)
        return found

    def set_tags(self, machine_id: str, tags: Mapping[str, str]) -> None:
        """Add or replace tags on the machine (``narrative:*`` ones are the driver's)."""
        self._set_tags(machine_id, tags)

    def launch(self, spec: LaunchSpec, *, now: datetime | None = None) -> Machine:
        """Launch a machine for ``spec`` (returned as soon as the cloud accepted it; see
        :meth:`wait_ready`).

        Raises:
            QuotaExceeded: ``max_machines`` machines with ``spec.owner``'s label are live
                already: nothing was created; or launches racing in other processes passed
                the cap meanwhile: this one's machine was terminated again.
            InvalidInput: the public key is no OpenSSH public key line.
            ProviderError: the cloud refused (its message included).
            ProviderUnavailable: the cloud API cannot be reached, or no credentials.
        """
        if not _PUBLIC_KEY_RE.fullmatch(spec.public_key.strip()):
            raise InvalidInput(
                "the machine needs one OpenSSH public key line (ssh-ed25519 AAAA...), "
                "never a private key"
            )
        limit = self.config.max_machines
        live = self.list_labelled(spec.owner)
        if len(live) >= limit:
            raise QuotaExceeded(limit, sorted(m.id for m in live))
        machine = self._launch(spec, now or datetime.now(UTC))
        # Launches racing in other processes passed the same count: counted again, each one
        # that finds the cap passed backs off. The last to count sees every machine still
        # live, so no more than the cap stay live (racers may all back off: retry).
        live = self.list_labelled(spec.owner)
        if len(live) > limit:
            log.info("terminating %s: %d machines are live, max %d", machine.id, len(live), limit)
            self.terminate(machine.id)
            raise QuotaExceeded(limit, sorted(m.id for m in live if m.id != machine.id))
        log.info("launched %s for %s (%s)", machine.id, spec.env_id, spec.name)
        return machine

    def wait_ready(self, machine_id: str, timeout: float | None = None) -> Machine:
        """Wait until the machine runs and has an address (public or private).

        Raises:
            ResourceGone: it is terminated or unknown.
            ProviderError: it is not ready within ``timeout`` (default ``ready_timeout``).
        """
        limit = self.config.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.2
        while True:
            machine = self.describe(machine_id)
            if machine is None:
                raise ResourceGone(machine_id)
            if machine.state == "running" and (machine.public_address or machine.private_address):
                return machine
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"machine {machine_id} is not running with an address after {limit:g} s "
                    f"(state {machine.state})"
                )
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, 5.0)

    def machine_for(self, machine_id: str, *, owner: str, env_id: str) -> Machine:
        """The live machine ``machine_id`` if it was launched for environment ``env_id`` of
        ``owner`` (what a reconnect from a record checks).

        Raises:
            ResourceGone: it is terminated, unknown, or some other environment's machine.
        """
        machine = self.describe(machine_id)
        if machine is None or machine.owner != owner or machine.env_id != env_id:
            raise ResourceGone(machine_id)
        return machine

    def dial_address(self, machine: Machine) -> str:
        """The host to SSH to: its public address, else its private one, mapped through
        ``address_override`` (its public address is looked up first, then its private one).

        Raises:
            ProviderError: the machine has no address yet.
        """
        for address in (machine.public_address, machine.private_address):
            if address and (target := self.config.override_for(address)) is not None:
                return target
        address = machine.public_address or machine.private_address
        if not address:
            raise ProviderError(f"machine {machine.id} has no address (state {machine.state})")
        return address

    def touch(self, machine_id: str, *, now: datetime | None = None) -> None:
        """Record ``now`` as the machine's last use (its ``narrative:last-used`` tag), so
        that every process reaps by the same clock: call it when a run starts and ends."""
        self._set_tags(machine_id, {TAG_LAST_USED: format_time(now or datetime.now(UTC))})

    def expired(self, machine: Machine, last_used: datetime | None, now: datetime) -> bool:
        """Whether the machine has been unused for longer than its idle time-to-live at
        ``now``: the ``idle_ttl`` it was launched with (its tag), else this configuration's.

        Its last use is the latest of ``last_used`` (what the caller knows, e.g. from its
        records), its ``narrative:last-used`` tag and its launch: a use any source knows of
        keeps it alive.
        """
        known = [t for t in (last_used, machine.last_used, machine.launched_at) if t is not None]
        ttl = machine.idle_ttl or self.config.idle_ttl  # its own, whoever reaps
        return now - max(known) > timedelta(seconds=ttl)

    def reap_idle(
        self,
        owner: str,
        last_used_by_id: Mapping[str, datetime] | None = None,
        now: datetime | None = None,
    ) -> list[str]:
        """Terminate the owner's machines unused for longer than ``idle_ttl``; their ids.

        ``last_used_by_id`` adds what the caller knows of machines' last use (see
        :meth:`expired`). A machine running a run must have been touched when the run started,
        or it may be reaped under it.

        Raises:
            ProviderError: some idle machines could not be terminated (named, with why); the
                others were terminated all the same.
        """
        moment = now or datetime.now(UTC)
        known = last_used_by_id or {}
        reaped, failed = [], []
        for machine in self.list_labelled(owner):
            if not self.expired(machine, known.get(machine.id), moment):
                continue
            ttl = machine.idle_ttl or self.config.idle_ttl
            log.info("terminating %s: idle for longer than %d s", machine.id, ttl)
            try:
                self.terminate(machine.id)
            except ProviderError as exc:  # one that cannot go keeps no other alive
                failed.append(f"{machine.id}: {exc}")
                continue
            reaped.append(machine.id)
        if failed:
            done = f" (terminated {', '.join(reaped)})" if reaped else ""
            raise ProviderError(f"could not terminate idle machines{done}: {'; '.join(failed)}")
        return reaped
