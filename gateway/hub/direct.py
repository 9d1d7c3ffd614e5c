"""Isolated agent runs: restore a snapshot into an environment, run a command there, capture
the result as a snapshot on a new thread, and record the run from start to finish.

The user's workspace is only read (for the default base snapshot), never written. The run holds
the environment's lease, and the environment is reset before it starts
(:meth:`~providers.manager.EnvironmentManager.prepare_run`): nothing an earlier run left there,
process or file, reaches it. The run's
thread is forked from the base, so ``narrative diff RUN`` and ``narrative merge RUN`` compare the
result with exactly what the environment started from. Whatever happens — a non-zero exit, a
timeout, Ctrl-C, a provider failure — the run is finished with a status, and a result snapshot
is taken if the environment can still be read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from narrative.commits import snapshot_at
from narrative.credentials import secret_forms
from narrative.errors import NarrativeError
from narrative.hierarchy import create_thread, finish_run, get_thread, resolve_thread, start_run
from narrative.history import resolve_snapshot
from narrative.ids import new_id
from narrative.models import AgentRun, Snapshot
from narrative.screening import withhold_secrets
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.base import ExecResult, OutputFn
from providers.hybrid import HybridProvider
from providers.keys import key_path
from providers.manager import EnvironmentManager
from providers.records import EnvironmentRecord
from providers.usage import ProcessUsage, Sampler, UsageMeter

from .leases import EnvironmentBusy, EnvironmentLease
from .usage_records import save_usage, usage_record

__all__ = ["IsolatedRun", "PhaseClock", "pick_base", "run_isolated", "screen_result"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IsolatedRun:
    """What an isolated run did."""

    run: AgentRun
    base: Snapshot
    result: Snapshot | None
    exit_code: int | None
    timed_out: bool = False


def pick_base(
    manager: EnvironmentManager, snapshot: str | None = None, thread: str | None = None
) -> Snapshot:
    """The base of a run: a named snapshot, the head of a thread, or (default) a fresh
    snapshot of the workspace."""
    store = manager.store
    if snapshot is not None:
        return resolve_snapshot(store, snapshot)
    if thread is not None:
        found = resolve_thread(store, thread)
        head = store.refs.read(store.thread_ref(found.id))
        if head is None:
            if found.forked_from:
                return resolve_snapshot(store, found.forked_from)
            raise NarrativeError(f"thread {found.name!r} has no snapshot to start from")
        return snapshot_at(store, head)
    return take_snapshot(store, message="base of an isolated run").snapshot


def run_isolated(
    manager: EnvironmentManager,
    env_name: str,
    argv: Sequence[str],
    base: Snapshot,
    agent: str = "agent",
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_output: OutputFn | None = None,
    clock: PhaseClock | None = None,
) -> IsolatedRun:
    """Run ``argv`` in environment ``env_name`` starting from ``base``. ``clock``: the run's
    phases so far (the caller's, e.g. taking the base snapshot), to which the run's own are
    added; its start is the start of the run's wall time."""
    clock = clock or PhaseClock()
    store = manager.store
    record, provider, _resource = manager.require_active(env_name)
    lease = EnvironmentLease.acquire(store, record.id)
    if lease is None:
        raise EnvironmentBusy(record.name, EnvironmentLease.holder(store, record.id))
    try:
        if isinstance(provider, HybridProvider):  # its two environments are leased too
            # imported only here: the tools node's gateway modules cost a direct run ~0.1 s
            from .tools_node import lease_components

            lease_components(manager, record.name, lease)
        clock.lap("lease")
        return _run_leased(
            manager, lease, record, argv, base, agent, env, timeout, on_output, clock
        )
    finally:
        lease.release()


def _run_leased(
    manager: EnvironmentManager,
    lease: EnvironmentLease,
    record: EnvironmentRecord,
    argv: Sequence[str],
    base: Snapshot,
    agent: str,
    env: Mapping[str, str] | None,
    timeout: float | None,
    on_output: OutputFn | None,
    clock: PhaseClock,
) -> IsolatedRun:
    store = manager.store
    env_name = record.name
    objective = get_thread(store, base.thread).objective_id
    thread = create_thread(
        store, objective, f"run/{record.name}/{new_id('run')[4:14]}", forked_from=base.id
    )
    run = start_run(store, thread.id, agent=agent, environment=record.name, base_snapshot=base.id)
    lease.note(run.id)
    status, exit_code, timed_out = "failed", None, False
    result: Snapshot | None = None
    restored = False
    usage: _UsageEnd | None = None
    clock.lap("start")  # the run and its thread recorded
    process = ProcessUsage(None, None, "CPU and memory not measured (the command never ran)")
    try:
        manager.prepare_run(env_name, base)
        restored = True
        clock.lap("restore")
        meter = manager.usage_meter(env_name)
        sampler = Sampler(meter).start()
        outcome: ExecResult | None = None
        try:
            outcome = manager.exec(record.name, argv, env=env, timeout=timeout, on_output=on_output)
        finally:
            clock.lap("agent")
            usage = _UsageEnd(sampler, meter, outcome.usage if outcome is not None else None)
        exit_code, timed_out = outcome.exit_code, outcome.timed_out
        status = "succeeded" if exit_code == 0 and not timed_out else "failed"
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    finally:
        # no result from an environment that never received the base: it holds another state
        result = _collect(manager, env_name, thread.id, run.id, status) if restored else None
        if usage is not None:
            process = usage.result()
        if restored:
            clock.lap("collect")
        screened = screen_result(store, run.id, result.id if result is not None else None)
        if result is not None and screened != result.id:
            result = resolve_snapshot(store, screened) if screened is not None else None
        if restored:
            clock.lap("screen")
        run = finish_run(store, run.id, status, exit_code=exit_code, result_snapshot=screened)
        clock.lap("record")
        _save_direct_usage(store, run.id, clock, process)
    return IsolatedRun(run, base, result, exit_code, timed_out)


class PhaseClock:
    """Seconds each phase of a direct run took, by this process's monotonic clock: a phase
    ends where the next begins, so they add up to the run's wall time."""

    def __init__(self) -> None:
        self.started = self._mark = time.monotonic()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """End phase ``name`` now (a name given again adds to its earlier time)."""
        now = time.monotonic()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self._mark, 3)
        self._mark = now


class _UsageEnd:
    """Stops a run's sampler and reads its meter's last sample on a thread of its own, while
    the result is collected: a meter may wait for its source's next tick (the Docker daemon
    samples a container once a second: up to 1 s per run otherwise). The reading is still
    asked for as soon as the command has ended, so it covers the same run."""

    def __init__(self, sampler: Sampler, meter: UsageMeter, measured: ProcessUsage | None) -> None:
        self._usage: ProcessUsage | None = None
        self._error: BaseException | None = None

        def finish() -> None:
            try:
                sampler.stop(wait=False)  # a sample under way ends at the same tick
                self._usage = _process_usage(meter, measured)
                sampler.stop()
            except BaseException as exc:  # handed to the caller's thread by result()
                self._error = exc

        self._thread = threading.Thread(target=finish, name="usage-end", daemon=True)
        self._thread.start()

    def result(self) -> ProcessUsage:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._usage is not None
        return self._usage


def _process_usage(meter: UsageMeter, measured: ProcessUsage | None) -> ProcessUsage:
    """What the command used: as the provider measured it when the command ended (the
    ``wait4`` of a directory provider), else by the environment's meter."""
    try:
        metered = meter.finish(None)  # (also when unused: it closes the meter)
    except NarrativeError as exc:
        metered = ProcessUsage(None, None, f"{meter.measured_by}: failed ({exc})")
    return measured if measured is not None else metered


def _save_direct_usage(store: Store, run_id: str, clock: PhaseClock, process: ProcessUsage) -> None:
    record = usage_record(
        time.monotonic() - clock.started,
        process,
        None,  # the provider restores and collects the files itself: no bundle travels
        None,
        clock.phases,
        "wall time and phases: the CLI (a direct run)",
    )
    try:
        save_usage(store, run_id, record)
    except OSError as exc:
        log.warning("cannot record the usage of run %s: %s", run_id, exc)


def screen_result(
    store: Store, run_id: str, result_id: str | None, tokens: Sequence[str] = ()
) -> str | None:
    """The result to record for a run whose environment left ``result_id``: screened for
    secrets (:func:`narrative.runs.withhold_secrets`), every provider's result on every path,
    looking also for the run's ``tokens`` and the store's gateway key. None when it cannot be
    screened (then it is not recorded: an unscreened result is never offered for a merge)."""
    if result_id is None:
        return None
    known = [form for token in tokens for form in secret_forms(token.encode())]
    try:
        with open(key_path(store), "rb") as f:
            known += secret_forms(f.read(4096))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read the gateway key to screen run %s for it: %s", run_id, exc)
    try:
        return withhold_secrets(store, run_id, result_id, known)
    except NarrativeError as exc:
        log.warning("cannot screen the result of run %s for secrets: %s", run_id, exc)
        return None


def _collect(
    manager: EnvironmentManager, env_name: str, thread_id: str, run_id: str, status: str
) -> Snapshot | None:
    """The run's result snapshot, or None when the environment cannot be read any more."""
    try:
        _record, provider, resource = manager.require_active(env_name)
        return provider.collect(resource, thread_id, run_id, f"result of run {run_id} ({status})")
    except NarrativeError as exc:
        log.warning("no result snapshot for run %s: %s", run_id, exc)
        return None
