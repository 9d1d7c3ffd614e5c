"""The logs of each environment of a store, kept on the host beside its record.

``<store>/narrative/envs/<env-id>/log`` is append-only: lifecycle events and command output,
written by the :class:`~providers.manager.EnvironmentManager`. The output of background
processes (:meth:`~providers.manager.EnvironmentManager.spawn`, the hub's runtimes) goes to
``runtime.log`` beside it: directly where the provider can write host files (directory
providers), else copied from the environment by :meth:`EnvironmentLogs.sync_runtime` (docker,
e2b), which remembers in ``runtime-sync.json`` how much of each process's log it copied.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from narrative.errors import InvalidInput, NarrativeError
from narrative.fsutil import write_atomic
from narrative.jsonio import parse_json
from narrative.models import now_iso
from narrative.store import Store

from .base import BaseProvider
from .errors import ResourceGone
from .records import EnvironmentRecord, EnvironmentStore, env_state_dir

__all__ = ["EnvironmentLogs"]

log = logging.getLogger(__name__)

_SYNC_KEEP = 100
"""Processes remembered in ``runtime-sync.json`` (the oldest finished ones are forgotten)."""
_HEADER = "--- narrative: "
"""Starts the lines written into ``runtime.log`` between processes' output."""


class EnvironmentLogs:
    """Reading and writing the host-side logs of the environments of one store."""

    def __init__(
        self,
        store: Store,
        records: EnvironmentStore,
        provider: Callable[[EnvironmentRecord], BaseProvider],
    ) -> None:
        self._store = store
        self._records = records
        self._provider = provider
        """The (cached) provider instance driving an environment."""

    def path(self, record: EnvironmentRecord) -> str:
        """The environment's own log: lifecycle events and the output of
        :meth:`~providers.manager.EnvironmentManager.exec`."""
        return os.path.join(env_state_dir(self._store, record.id), "log")

    def runtime_path(self, name: str) -> str:
        """Where the output of the environment's background processes goes on the host
        (written there by directory providers; copied there by :meth:`sync_runtime` from
        docker and e2b, which keep it inside the environment, see their ``spawn``)."""
        return os.path.join(env_state_dir(self._store, self._records.get(name).id), "runtime.log")

    def append(self, record: EnvironmentRecord, line: str) -> None:
        """Add a timestamped line to the environment's own log."""
        path = self.path(record)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            f.write(f"{now_iso()} {line}\n".encode(errors="surrogateescape"))

    def lines(self, name: str, tail: int | None = None) -> list[str]:
        """The environment's log lines (the last ``tail`` of them)."""
        return _tail_lines(self.path(self._records.get(name)), tail)

    def runtime_lines(self, name: str, tail: int | None = None) -> list[str]:
        """The lines of the host's ``runtime.log`` (the last ``tail`` of them), after copying
        what the environment holds that is not there yet, when it can be read."""
        try:
            self.sync_runtime(name)
        except NarrativeError as exc:  # what the host has is still worth showing
            log.info("cannot copy the runtime log of %s: %s", name, exc)
        return _tail_lines(self.runtime_path(name), tail)

    def runtime_tail(self, name: str, handle: str, lines: int = 20) -> list[str]:
        """The last ``lines`` lines one spawned process wrote (read from the environment, or
        from the host file that directory providers share between processes, from the
        manager's line before that process on); [] when there is nothing to read."""
        record = self._records.get(name)
        if record.resource_id is None:
            return []
        provider = self._provider(record)
        try:
            piece = provider.read_spawn_log(
                record.resource_id, handle, log_path=self.runtime_path(record.id)
            )
        except NarrativeError as exc:
            log.info("cannot read the log of %s in %s: %s", handle, record.name, exc)
            return []
        found = piece.data.decode(errors="replace").splitlines()
        if provider.spawn_log_on_host:
            starts = [i for i, line in enumerate(found) if line.startswith(_HEADER)]
            found = found[starts[-1] + 1 :] if starts else found
        return found[-lines:]

    def start_spawn(self, record: EnvironmentRecord, argv: Sequence[str], on_host: bool) -> str:
        """The host path a new background process's output is to go to (its directory made).
        ``on_host``: the provider writes that file itself, and as it holds every process's
        output, a line marks where this one's starts."""
        log_path = self.runtime_path(record.id)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        if on_host:
            with open(log_path, "ab") as f:
                f.write(f"{_HEADER}{now_iso()} spawn {' '.join(argv)} ---\n".encode())
        return log_path

    def track_spawn(self, record: EnvironmentRecord, handle: str) -> None:
        """Remember a process whose log stays in the environment, so that a sync without a
        handle (``env logs --runtime``) copies it."""
        with self._syncing(record) as (_out, state):
            state[handle] = {"copied": 0, "done": False}

    def sync_runtime(self, name: str, handle: str | None = None, *, ended: bool = False) -> None:
        """Append to the host's ``runtime.log`` what the environment holds of the output of
        ``handle`` (default: of every spawned process whose output may still grow) that was
        not copied yet. Nothing to do for providers that write that file themselves.
        ``ended``: the caller knows ``handle`` ended (no need to ask the environment).

        Best effort: an environment that cannot be read adds nothing now (a later call
        copies it). A process found finished is copied one last time and then left alone.
        Concurrent calls (a hub and ``env logs``) are serialised by a lock on the log.
        """
        record = self._records.get(name)
        resource = record.resource_id
        provider = self._provider(record)
        if resource is None or provider.spawn_log_on_host:
            return
        with self._syncing(record) as (out, state):
            if handle is not None:
                state.setdefault(handle, {"copied": 0, "done": False})
            for known, entry in state.items():
                if entry["done"] or (handle is not None and known != handle):
                    continue
                try:  # asked before the read
                    finished = (ended and known == handle) or not provider.alive(resource, known)
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
        path = self.runtime_path(record.id)
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


def _tail_lines(path: str, tail: int | None) -> list[str]:
    """The lines of a log file (the last ``tail`` of them); [] when there is none yet."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return lines[-tail:] if tail else lines
