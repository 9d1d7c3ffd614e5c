"""What a run over the hub is asked to do, and what it needs before it starts.

:class:`RunRequest` is the request as a control call carries it (and as the run's event log
records it, so a later hub can adopt the run); :func:`lease_environment` takes the environment
it names, or selects one; :func:`collect_from_environment` reads a run's result through the
provider when no runtime can ship it (used by the hub's driver and by the hub client).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from narrative.errors import InvalidInput, NarrativeError
from narrative.models import AgentRun
from providers.manager import EnvironmentManager

from .events import RunEventLog
from .leases import EnvironmentBusy
from .leases import EnvironmentLease as Lease
from .selection import select_environment

__all__ = ["RunRequest", "collect_from_environment", "lease_environment"]


@dataclass(frozen=True)
class RunRequest:
    """What to run, where, from which snapshot."""

    environment: str | None
    """The environment's name; None: the hub selects one with the ``require`` capabilities."""
    argv: list[str]
    agent: str = "agent"
    snapshot: str | None = None
    thread: str | None = None
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    routing: dict[str, Any] | None = None
    """``proxyExecution.json`` content for the runtime (default: the one in the snapshot)."""
    require: list[str] = field(default_factory=list)
    """Capabilities the selected environment must have (only without ``environment``)."""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RunRequest:
        """Validate a control call's payload."""
        argv = payload.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("'argv' must be a non-empty list of strings")
        env = payload.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise InvalidInput("'env' must map names to strings")
        timeout = payload.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise InvalidInput("'timeout' must be a positive number of seconds")
        routing = payload.get("routing")
        if routing is not None and not isinstance(routing, dict):
            raise InvalidInput("'routing' must be a proxyExecution document")
        strings = {}
        for name in ("environment", "agent", "snapshot", "thread"):
            value = payload.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"{name!r} must be a string")
            strings[name] = value
        require = payload.get("require") or []
        if not isinstance(require, list) or not all(isinstance(r, str) for r in require):
            raise InvalidInput("'require' must be a list of capability names")
        if strings["environment"] is not None and require:
            raise InvalidInput("give an environment or the capabilities to select one, not both")
        return cls(
            environment=strings["environment"] or None,
            require=list(require),
            argv=list(argv),
            agent=strings["agent"] or "agent",
            snapshot=strings["snapshot"],
            thread=strings["thread"],
            timeout=float(timeout) if timeout is not None else None,
            env=dict(env),
            routing=routing,
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "argv": self.argv,
            "agent": self.agent,
            "snapshot": self.snapshot,
            "thread": self.thread,
            "timeout": self.timeout,
            "env": self.env,
            "routing": self.routing,
            "require": self.require,
        }


def collect_from_environment(
    manager: EnvironmentManager, run: AgentRun, events: RunEventLog
) -> str | None:
    """The run's result read by the provider straight from its environment (when the runtime
    cannot ship it); the snapshot id, or None when the environment cannot be read."""
    try:
        _record, provider, resource = manager.require_active(run.environment)
        message = f"result of run {run.id} (collected by the provider)"
        snap_id = provider.collect(resource, run.thread_id, run.id, message).id
    except NarrativeError as exc:
        events.append("result.unavailable", reason=str(exc))
        return None
    events.append("result.collected", snapshot=snap_id, by="provider")
    return snap_id


def lease_environment(
    manager: EnvironmentManager, request: RunRequest, private: Container[str] = ()
) -> tuple[Lease, str, str | None]:
    """The run's environment, leased and able to run commands: the one named, or one the hub
    selects (then also how: reused, started or created), never one whose id is in ``private``."""
    if request.environment is None:
        chosen = select_environment(manager, request.require, private)
        return chosen.lease, chosen.record.name, chosen.how
    record = manager.get(request.environment)
    lease = Lease.acquire(manager.store, record.id)
    if lease is None:
        raise EnvironmentBusy(record.name, Lease.holder(manager.store, record.id))
    try:
        manager.require_active(record.id)
    except BaseException:
        lease.release()
        raise
    return lease, record.name, None
