"""The environment manager: records + providers + lifecycle, in one place.

Every state change goes through :meth:`EnvironmentManager._move`, which checks the lifecycle
table and persists the record (with a short history) before and after the provider acts, so a
crash mid-operation leaves a record that says what was under way (``starting``, ``stopping``...)
and the next health check or :meth:`reconnect_all` settles it. The environments' logs are
:class:`providers.envlogs.EnvironmentLogs` (:attr:`EnvironmentManager.logs`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from narrative.errors import InvalidInput, NarrativeError, validation_problem
from narrative.models import Snapshot, now_iso
from narrative.store import Store

from .base import (
    BaseProvider,
    ExecResult,
    Health,
    OutputFn,
    ProviderContext,
    Signal,
)
from .envlogs import EnvironmentLogs
from .errors import (
    EnvironmentExists,
    IllegalTransition,
    ProviderError,
    ProviderUnavailable,
    ResourceGone,
)
from .lifecycle import EnvState, can_transition, is_active
from .records import EnvironmentRecord, EnvironmentStore, creating, hub_socket_dir
from .registry import get_provider_class, pick_provider
from .sweeping import sweep_leaked
from .usage import UsageMeter

__all__ = ["DEFAULT_HEALTH_INTERVAL", "DEFAULT_WORKERS", "EnvironmentManager", "HealthReport"]

log = logging.getLogger(__name__)

DEFAULT_HEALTH_INTERVAL = 30.0
DEFAULT_WORKERS = 16
"""Environments created or deleted at a time by one command (each mostly waits on its backend)."""
_HISTORY = 50
_NAME_MAX = 64


@dataclass(frozen=True)
class HealthReport:
    """One environment's health check: what was found and where it left the environment."""

    name: str
    health: str
    state: str
    detail: str = ""
    """Why the check failed, when the provider said (e.g. the runtime's import check)."""


def _check_env_name(name: str) -> str:
    ok = name and len(name) <= _NAME_MAX and name[0].isalnum()
    if not ok or not all(c.isalnum() or c in "._-" for c in name):
        raise InvalidInput(f"invalid environment name {name!r}: letters, digits, '.', '_', '-'")
    return name


class EnvironmentManager:
    """Create, drive and watch the environments of one store."""

    def __init__(
        self,
        store: Store,
        health_interval: float = DEFAULT_HEALTH_INTERVAL,
        failure_threshold: int = 3,
    ) -> None:
        self.store = store
        self.records = EnvironmentStore(store)
        self.health_interval = health_interval
        self.failure_threshold = failure_threshold
        digest = hashlib.sha256(os.path.realpath(store.git_dir).encode()).hexdigest()
        self.owner = f"narrative-{digest[:16]}"
        """Label value on every resource this store creates (leaked ones are swept by it)."""
        self._providers: dict[str, BaseProvider] = {}
        self._providers_lock = threading.Lock()  # a hub drives environments from many threads
        self.logs = EnvironmentLogs(store, self.records, self.provider)
        """The environments' host-side logs (lifecycle events, command and process output)."""

    # -- providers ------------------------------------------------------------------------------

    def provider(self, record: EnvironmentRecord) -> BaseProvider:
        """The provider instance driving ``record`` (cached per environment)."""
        with self._providers_lock:
            cached = self._providers.get(record.id)
            if cached is not None:
                return cached
            cls = get_provider_class(record.provider)
            config = cls.config_model.model_validate(record.config)
            context = ProviderContext(self.store, self.owner, record.id, record.name)
            instance = cls(context, config)
            self._providers[record.id] = instance
            return instance

    # -- records and transitions ----------------------------------------------------------------

    def get(self, name: str) -> EnvironmentRecord:
        return self.records.get(name)

    def environments(self, include_archived: bool = False) -> list[EnvironmentRecord]:
        return self.records.load() if include_archived else self.records.live()

    def _move(
        self, record: EnvironmentRecord, target: EnvState, reason: str = "", **fields: Any
    ) -> EnvironmentRecord:
        """Persist ``record`` → ``target`` if the lifecycle table allows it."""

        def change(cur: EnvironmentRecord) -> None:
            if cur.state is not target and not can_transition(cur.state, target):
                raise IllegalTransition(cur.name, cur.state.value, target.value)
            for key, value in fields.items():
                setattr(cur, key, value)
            if cur.state is not target:
                cur.history.append(
                    {"at": now_iso(), "from": cur.state.value, "to": target.value, "reason": reason}
                )
                del cur.history[:-_HISTORY]
            cur.state = target

        updated, _ = self.records.change(record.id, change)
        if record.state is not target:
            self.logs.append(
                updated, f"state {record.state.value} -> {target.value} {reason}".rstrip()
            )
        return updated

    def _fail(self, record: EnvironmentRecord, exc: BaseException) -> None:
        """Record an error on the environment (best effort: the original error is what counts)."""
        try:
            current = self.records.get(record.id)
            target = EnvState.NOT_AVAILABLE if isinstance(exc, ResourceGone) else EnvState.ERROR
            if can_transition(current.state, target):
                self._move(
                    current,
                    target,
                    str(exc),
                    last_error=str(exc),
                    error_count=current.error_count + 1,
                )
        except NarrativeError:
            log.warning("could not record the failure of %s", record.name, exc_info=True)

    def mark_error(self, name: str, reason: str) -> EnvironmentRecord:
        """Record that the environment failed underneath a run (its runtime or resource died)."""
        record = self.records.get(name)
        self._fail(record, ProviderError(reason))
        return self.records.get(record.id)

    def connection_changed(self, name: str, connected: bool) -> EnvironmentRecord:
        """Follow the runtime's connection: running while it is up, disconnected while it is
        down (a later health check may move it on to unconnectable)."""
        record = self.records.get(name)
        if connected and record.state in (EnvState.DISCONNECTED, EnvState.UNCONNECTABLE):
            return self._move(record, EnvState.RUNNING, "runtime connected", consecutive_failures=0)
        if not connected and record.state is EnvState.RUNNING:
            return self._move(record, EnvState.DISCONNECTED, "runtime connection lost")
        return record

    # -- lifecycle ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        provider: str | None = None,
        config: Mapping[str, Any] | None = None,
        require: Iterable[str] = (),
        start: bool = True,
    ) -> EnvironmentRecord:
        """Create an environment (and start it unless ``start`` is False).

        The project file (:mod:`providers.project`) fills in what is not given: the profile
        of ``name``, the default provider, each provider's base config and the resource
        limits. ``provider`` defaults to the first one that declares every capability in
        ``require``.
        """
        return self._make(self._plan(name, provider, config, require), start)

    def create_many(
        self,
        names: Sequence[str],
        provider: str | None = None,
        config: Mapping[str, Any] | None = None,
        require: Iterable[str] = (),
        start: bool = True,
        *,
        workers: int = DEFAULT_WORKERS,
        on_done: Callable[[str, EnvironmentRecord | NarrativeError], None] | None = None,
    ) -> list[EnvironmentRecord | NarrativeError]:
        """Create several environments alike (each as :meth:`create` would), side by side.

        Every name and the settings are checked first: bad input fails before anything is
        created. Then each is created and started on its own thread (up to ``workers`` at a
        time); one that fails does not stop the others. Returns, in the order of ``names``,
        each record or the error that stopped it; ``on_done`` hears of each as it ends.
        """
        if len(set(names)) != len(names):
            raise InvalidInput("an environment name is given twice")
        live = {r.name for r in self.records.live()}
        taken = [name for name in names if name in live]
        if taken:
            raise EnvironmentExists(taken[0])
        wanted = list(require)
        plans = [self._plan(name, provider, config, wanted) for name in names]
        return self.for_each(names, lambda i: self._make(plans[i], start), workers, on_done)

    def for_each(
        self,
        names: Sequence[str],
        act: Callable[[int], EnvironmentRecord],
        workers: int = DEFAULT_WORKERS,
        on_done: Callable[[str, EnvironmentRecord | NarrativeError], None] | None = None,
    ) -> list[EnvironmentRecord | NarrativeError]:
        """``act(i)`` for the i-th of ``names``, side by side on up to ``workers`` threads
        (environments are independent: their records change under the store's lock); each
        record, or the :class:`NarrativeError` that stopped it, in the order of ``names``."""
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> EnvironmentRecord | NarrativeError:
            try:
                outcome: EnvironmentRecord | NarrativeError = act(i)
            except NarrativeError as exc:
                outcome = exc
            if on_done is not None:
                on_done(names[i], outcome)
            return outcome

        if len(names) == 1:
            return [one(0)]
        with ThreadPoolExecutor(max(1, min(workers, len(names))), "env") as pool:
            return list(pool.map(one, range(len(names))))

    def _plan(
        self,
        name: str,
        provider: str | None,
        config: Mapping[str, Any] | None,
        require: Iterable[str],
    ) -> EnvironmentRecord:
        """The record ``create`` would add, checked (nothing is written)."""
        from .project import load_project

        _check_env_name(name)
        project = load_project(self.store.workspace)
        provider, merged, wanted, resources = project.environment(
            name, provider, dict(config or {}), require
        )
        provider = provider or pick_provider(wanted)
        cls = get_provider_class(provider)
        limits = resources.given()
        enforced, unenforced = cls.resource_config(limits)
        try:
            model = cls.config_model.model_validate({**enforced, **merged})
        except ValidationError as exc:
            problem = validation_problem(exc, "config")
            raise InvalidInput(f"invalid {provider} config: {problem}") from None
        cls.check_config(model)
        capabilities = cls.capabilities_in(model, self.store)
        lacking = [cap for cap in wanted if cap not in capabilities]
        if lacking:
            from .errors import NoProviderAvailable

            raise NoProviderAvailable(wanted, {provider: lacking})
        stored = model.model_dump(mode="json", exclude={"type"}, exclude_defaults=True)
        return EnvironmentRecord(
            name=name,
            provider=provider,
            config=stored,
            capabilities=sorted(capabilities),
            resources=limits,
            unenforced=unenforced,
        )

    def _make(self, planned: EnvironmentRecord, start: bool) -> EnvironmentRecord:
        """Add the record ``_plan`` made, create its resource and start it."""
        record = self.records.add(planned)
        self.logs.append(record, f"created with provider {record.provider}")
        with creating(self.store, record.id):  # until recorded, a sweep leaves it alone
            try:
                resource = self.provider(record).create()
            except BaseException as exc:
                self._fail(record, exc)
                raise
            record, _ = self.records.change(
                record.id, lambda r: setattr(r, "resource_id", resource)
            )
        self.logs.append(record, f"resource {resource}")
        return self.start(record.id) if start else record

    def _resource(self, record: EnvironmentRecord) -> str:
        if record.resource_id is None:
            raise ProviderError(f"environment {record.name!r} has no resource (creation failed)")
        return record.resource_id

    def _drive(
        self,
        name: str,
        via: EnvState,
        done: EnvState,
        act: Callable[[BaseProvider, str], None],
        already: bool = True,
    ) -> EnvironmentRecord:
        """Move through ``via`` to ``done`` around the provider's ``act``; a failure is
        recorded on the environment (error / not_available) and re-raised."""
        record = self.records.get(name)
        if already and record.state is done:
            return record
        resource = self._resource(record)
        record = self._move(record, via)
        try:
            act(self.provider(record), resource)
        except BaseException as exc:
            self._fail(record, exc)
            raise
        extra: dict[str, Any] = {"consecutive_failures": 0} if done is EnvState.RUNNING else {}
        return self._move(record, done, "", **extra)

    def start(self, name: str) -> EnvironmentRecord:
        return self._drive(name, EnvState.STARTING, EnvState.RUNNING, lambda p, r: p.start(r))

    def stop(self, name: str) -> EnvironmentRecord:
        return self._drive(name, EnvState.STOPPING, EnvState.STOPPED, lambda p, r: p.stop(r))

    def restart(self, name: str) -> EnvironmentRecord:
        def act(provider: BaseProvider, resource: str) -> None:
            provider.stop(resource)
            provider.start(resource)

        return self._drive(name, EnvState.RESTARTING, EnvState.RUNNING, act, already=False)

    def delete(self, name: str) -> EnvironmentRecord:
        """Destroy the resource and archive the record; works from any state."""
        record = self.records.get(name)
        if record.state is EnvState.ARCHIVED:
            return record
        if record.resource_id is not None:
            try:
                self.provider(record).delete(record.resource_id)
            except ResourceGone:
                pass
            except BaseException as exc:
                self._fail(record, exc)
                raise
        with self._providers_lock:
            self._providers.pop(record.id, None)
        shutil.rmtree(hub_socket_dir(record.id, create=False), ignore_errors=True)
        return self._move(record, EnvState.ARCHIVED, "deleted")

    # -- operations -----------------------------------------------------------------------------

    def require_active(self, name: str) -> tuple[EnvironmentRecord, BaseProvider, str]:
        """The record, provider and resource of an environment that can run commands."""
        record = self.records.get(name)
        if not is_active(record.state):
            raise ProviderError(
                f"environment {record.name!r} is {record.state.value}; start it first"
            )
        return record, self.provider(record), self._resource(record)

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        """Run a command in the environment; output is streamed and appended to its log."""
        record, provider, resource = self.require_active(name)
        self.logs.append(record, f"exec {' '.join(argv)}")
        with open(self.logs.path(record), "ab") as logf:

            def tee(stream: str, chunk: bytes) -> None:
                logf.write(chunk)
                logf.flush()
                if on_output is not None:
                    on_output(stream, chunk)

            try:
                result = provider.exec(resource, argv, env=env, timeout=timeout, on_output=tee)
            except (ResourceGone, ProviderUnavailable) as exc:
                self._fail(record, exc)
                raise
        suffix = " (timed out)" if result.timed_out else ""
        self.logs.append(record, f"exit {result.exit_code}{suffix}")
        return result

    def prepare_run(self, name: str, snapshot: Snapshot | None) -> None:
        """Make environment ``name`` ready for a new run, so that nothing of an earlier run
        there reaches it: every process earlier runs left is killed, then the workspace is
        emptied and ``snapshot`` restored into it (None: left empty, for a runtime that
        restores the run's input itself) and the private temporary directories emptied.
        The caller holds the environment's lease."""
        record, provider, resource = self._before_run(name, snapshot)
        try:
            provider.prepare_for_run(resource, snapshot)
        except (ResourceGone, ProviderUnavailable) as exc:
            self._fail(record, exc)
            raise

    def start_runtime(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
        """:meth:`prepare_run` with no snapshot, then :meth:`spawn` of the hub's runtime
        ``argv``, in one call to the provider
        (:meth:`~providers.base.BaseProvider.start_runtime`)."""
        record, provider, resource = self._before_run(name, None)
        return self._spawn(record, provider, resource, argv, env, provider.start_runtime)

    def _before_run(
        self, name: str, snapshot: Snapshot | None
    ) -> tuple[EnvironmentRecord, BaseProvider, str]:
        record, provider, resource = self.require_active(name)
        self.logs.append(record, f"reset for a run from {snapshot.id if snapshot else 'nothing'}")
        try:
            # the output of earlier runtimes is copied out before their temp files go
            self.logs.sync_runtime(record.id)
        except NarrativeError as exc:
            log.info("cannot copy the runtime log of %s: %s", name, exc)
        return record, provider, resource

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        runtime: bool = False,
    ) -> str:
        """Start a background process in the environment (which must be active); return its
        handle for :meth:`signal` and :meth:`alive`. Its output goes to the host's
        ``runtime.log`` (:meth:`EnvironmentLogs.runtime_path`). ``runtime``: the process is
        the hub's runtime of a run (:meth:`~providers.base.BaseProvider.spawn_runtime`)."""
        record, provider, resource = self.require_active(name)
        start = provider.spawn_runtime if runtime else provider.spawn
        return self._spawn(record, provider, resource, argv, env, start)

    def _spawn(
        self,
        record: EnvironmentRecord,
        provider: BaseProvider,
        resource: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        start: Callable[..., str],
    ) -> str:
        self.logs.append(record, f"spawn {' '.join(argv)}")
        log_path = self.logs.start_spawn(record, argv, provider.spawn_log_on_host)
        try:
            handle = start(resource, argv, env=env, log_path=log_path)
        except (ResourceGone, ProviderUnavailable) as exc:
            self._fail(record, exc)
            raise
        self.logs.append(record, f"spawned {handle}")
        if not provider.spawn_log_on_host:
            self.logs.track_spawn(record, handle)
        return handle

    def signal(self, name: str, handle: str, sig: Signal) -> None:
        """Send SIGTERM/SIGKILL to a spawned process and its descendants (no error when it has
        exited). Allowed in any state in which the environment has a resource."""
        record = self.records.get(name)
        resource = self._resource(record)
        self.logs.append(record, f"signal {sig} {handle}")
        try:
            self.provider(record).signal(resource, handle, sig)
        except (ResourceGone, ProviderUnavailable) as exc:
            self._fail(record, exc)
            raise

    def usage_meter(self, name: str) -> UsageMeter:
        """A meter of what runs in the environment from now on (see
        :class:`providers.usage.UsageMeter`)."""
        record, provider, resource = self.require_active(name)
        try:
            return provider.usage_meter(resource)
        except NarrativeError as exc:  # measuring never stops a run
            return UsageMeter(f"{record.provider}: CPU and memory not measured ({exc})")

    def alive(self, name: str, handle: str) -> bool:
        """Whether a spawned process is still running."""
        record = self.records.get(name)
        return self.provider(record).alive(self._resource(record), handle)

    def await_end(self, name: str, handle: str, seconds: float) -> bool | None:
        """Wait up to ``seconds`` for a spawned process to end, where its environment can
        (:meth:`~providers.base.BaseProvider.await_end`); None: look with :meth:`alive`."""
        record = self.records.get(name)
        return self.provider(record).await_end(self._resource(record), handle, seconds)

    # -- health, reconnect, sweep -----------------------------------------------------------------

    def check_health(self, names: Iterable[str] | None = None) -> list[HealthReport]:
        """Probe environments once and move them between running / disconnected /
        unconnectable / not_available as the result says."""
        wanted = set(names) if names is not None else None
        reports = []
        for record in self.records.live():
            if wanted is not None and not ({record.name, record.id} & wanted):
                continue
            if record.resource_id is None or record.state in (
                EnvState.CREATED,
                EnvState.STARTING,
                EnvState.STOPPING,
                EnvState.RESTARTING,
            ):
                continue
            reports.append(self._check_one(record, record.resource_id))
        return reports

    def _check_one(self, record: EnvironmentRecord, resource: str) -> HealthReport:
        detail = ""
        try:
            health = self.provider(record).health(resource)
        except ProviderError as exc:
            health, detail = Health.UNREACHABLE, str(exc)
        updated = self._apply_health(record, health)
        return HealthReport(updated.name, health.value, updated.state.value, detail)

    def _apply_health(self, record: EnvironmentRecord, health: Health) -> EnvironmentRecord:
        now = now_iso()
        state = record.state
        if health is Health.GONE:
            return self._move(record, EnvState.NOT_AVAILABLE, "resource gone", last_health_at=now)
        if health is Health.OK:
            if state in (EnvState.DISCONNECTED, EnvState.UNCONNECTABLE):
                return self._move(
                    record, EnvState.RUNNING, "reachable again",
                    consecutive_failures=0, last_health_at=now,
                )  # fmt: skip
            return self._move(record, state, consecutive_failures=0, last_health_at=now)
        failures = record.consecutive_failures + 1
        fields: dict[str, Any] = {"consecutive_failures": failures, "last_health_at": now}
        if state is EnvState.RUNNING:
            return self._move(record, EnvState.DISCONNECTED, "health check failed", **fields)
        if state is EnvState.DISCONNECTED and failures >= self.failure_threshold:
            reason = f"{failures} health checks failed"
            return self._move(record, EnvState.UNCONNECTABLE, reason, **fields)
        return self._move(record, state, **fields)

    def reconnect_all(self) -> list[HealthReport]:
        """On start-up: reattach to every environment whose resource still exists. A stopped
        one is only probed (health changes nothing): reattaching starts or resumes a resource
        on some providers (Daytona, e2b), and a stopped environment must stay stopped."""
        return [
            self._check_one(record, record.resource_id)
            if record.state is EnvState.STOPPED
            else self._reconnect_one(record, record.resource_id)
            for record in self.records.live()
            if record.resource_id is not None
        ]

    def _reconnect_one(self, record: EnvironmentRecord, resource: str) -> HealthReport:
        try:
            self.provider(record).reconnect(resource)
        except ResourceGone:
            if record.state is not EnvState.NOT_AVAILABLE:
                record = self._move(record, EnvState.NOT_AVAILABLE, "resource gone")
            return HealthReport(record.name, Health.GONE.value, record.state.value)
        except ProviderError as exc:
            log.info("cannot reconnect %s: %s", record.name, exc)
            record = self._apply_health(record, Health.UNREACHABLE)
            return HealthReport(record.name, Health.UNREACHABLE.value, record.state.value)
        if record.state in (EnvState.STARTING, EnvState.RESTARTING):
            record = self._move(record, EnvState.RUNNING, "reconnected")
        elif record.state is EnvState.STOPPING:
            record = self._move(record, EnvState.STOPPED, "reconnected")
        record = self._apply_health(record, Health.OK)
        return HealthReport(record.name, Health.OK.value, record.state.value)

    def sweep(self, providers: Iterable[str] | None = None) -> list[str]:
        """Delete resources labelled with this store's owner that no record knows."""
        return sweep_leaked(self.store, self.owner, self.records, providers)

    def watch(self, stop: threading.Event) -> None:
        """Run health checks every ``health_interval`` seconds until ``stop`` is set."""
        while not stop.wait(self.health_interval):
            started = time.monotonic()
            try:
                self.check_health()
            except NarrativeError:
                log.warning("health check failed", exc_info=True)
            log.debug("health check took %.3fs", time.monotonic() - started)
