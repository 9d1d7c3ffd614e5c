"""``hybrid``: one environment made of two of the same store.

The agent loop runs in the ``agent`` environment (any provider: a container, a worktree...);
the capability calls named by ``route`` (``llm:*``, ``fs:*``...) are served in the ``tools``
environment. This provider does the first half: every lifecycle step and operation (commands,
files, restore, collect, background processes, reset, usage) is the agent environment's,
through its own provider, with the agent environment's record moved by the
:class:`~providers.manager.EnvironmentManager` on start and stop. The second half is the hub's
(only it knows both environments while a run lasts): it leases the tools environment too,
starts a gateway node there that serves the routed capabilities, and routes them to it (see
:mod:`gateway.hub.tools_node`).

The two environments stay the user's own: deleting the hybrid environment ends what runs in the
agent environment and forgets the pair, leaving both environments and their files; starting it
starts both; stopping it stops the agent environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field

from narrative.errors import InvalidInput
from narrative.ids import RULE_KEY_PATTERN

from .base import (
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
from .errors import EnvironmentNotFound, ProviderError, ResourceGone
from .lifecycle import EnvState
from .manager import EnvironmentManager
from .records import EnvironmentRecord
from .usage import UsageMeter

if TYPE_CHECKING:
    from narrative.models import Snapshot
    from narrative.store import Store

__all__ = ["HybridConfig", "HybridProvider", "route_types"]

_ENV_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RouteKey = Annotated[str, Field(pattern=RULE_KEY_PATTERN)]


class HybridConfig(ProviderConfig):
    type: Literal["hybrid"] = "hybrid"
    agent: str = Field(pattern=_ENV_NAME)
    """The environment the agent loop runs in (an existing environment of this store)."""
    tools: str = Field(pattern=_ENV_NAME)
    """The environment the routed capabilities are served in (another existing one)."""
    route: Annotated[list[RouteKey], Field(min_length=1, max_length=64)]
    """Capability calls served in the tools environment, as routing rule keys
    (``["llm:*", "fs:*"]``, ``fs:readFile``...; not ``*``: the agent's own calls stay)."""
    handlers: list[str] = Field(default_factory=list)
    """Handler plugins (``module[:function]``, importable in the tools environment) the
    tools environment's gateway node loads besides the built-in ``fs`` and ``exec`` ones:
    what serves ``llm:*`` there, say."""


def route_types(route: Sequence[str]) -> frozenset[str]:
    """The capability types a route list sends away (``fs:*`` → ``fs``)."""
    return frozenset(key.partition(":")[0] for key in route)


def _check_route(route: Sequence[str]) -> None:
    seen: set[str] = set()
    for key in route:
        canonical = key[:-2] if key.endswith(":*") else key
        if canonical.partition(":")[0] == "*" or not re.match(RULE_KEY_PATTERN, key):
            raise InvalidInput(
                f"hybrid route {key!r} must name a capability type (type or type:action)"
            )
        if canonical in seen:
            raise InvalidInput(f"hybrid route {key!r} is given twice")
        seen.add(canonical)


class HybridProvider(BaseProvider):
    """An environment whose agent runs in one environment and whose routed capabilities are
    served in another (see the module docstring)."""

    name = "hybrid"
    category = "hybrid"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    config_model = HybridConfig
    preference = 1000  # never picked for a --require: it needs two environments named
    spawn_log_on_host: ClassVar[bool] = True
    """The log path is handed to the agent environment's provider: directory providers write
    it; the others keep the output inside and :meth:`read_spawn_log` fetches it from there."""

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        super().__init__(context, config)
        self._components: EnvironmentManager | None = None

    @property
    def hybrid(self) -> HybridConfig:
        assert isinstance(self.config, HybridConfig)
        return self.config

    @classmethod
    def capabilities_in(cls, config: ProviderConfig, store: Store) -> frozenset[str]:
        """The agent environment's capabilities and the routed capability types; refuses
        components that do not exist, are hybrid themselves, or are one environment."""
        assert isinstance(config, HybridConfig)
        _check_route(config.route)
        if config.agent == config.tools:
            raise InvalidInput(f"hybrid: agent and tools are both {config.agent!r}; name two")
        manager = EnvironmentManager(store)
        agent, tools = (_component(manager, config, role) for role in ("agent", "tools"))
        if agent.id == tools.id:
            raise InvalidInput(f"hybrid: {config.agent!r} and {config.tools!r} are one environment")
        return frozenset(agent.capabilities) | route_types(config.route)

    # -- the agent environment ------------------------------------------------------------------

    def _manager(self) -> EnvironmentManager:
        if self._components is None:
            self._components = EnvironmentManager(self.context.store)
        return self._components

    def component(self, role: Literal["agent", "tools"]) -> EnvironmentRecord:
        """The live record of the agent or tools environment.

        Raises:
            ResourceGone: it was deleted (or renamed) since this environment was created.
        """
        try:
            return _component(self._manager(), self.hybrid, role)
        except InvalidInput:
            name = getattr(self.hybrid, role)
            raise ResourceGone(f"{role} environment {name!r} of {self.context.env_name}") from None

    def _agent(self) -> tuple[BaseProvider, str]:
        """The agent environment's provider and resource."""
        record = self.component("agent")
        if record.resource_id is None:
            raise ProviderError(f"environment {record.name!r} has no resource (creation failed)")
        return self._manager().provider(record), record.resource_id

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        self.component("agent")
        self.component("tools")
        return f"hybrid:{self.context.env_id}"

    def start(self, resource_id: str) -> None:
        """Start both environments (each through the manager, so their records follow)."""
        for record in (self.component("agent"), self.component("tools")):
            if record.state is not EnvState.RUNNING:
                self._manager().start(record.id)

    def stop(self, resource_id: str) -> None:
        """Stop the agent environment (the tools environment may serve others: it stays)."""
        record = self.component("agent")
        if record.state is EnvState.RUNNING:
            self._manager().stop(record.id)

    def delete(self, resource_id: str) -> None:
        """End what runs in the agent environment (what the pair started runs there; as a
        stop does) and forget the pair; both environments and their files stay the user's."""
        try:
            provider, resource = self._agent()
        except ProviderError:  # ResourceGone included
            return  # deleted or never made: nothing of it runs
        provider.end_leftovers(resource)

    def reconnect(self, resource_id: str) -> None:
        self.component("tools")
        provider, resource = self._agent()
        provider.reconnect(resource)

    def health(self, resource_id: str) -> Health:
        try:
            self.component("tools")
            provider, resource = self._agent()
        except ResourceGone:
            return Health.GONE
        return provider.health(resource)

    # -- operations: the agent environment's ----------------------------------------------------

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        provider, resource = self._agent()
        return provider.exec(resource, argv, env=env, timeout=timeout, on_output=on_output)

    def read_file(self, resource_id: str, path: str) -> bytes:
        provider, resource = self._agent()
        return provider.read_file(resource, path)

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        provider, resource = self._agent()
        provider.write_file(resource, path, data)

    def delete_file(self, resource_id: str, path: str) -> None:
        provider, resource = self._agent()
        provider.delete_file(resource, path)

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        provider, resource = self._agent()
        provider.restore(resource, snapshot)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        provider, resource = self._agent()
        return provider.collect(resource, thread_id, run_id, message)

    def end_leftovers(self, resource_id: str) -> None:
        provider, resource = self._agent()
        provider.end_leftovers(resource)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        provider, resource = self._agent()
        provider.reset(resource, snapshot)

    def prepare_for_run(self, resource_id: str, snapshot: Snapshot | None) -> None:
        provider, resource = self._agent()
        provider.prepare_for_run(resource, snapshot)

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        provider, resource = self._agent()
        return provider.spawn(resource, argv, env=env, log_path=log_path)

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        provider, resource = self._agent()
        return provider.spawn_runtime(resource, argv, env=env, log_path=log_path)

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        provider, resource = self._agent()
        provider.signal(resource, handle, sig)

    def alive(self, resource_id: str, handle: str) -> bool:
        provider, resource = self._agent()
        return provider.alive(resource, handle)

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        provider, resource = self._agent()
        return provider.read_spawn_log(
            resource, handle, log_path=log_path, since=since, limit=limit
        )

    def usage_meter(self, resource_id: str) -> UsageMeter:
        provider, resource = self._agent()
        return provider.usage_meter(resource)

    def warnings(self) -> list[str]:
        config = self.hybrid
        routed = ", ".join(config.route)
        notes = [f"calls to {routed} are served in environment {config.tools!r}, with its access"]
        try:
            provider, _resource = self._agent()
        except ProviderError:
            return notes
        return [*provider.warnings(), *notes]

    def runtime_command(self) -> list[str]:
        provider, _resource = self._agent()
        return provider.runtime_command()

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        provider, resource = self._agent()
        return provider.hub_socket(resource)

    def check_runtime(self, resource_id: str) -> None:
        provider, resource = self._agent()
        provider.check_runtime(resource)


def _component(manager: EnvironmentManager, config: HybridConfig, role: str) -> EnvironmentRecord:
    """The live environment named by ``config``'s ``role`` key, refusing a hybrid one."""
    name = getattr(config, role)
    try:
        record = manager.get(name)
    except EnvironmentNotFound:
        record = None
    if record is None or record.state is EnvState.ARCHIVED:
        raise InvalidInput(f"hybrid: {role} environment {name!r} does not exist")
    if record.provider == HybridProvider.name:
        raise InvalidInput(f"hybrid: {role} environment {name!r} is hybrid itself (no nesting)")
    return record
