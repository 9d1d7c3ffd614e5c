"""The environment manager: records + providers + lifecycle, in one place.

Every state change goes through :meth:`EnvironmentManager._move`, which checks the lifecycle
table and persists the record (with a short history) before and after the provider acts, so a
crash mid-operation leaves a record that says what was under way (``starting``, ``stopping``...)
and the next health check or :meth:`reconnect_all` settles it. Each environment has an
append-only log (``<store>/narrative/envs/<env-id>/log``) of lifecycle events and command output;
the output of background processes (:meth:`EnvironmentManager.spawn`, the hub's runtimes) goes to
``runtime.log`` beside it: directly where the provider can write host files (directory
providers), else copied from the environment by :meth:`EnvironmentManager.sync_runtime_log`
(docker, e2b), which remembers in ``runtime-sync.json`` how much of each process's log it copied.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import ValidationError

from narrative.errors import InvalidInput, NarrativeError, validation_problem
from narrative.fsutil import write_atomic
from narrative.jsonio import parse_json
from narrative.models import Snapshot, now_iso
from narrative.store import Store

from .base import BaseProvider, ExecResult, Health, OutputFn, ProviderContext, Signal
from .errors import IllegalTransition, ProviderError, ProviderUnavailable, ResourceGone
from .lifecycle import EnvState, can_transition, is_active
from .records import EnvironmentRecord, EnvironmentStore, env_state_dir, hub_socket_dir
from .registry import get_provider_class, pick_provider
from .usage import UsageMeter

__all__ = ["DEFAULT_HEALTH_INTERVAL", "EnvironmentManager", "HealthReport"]

log = logging.getLogger(__name__)

DEFAULT_HEALTH_INTERVAL = 30.0
_HISTORY = 50
_NAME_MAX = 64
_SYNC_KEEP = 100
"""Processes remembered in ``runtime-sync.json`` (the oldest finished ones are forgotten)."""
_HEADER = "--- narrative: "
"""Starts the lines the manager writes into ``runtime.log`` between processes' output."""


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

    # -- providers ------------------------------------------------------------------------------

    def provider(self, record: EnvironmentRecord) -> BaseProvider:
        """The provider instance driving ``record`` (cached per environment)."""
        cached = self._providers.get(record.id)
        if cached is not None:
            return cached
        cls = get_provider_class(record.provider)
        config = cls.config_model.model_validate(record.config)
        context = ProviderContext(self.store, self.owner, record.id, record.name)
        instance = cls(context, config)
        self._providers[record.id] = instance
        return instance

    def _log_path(self, record: EnvironmentRecord) -> str:
        return os.path.join(env_state_dir(self.store, record.id), "log")

    def runtime_log_path(self, name: str) -> str:
        """Where the output of the environment's background processes goes on the host
        (written there by directory providers; copied there by :meth:`sync_runtime_log` from
        docker and e2b, which keep it inside the environment, see their ``spawn``)."""
        return os.path.join(env_state_dir(self.store, self.records.get(name).id), "runtime.log")

    def _log(self, record: EnvironmentRecord, line: str) -> None:
        path = self._log_path(record)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            f.write(f"{now_iso()} {line}\n".encode(errors="surrogateescape"))

    def logs(self, name: str, tail: int | None = None) -> list[str]:
        """The environment's log lines (the last ``tail`` of them)."""
        return _tail_lines(self._log_path(self.records.get(name)), tail)

    def runtime_logs(self, name: str, tail: int | None = None) -> list[str]:
        """The lines of the host's ``runtime.log`` (the last ``tail`` of them), after copying
        what the environment holds that is not there yet, when it can be read."""
        try:
            self.sync_runtime_log(name)
        except NarrativeError as exc:  # what the host has is still worth showing
            log.info("cannot copy the runtime log of %s: %s", name, exc)
        return _tail_lines(self.runtime_log_path(name), tail)

    def runtime_log_tail(self, name: str, handle: str, lines: int = 20) -> list[str]:
        """The last ``lines`` lines one spawned process wrote (read from the environment, or
        from the host file that directory providers share between processes, from the
        manager's line before that process on); [] when there is nothing to read."""
        record = self.records.get(name)
        if record.resource_id is None:
            return []
        provider = self.provider(record)
        try:
            piece = provider.read_spawn_log(
                record.resource_id, handle, log_path=self.runtime_log_path(record.id)
            )
        except NarrativeError as exc:
            log.info("cannot read the log of %s in %s: %s", handle, record.name, exc)
            return []
        found = piece.data.decode(errors="replace").splitlines()
        if provider.spawn_log_on_host:
            starts = [i for i, line in enumerate(found) if line.startswith(_HEADER)]
            found = found[starts[-1] + 1 :] if starts else found
        return found[-lines:]

    def sync_runtime_log(self, name: str, handle: str | None = None) -> None:
        """Append to the host's ``runtime.log`` what the environment holds of the output of
        ``handle`` (default: of every spawned process whose output may still grow) that was
        not copied yet. Nothing to do for providers that write that file themselves.

        Best effort: an environment that cannot be read adds nothing now (a later call
        copies it). A process found finished is copied one last time and then left alone.
        Concurrent calls (a hub and ``env logs``) are serialised by a lock on the log.
        """
        record = self.records.get(name)
        resource = record.resource_id
        provider = self.provider(record)
        if resource is None or provider.spawn_log_on_host:
            return
        with self._syncing(record) as (out, state):
            if handle is not None:
                state.setdefault(handle, {"copied": 0, "done": False})
            for known, entry in state.items():
                if entry["done"] or (handle is not None and known != handle):
                    continue
                try:
                    finished = not provider.alive(resource, known)  # asked before the read
                except (ResourceGone, InvalidInput):  # gone, or never a handle of this resource
                    entry["done"] = True
                    continue
                except NarrativeError:
                    finished = False
                piece = provider.read_spawn_log(resource, known, since=entry["copied"])
                if piece.data:
                    if entry["copied"] == 0:
                        out.write(f"{_HEADER}{now_iso()} output of {known} ---\n".encode())
                    if piece.start > entry["copied"]:
                        skipped = piece.start - entry["copied"]
                        out.write(f"{_HEADER}{skipped} bytes left out ---\n".encode())
                    out.write(piece.data)
                    if finished and not piece.data.endswith(b"\n"):
                        out.write(b"\n")  # the next process's output starts on a line of its own
                    entry["copied"] = piece.size
                entry["done"] = finished

    @contextlib.contextmanager
    def _syncing(
        self, record: EnvironmentRecord
    ) -> Iterator[tuple[BinaryIO, dict[str, dict[str, Any]]]]:
        """The host's ``runtime.log`` open for appending, locked, and how much of each spawned
        process's log was copied into it (saved on exit). A damaged state file counts as
        empty: at worst some output is copied twice."""
        path = self.runtime_log_path(record.id)
        state_path = os.path.join(os.path.dirname(path), "runtime-sync.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as out:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX)
            try:
                with open(state_path, "rb") as f:
                    raw = parse_json(f.read())
            except (FileNotFoundError, ValueError):
                raw = {}
            state = {
                str(key): {"copied": entry["copied"], "done": entry["done"]}
                for key, entry in (raw.items() if isinstance(raw, dict) else ())
                if isinstance(entry, dict)
                and isinstance(entry.get("copied"), int)
                and isinstance(entry.get("done"), bool)
            }
            try:
                yield out, state
            finally:  # also after a failure part way: what was written is recorded as copied
                done = [key for key, entry in state.items() if entry["done"]]
                for key in done[: max(len(state) - _SYNC_KEEP, 0)]:
                    del state[key]
                write_atomic(state_path, json.dumps(state).encode(), durable=False)

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
            self._log(updated, f"state {record.state.value} -> {target.value} {reason}".rstrip())
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
        capabilities = cls.capabilities_for(model)
        lacking = [cap for cap in wanted if cap not in capabilities]
        if lacking:
            from .errors import NoProviderAvailable

            raise NoProviderAvailable(wanted, {provider: lacking})
        stored = model.model_dump(mode="json", exclude={"type"}, exclude_defaults=True)
        record = self.records.add(
            EnvironmentRecord(
                name=name,
                provider=provider,
                config=stored,
                capabilities=sorted(capabilities),
                resources=limits,
                unenforced=unenforced,
            )
        )
        self._log(record, f"created with provider {provider}")
        try:
            resource = self.provider(record).create()
        except BaseException as exc:
            self._fail(record, exc)
            raise
        record, _ = self.records.change(record.id, lambda r: setattr(r, "resource_id", resource))
        self._log(record, f"resource {resource}")
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
        self._log(record, f"exec {' '.join(argv)}")
        with open(self._log_path(record), "ab") as logf:

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
        self._log(record, f"exit {result.exit_code}{suffix}")
        return result

    def prepare_run(self, name: str, snapshot: Snapshot | None) -> None:
        """Make environment ``name`` ready for a new run, so that nothing of an earlier run
        there reaches it: every process earlier runs left is killed, then the workspace is
        emptied and ``snapshot`` restored into it (None: left empty, for a runtime that
        restores the run's input itself) and the private temporary directories emptied.
        The caller holds the environment's lease."""
        record, provider, resource = self.require_active(name)
        self._log(record, f"reset for a run from {snapshot.id if snapshot else 'nothing'}")
        try:
            # the output of earlier runtimes is copied out before their temp files go
            self.sync_runtime_log(record.id)
        except NarrativeError as exc:
            log.info("cannot copy the runtime log of %s: %s", name, exc)
        try:
            provider.end_leftovers(resource)
            provider.reset(resource, snapshot)
        except (ResourceGone, ProviderUnavailable) as exc:
            self._fail(record, exc)
            raise

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        """Start a background process in the environment (which must be active); return its
        handle for :meth:`signal` and :meth:`alive`. Its output goes to :meth:`runtime_log_path`.
        """
        record, provider, resource = self.require_active(name)
        self._log(record, f"spawn {' '.join(argv)}")
        log_path = self.runtime_log_path(record.id)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        if provider.spawn_log_on_host:
            # The file holds every process's output: this line marks where this one's starts.
            with open(log_path, "ab") as f:
                f.write(f"{_HEADER}{now_iso()} spawn {' '.join(argv)} ---\n".encode())
        try:
            handle = provider.spawn(resource, argv, env=env, log_path=log_path)
        except (ResourceGone, ProviderUnavailable) as exc:
            self._fail(record, exc)
            raise
        self._log(record, f"spawned {handle}")
        if not provider.spawn_log_on_host:
            # Remembered, so that a sync without a handle (``env logs --runtime``) copies it.
            with self._syncing(record) as (_out, state):
                state[handle] = {"copied": 0, "done": False}
        return handle

    def signal(self, name: str, handle: str, sig: Signal) -> None:
        """Send SIGTERM/SIGKILL to a spawned process and its descendants (no error when it has
        exited). Allowed in any state in which the environment has a resource."""
        record = self.records.get(name)
        resource = self._resource(record)
        self._log(record, f"signal {sig} {handle}")
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
        """On start-up: reattach to every environment whose resource still exists."""
        return [
            self._reconnect_one(record, record.resource_id)
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
        known = {r.resource_id for r in self.records.live() if r.resource_id}
        names = (
            set(providers)
            if providers is not None
            else {r.provider for r in self.environments(True)}
        )
        swept = []
        for name in sorted(names):
            cls = get_provider_class(name)
            config = cls.config_model.model_construct()
            context = ProviderContext(self.store, self.owner, "env-sweep", "sweep")
            instance = cls(context, config)
            for resource in instance.list_resources():
                if resource not in known:
                    log.info("sweeping leaked %s resource %s", name, resource)
                    instance.delete(resource)
                    swept.append(resource)
        return swept

    def watch(self, stop: threading.Event) -> None:
        """Run health checks every ``health_interval`` seconds until ``stop`` is set."""
        while not stop.wait(self.health_interval):
            started = time.monotonic()
            try:
                self.check_health()
            except NarrativeError:
                log.warning("health check failed", exc_info=True)
            log.debug("health check took %.3fs", time.monotonic() - started)


def _tail_lines(path: str, tail: int | None) -> list[str]:
    """The lines of a log file (the last ``tail`` of them); [] when there is none yet."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return lines[-tail:] if tail else lines
