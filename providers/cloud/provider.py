"""The ``cloud-vm`` provider: one cloud VM per environment, launched through a machine driver
(:mod:`providers.cloud.driver`) and then driven exactly like an ``ssh`` host, by an
:class:`~providers.ssh.provider.SSHProvider` pointed at the machine.

The resource id ``vm:<machine id>:<env id>:<host key>:<address>`` says everything a fresh
process needs: which machine to describe, terminate and tag, which environment directory on it
(``ssh:<env id>``), the fingerprint of the host key it is trusted with (``SHA256:...``, or
``-`` for a leaked machine whose key was never pinned) and the address dialled (after
``address_override``; ``-`` for a machine without one).

Host keys are trusted strictly (``host_keys``): ``console`` (default) pins the key the machine
offers only if it is among the fingerprints cloud-init printed to the machine's console at
first boot, read through the cloud's API; ``pinned`` takes the fingerprint from the config;
``first-use`` (an explicit opt-in) pins whatever key the machine offers first, and says so in
the environment's log and ``env show`` warnings. Either way the key is held strictly
afterwards, and the user's ``known_hosts`` is not consulted (cloud addresses are recycled).

Every operation but ``health``, ``reconnect``, ``delete`` and ``list_resources`` records the
machine's use (its ``narrative:last-used`` tag, at most once a minute per process); ``narrative
env sweep`` terminates machines of this store idle past their ``idle_ttl`` (in
:meth:`CloudVMProvider.list_resources`), except those still running a process of their
environment (a run in progress makes no calls), then the leaked ones no record knows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from narrative.errors import InvalidInput
from narrative.ids import is_id

from ..base import (
    SPAWN_LOG_LIMIT,
    BaseProvider,
    ExecResult,
    Health,
    HubSocket,
    OutputFn,
    ProviderConfig,
    ProviderContext,
    Signal,
    SpawnLog,
)
from ..errors import ProviderError, ProviderUnavailable, ResourceGone
from ..proctree import environment_marker
from ..ssh.config import FINGERPRINT, SSHConfig, SSHSessionSettings
from ..ssh.target import default_key_file
from .driver import TAG_HOST_KEY, CloudMachineConfig, Machine, MachineDriver
from .drivers import open_driver

if TYPE_CHECKING:
    from narrative.models import Snapshot

    from ..ssh.provider import SSHProvider

__all__ = ["CloudVMConfig", "CloudVMProvider", "resource_id_of"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_RESOURCE = re.compile(
    r"vm:(?P<machine>[A-Za-z0-9._-]{1,128}):(?P<env>[A-Za-z0-9_-]{1,64}):"
    r"(?P<key>SHA256:[A-Za-z0-9+/]{43}|-):(?P<host>-|[A-Za-z0-9_.:\[\]]+)"
)
_TOUCH_EVERY = 60.0
"""Seconds between two records of a machine's use by one process."""
_SSH_PORT = 22
"""The only port the machine's firewall opens."""
_PROBE_TIMEOUT = 15.0
"""Seconds for asking a machine whether it is in use."""


class CloudVMConfig(ProviderConfig, CloudMachineConfig, SSHSessionSettings):
    """A cloud VM per environment (the machine settings of :class:`CloudMachineConfig`),
    driven over SSH like an ``ssh`` host (the login settings of :class:`SSHSessionSettings`)."""

    type: Literal["cloud-vm"] = "cloud-vm"
    """Discriminator of the provider configs."""
    host_keys: Literal["console", "pinned", "first-use"] = "console"
    """How a new machine's SSH host key is trusted: ``console`` (default), only a key whose
    fingerprint cloud-init printed to the machine's console (read through the cloud's API);
    ``pinned``, the fingerprint in ``host_key``; ``first-use``, whatever key the machine offers
    first (shown in the log and ``env show``). The key is held strictly afterwards."""
    host_key: str | None = None
    """With ``host_keys=pinned``: the machine's host key fingerprint (``SHA256:...``)."""
    host_key_timeout: float = Field(default=300.0, gt=0)
    """Seconds to wait for a new machine's console to show its host key fingerprints, and for
    its SSH server to answer."""

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, value: str | None) -> str | None:
        if value is not None and not FINGERPRINT.fullmatch(value):
            raise ValueError(f"host_key must be a SHA256:... fingerprint ({value!r})")
        return value

    @model_validator(mode="after")
    def _pinned_needs_key(self) -> CloudVMConfig:
        if (self.host_keys == "pinned") != (self.host_key is not None):
            raise ValueError("host_key is given with host_keys=pinned, and only then")
        return self

    def public_key(self) -> str:
        """The OpenSSH public key line of ``key_file`` (its ``.pub``): the machine's login.

        Raises:
            InvalidInput: there is no readable ``.pub`` next to the private key.
        """
        path = (os.path.expanduser(self.key_file) if self.key_file else default_key_file()) + ".pub"
        try:
            with open(path, encoding="utf-8") as file:
                return file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(
                f"cloud-vm: the machine's login key is the public half of key_file, and "
                f"{path} cannot be read ({exc}); make one with ssh-keygen -y -f KEY > KEY.pub"
            ) from None

    def ssh_config(self, host: str, host_key: str) -> SSHConfig:
        """The ``ssh`` provider's config of the machine at ``host`` trusted by ``host_key``:
        the user's known_hosts is not read (a cloud address is recycled, the pin decides)."""
        shared = set(SSHSessionSettings.model_fields) | set(ProviderConfig.model_fields)
        return SSHConfig(
            host=host,
            port=_SSH_PORT,
            known_hosts=os.devnull,
            host_key=host_key,
            **self.model_dump(include=shared),
        )


@dataclasses.dataclass(frozen=True)
class _Resource:
    machine: str
    env: str
    host_key: str | None
    host: str | None

    @property
    def ssh_resource(self) -> str:
        return f"ssh:{self.env}"


def resource_id_of(machine_id: str, env_id: str, host_key: str | None, host: str | None) -> str:
    """``vm:<machine>:<env>:<host key or ->:<address or ->``."""
    return f"vm:{machine_id}:{env_id}:{host_key or '-'}:{host or '-'}"


class CloudVMProvider(BaseProvider):
    name = "cloud-vm"
    category = "cloud"
    resets_without_store: ClassVar[bool] = True  # its workspace lives elsewhere
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"vm", "cloud", "ssh", "remote", "exec", "files", "python"}
    )
    config_model = CloudVMConfig
    preference = 90  # costs money: picked only when asked for by name or by "vm"
    runtime_hint = (
        "the machine image needs Python 3.11+ (--config python=...); the runtime is installed "
        "there from the wheelhouse, or set --config runtime=..."
    )

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        super().__init__(context, config)
        assert isinstance(config, CloudVMConfig)
        self.cfg = config
        self._driver: MachineDriver | None = None
        self._ssh: dict[str, SSHProvider] = {}
        self._touched: dict[str, float] = {}

    @property
    def driver(self) -> MachineDriver:
        if self._driver is None:
            self._driver = open_driver(self.cfg, self.name)
        return self._driver

    @classmethod
    def check_config(cls, config: ProviderConfig) -> None:
        """Before anything is recorded: the cloud's SDK is installed and the login key has
        its public half (nothing is launched yet)."""
        assert isinstance(config, CloudVMConfig)
        open_driver(config, cls.name)
        config.public_key()

    # -- resource ids and the ssh side ----------------------------------------------------------

    def _parse(self, resource_id: str) -> _Resource:
        match = _RESOURCE.fullmatch(resource_id) if isinstance(resource_id, str) else None
        if match is None:
            raise InvalidInput(f"not a resource of a cloud-vm environment: {resource_id!r}")
        key, host = (None if match[name] == "-" else match[name] for name in ("key", "host"))
        return _Resource(match["machine"], match["env"], key, host)

    def _ssh_for(self, res: _Resource) -> SSHProvider:
        from ..ssh.provider import SSHProvider

        if res.host is None or res.host_key is None:
            raise ProviderError(
                f"cloud-vm: machine {res.machine} was never reachable over SSH (no trusted "
                "host key recorded); delete the environment"
            )
        key = f"{res.host}|{res.host_key}|{res.env}"
        ssh = self._ssh.get(key)
        if ssh is None:
            context = dataclasses.replace(self.context, env_id=res.env)
            ssh = self._ssh[key] = SSHProvider(context, self.cfg.ssh_config(res.host, res.host_key))
        return ssh

    def _touch(self, machine_id: str) -> None:
        """Record a use of the machine, at most once a minute (a failure only logged: the
        operation matters more than the idle clock)."""
        now = time.monotonic()
        if now - self._touched.get(machine_id, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        try:
            self.driver.touch(machine_id)
        except ProviderError as exc:
            log.warning("cloud-vm: could not record the use of %s: %s", machine_id, exc)
            return
        self._touched[machine_id] = now

    def _use(self, resource_id: str, call: Callable[[SSHProvider, str], T]) -> T:
        """``call(ssh provider, ssh resource)`` on the machine, its use recorded; an SSH
        failure on a machine that is gone is :class:`ResourceGone`."""
        res = self._parse(resource_id)
        self._touch(res.machine)
        try:
            return call(self._ssh_for(res), res.ssh_resource)
        except ProviderUnavailable as exc:
            if self.driver.describe(res.machine) is None:
                raise ResourceGone(resource_id) from exc
            raise

    def _machine(self, res: _Resource) -> Machine:
        return self.driver.machine_for(res.machine, owner=self.context.owner, env_id=res.env)

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        """Launch the machine (refused past ``max_machines`` before anything is made), wait
        for it to run, trust its host key, then make the environment on it as the ``ssh``
        provider does. Any failure after the launch terminates the machine."""
        spec = self.cfg.launch_spec(
            name=self.context.env_name,
            owner=self.context.owner,
            env_id=self.context.env_id,
            public_key=self.cfg.public_key(),
        )
        machine = self.driver.launch(spec)
        try:
            machine = self.driver.wait_ready(machine.id)
            host = self.driver.dial_address(machine)
            host_key = self._trust(machine, host)
            self.driver.set_tags(machine.id, {TAG_HOST_KEY: host_key})
            res = _Resource(machine.id, self.context.env_id, host_key, host)
            ssh = self._ssh_for(res)
            type(ssh).check_config(ssh.cfg)
            ssh.create()
        except BaseException:
            log.warning("cloud-vm: terminating %s: its environment was not made", machine.id)
            try:
                self.driver.terminate(machine.id)
            except ProviderError:  # the creation's own error is the one to report
                log.warning("cloud-vm: could not terminate %s", machine.id, exc_info=True)
            raise
        self._touched[machine.id] = time.monotonic()
        return resource_id_of(machine.id, self.context.env_id, host_key, host)

    def _trust(self, machine: Machine, host: str) -> str:
        """The fingerprint of the host key to hold the machine to (see ``host_keys``)."""
        from ..ssh.session import offered_host_key

        timeout = self.cfg.host_key_timeout
        if self.cfg.host_keys == "pinned":
            assert self.cfg.host_key is not None
            return self.cfg.host_key
        printed = (
            self.driver.host_key_fingerprints(machine.id, timeout)
            if self.cfg.host_keys == "console"
            else []
        )
        offered = self._offered(host, timeout, offered_host_key)
        if self.cfg.host_keys == "first-use":
            log.warning(
                "cloud-vm: trusting the host key %s of %s (%s) on first use",
                offered,
                machine.id,
                host,
            )
            return offered
        if offered not in printed:
            raise ProviderError(
                f"cloud-vm: machine {machine.id} at {host} offers the host key {offered}, which "
                f"is not among those its console printed ({', '.join(printed)}): refused"
            )
        return offered

    def _offered(self, host: str, timeout: float, probe: Callable[[str, int, float], str]) -> str:
        """The fingerprint the machine's SSH server offers, once it answers (a machine that
        runs may not have started sshd yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return probe(host, _SSH_PORT, min(self.cfg.connect_timeout, timeout))
            except ProviderUnavailable:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(1.0)

    def start(self, resource_id: str) -> None:
        self.reconnect(resource_id)
        self._use(resource_id, lambda ssh, rid: ssh.start(rid))

    def stop(self, resource_id: str) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.stop(rid))

    def delete(self, resource_id: str) -> None:
        """Terminate the machine (and its key pair and firewall); an environment of a machine
        that still answers is removed from it first (its processes ended). A machine of another
        store or environment is left alone; one gone already is fine."""
        res = self._parse(resource_id)
        try:
            machine = self._machine(res)
        except ResourceGone:
            return
        if machine.state == "running" and res.host and res.host_key:
            try:
                self._ssh_for(res).delete(res.ssh_resource)
            except ProviderError as exc:  # terminating it removes everything anyway
                log.info("cloud-vm: %s not cleaned before terminating: %s", machine.id, exc)
        self.driver.terminate(machine.id)
        self._touched.pop(machine.id, None)

    def reconnect(self, resource_id: str) -> None:
        """The machine is this environment's and live (by the cloud), then its environment
        answers over SSH at the recorded address."""
        res = self._parse(resource_id)
        machine = self._machine(res)
        if machine.state != "running":
            raise ProviderUnavailable(f"cloud-vm: machine {machine.id} is {machine.state}")
        self._ssh_for(res).reconnect(res.ssh_resource)

    def health(self, resource_id: str) -> Health:
        """Terminated (or unknown): gone; pending, stopping, stopped: unreachable; running:
        what the ``ssh`` side says."""
        res = self._parse(resource_id)
        try:
            machine = self._machine(res)
        except ResourceGone:
            return Health.GONE
        except ProviderUnavailable:
            return Health.UNREACHABLE
        if machine.state != "running" or res.host is None or res.host_key is None:
            return Health.UNREACHABLE
        return self._ssh_for(res).health(res.ssh_resource)

    def list_resources(self) -> list[str]:
        """The machines labelled with this store's owner, after terminating those idle past
        their ``idle_ttl`` (so ``narrative env sweep`` reaps idle machines too)."""
        self._reap_idle()
        resources = []
        for machine in self.driver.list_labelled(self.context.owner):
            if not machine.env_id or not _RESOURCE.fullmatch(
                resource_id_of(machine.id, machine.env_id, None, None)
            ):
                continue
            try:
                host: str | None = self.driver.dial_address(machine)
            except ProviderError:
                host = None
            key = machine.tags.get(TAG_HOST_KEY)
            key = key if key and FINGERPRINT.fullmatch(key) else None
            resources.append(resource_id_of(machine.id, machine.env_id, key, host))
        return sorted(resources)

    def environment_of(self, resource_id: str) -> str | None:
        match = _RESOURCE.fullmatch(resource_id)
        return match["env"] if match and is_id(match["env"], "environment") else None

    def _reap_idle(self) -> None:
        """Terminate this store's machines idle past their time-to-live, except those still
        running a process an environment started (a long run makes no calls that count as
        uses): their use is recorded instead."""
        now = datetime.now(UTC)
        in_use: dict[str, datetime] = {}
        for machine in self.driver.list_labelled(self.context.owner):
            if self.driver.expired(machine, None, now) and self._busy(machine):
                in_use[machine.id] = now
                self._touch(machine.id)
        for machine_id in self.driver.reap_idle(self.context.owner, in_use, now):
            log.info("cloud-vm: terminated %s, idle past its time-to-live", machine_id)

    def _busy(self, machine: Machine) -> bool:
        """Whether a process of the machine's environment (its marker in its environment)
        runs there; a machine that cannot be asked counts as not busy."""
        key = machine.tags.get(TAG_HOST_KEY)
        if machine.state != "running" or not machine.env_id or not key:
            return False
        try:
            res = _Resource(machine.id, machine.env_id, key, self.driver.dial_address(machine))
            var, value = environment_marker(machine.env_id)
            probe = f"grep -lqsz {shlex.quote(f'^{var}={value}$')} /proc/[0-9]*/environ"
            result = self._ssh_for(res).session.run(probe, timeout=_PROBE_TIMEOUT)
        except ProviderError as exc:
            log.info("cloud-vm: cannot ask %s whether it is in use: %s", machine.id, exc)
            return False
        return result.exit_code == 0

    def warnings(self) -> list[str]:
        notes = []
        if self.cfg.host_keys == "first-use":
            try:
                key = self._parse(self._own_resource()).host_key or "not yet known"
            except (ProviderError, LookupError, InvalidInput):
                key = "not yet known"
            notes.append(
                f"cloud-vm: host_keys=first-use: the machine's host key {key} was trusted as "
                "it was first offered, not checked against its console; compare it with the "
                "machine's console output"
            )
        if self.cfg.sandbox == "none":
            notes.append(
                "cloud-vm: sandbox=none: commands run with everything the machine's user can "
                "reach there, other environments on the machine included"
            )
        return notes

    # -- operations: the ssh provider's, on the machine -----------------------------------------

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        return self._use(
            resource_id,
            lambda ssh, rid: ssh.exec(rid, argv, env=env, timeout=timeout, on_output=on_output),
        )

    def end_leftovers(self, resource_id: str) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.end_leftovers(rid))

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        return self._use(
            resource_id, lambda ssh, rid: ssh.spawn(rid, argv, env=env, log_path=log_path)
        )

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.signal(rid, handle, sig))

    def alive(self, resource_id: str, handle: str) -> bool:
        return self._use(resource_id, lambda ssh, rid: ssh.alive(rid, handle))

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        return self._use(
            resource_id,
            lambda ssh, rid: ssh.read_spawn_log(
                rid, handle, log_path=log_path, since=since, limit=limit
            ),
        )

    def runtime_command(self) -> list[str]:
        """The runtime on this environment's machine (from its record: the manager's own)."""
        return self._use(self._own_resource(), lambda ssh, _rid: ssh.runtime_command())

    def _own_resource(self) -> str:
        from ..records import EnvironmentStore

        record = EnvironmentStore(self.context.store).get(self.context.env_id)
        if record.resource_id is None:
            raise ProviderError(f"environment {record.name!r} has no machine yet")
        return record.resource_id

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        return self._use(resource_id, lambda ssh, rid: ssh.hub_socket(rid))

    def read_file(self, resource_id: str, path: str) -> bytes:
        return self._use(resource_id, lambda ssh, rid: ssh.read_file(rid, path))

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.write_file(rid, path, data))

    def delete_file(self, resource_id: str, path: str) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.delete_file(rid, path))

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.restore(rid, snapshot))

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        self._use(resource_id, lambda ssh, rid: ssh.reset(rid, snapshot))

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        return self._use(resource_id, lambda ssh, rid: ssh.collect(rid, thread_id, run_id, message))
