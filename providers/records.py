"""Persisted environment records: ``<store>/narrative/environments.json``.

One JSON document holding every environment (archived ones included, for history). Changes are
read-modify-write under the store's ``environments`` lock and replace the file atomically, so a
crash at any moment leaves either the old or the new document. The file is local state of one
store (like ``config.json``): it is never shipped in bundles. What is read back is validated —
it is input from disk — and a damaged file gives one clear error naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from narrative.errors import validation_problem
from narrative.fsutil import is_locked, write_atomic
from narrative.ids import new_id
from narrative.models import now_iso
from narrative.store import Store

from .errors import EnvironmentExists, EnvironmentNotFound, EnvironmentStateError
from .lifecycle import EnvState

__all__ = [
    "HUB_SOCKET",
    "EnvironmentRecord",
    "EnvironmentStore",
    "being_created",
    "creating",
    "env_state_dir",
    "hub_socket_dir",
    "records_path",
]

HUB_SOCKET = "hub.sock"
"""The name of the socket a hub serves an environment's runtime on, in :func:`hub_socket_dir`."""

_FILE = os.path.join("narrative", "environments.json")
_VERSION = 1
T = TypeVar("T")
_PARSED: dict[str, tuple[bytes, list[EnvironmentRecord]]] = {}
"""Per records file: its bytes when last parsed and the records they gave (see ``_shared``)."""


class EnvironmentRecord(BaseModel):
    """One environment as persisted."""

    # Empty containers as plain defaults (pydantic copies them for each record), not
    # default_factory=list: pydantic reads a builtin factory's signature through inspect, which
    # compiles tokenize's regex (~10 ms) in every process that loads this model, every runtime's.
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: new_id("environment"))
    """Stable id (``env-…``)."""
    name: str
    """Unique among the environments that are not archived."""
    provider: str
    """Registry name of the provider (``worktree``, ``docker``, ...)."""
    config: dict[str, Any] = {}
    """Provider configuration, validated by the provider's own model."""
    resource_id: str | None = None
    """The provider's handle: a directory, a container id, a sandbox id."""
    state: EnvState = EnvState.CREATED
    capabilities: list[str] = []
    resources: dict[str, Any] = {}
    """Resource limits asked for by the project file (``cpus``, ``memory``, ``disk``)."""
    unenforced: list[str] = []
    """Those of ``resources`` the provider cannot enforce (reported, never silently dropped)."""
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    last_health_at: str | None = None
    """When the last health check ran."""
    error_count: int = 0
    """Errors seen over the environment's life."""
    consecutive_failures: int = 0
    """Health checks failed in a row (reset by a good one)."""
    last_error: str | None = None
    history: list[dict[str, str]] = []
    """State changes, oldest first: ``{"at", "from", "to", "reason"}`` (last 50)."""


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    environments: list[EnvironmentRecord]


def env_state_dir(store: Store, env_id: str) -> str:
    """Local working state of one environment: its log, scratch space, last known tree."""
    return os.path.join(store.git_dir, "narrative", "envs", env_id)


@contextmanager
def creating(store: Store, env_id: str) -> Iterator[None]:
    """Held while environment ``env_id``'s resource is made and recorded (an exclusive
    ``flock`` on ``creating`` in its state directory): a sweep meanwhile leaves that resource
    alone (:func:`being_created`). The kernel drops the lock when the creating process dies, so
    the resource of a create that crashed is swept as the leak it is."""
    directory = env_state_dir(store, env_id)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, "creating"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def being_created(store: Store, env_id: str) -> bool:
    """Whether a process is making environment ``env_id``'s resource now (see
    :func:`creating`)."""
    return is_locked(os.path.join(env_state_dir(store, env_id), "creating"))


def hub_socket_dir(env_id: str, *, create: bool = True) -> str:
    """The private directory (mode 0700, created unless told) holding the unix socket through
    which the environment's runtime reaches the hub; bind-mounted read-only into the
    environment, it holds nothing but that socket. In the user's data directory, outside every
    store: a live socket is no file a copy or a hash of the store should meet."""
    from narrative.location import data_dir

    path = os.path.join(data_dir(), "hub-sockets", env_id)
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # whatever the umask, or an older directory, left
    return path


def records_path(store: Store) -> str:
    return os.path.join(store.git_dir, _FILE)


class EnvironmentStore:
    """Load and change the environment records of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = records_path(store)

    def load(self) -> list[EnvironmentRecord]:
        """Every record, parsed afresh (the caller may change them)."""
        raw = self._read()
        return [] if raw is None else self._parse(raw)

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EnvironmentStateError(f"cannot read {self.path}: {exc}") from exc

    def _parse(self, raw: bytes) -> list[EnvironmentRecord]:
        try:
            doc = _Document.model_validate_json(raw)
        except ValidationError as exc:
            raise EnvironmentStateError(
                f"invalid environment records in {self.path}: {validation_problem(exc)}"
            ) from None
        if doc.version != _VERSION:
            raise EnvironmentStateError(f"unsupported version {doc.version} in {self.path}")
        return doc.environments

    def _shared(self) -> list[EnvironmentRecord]:
        """The records as last parsed from the same bytes, never handed out themselves: a hub
        looks records up many times per run, and the file changes far less often (the parse
        is the work; reading and comparing the bytes is not)."""
        raw = self._read()
        if raw is None:
            return []
        cached = _PARSED.get(self.path)
        if cached is not None and cached[0] == raw:
            return cached[1]
        records = self._parse(raw)
        _PARSED[self.path] = (raw, records)
        return records

    def _save(self, records: list[EnvironmentRecord]) -> None:
        doc = _Document(version=_VERSION, environments=records)
        data = json.dumps(doc.model_dump(mode="json"), indent=2).encode() + b"\n"
        write_atomic(self.path, data)

    @contextmanager
    def _locked(self) -> Iterator[list[EnvironmentRecord]]:
        with self.store.lock("environments"):
            records = self.load()
            yield records
            self._save(records)

    def live(self) -> list[EnvironmentRecord]:
        """Every environment that is not archived, oldest first."""
        return [r for r in self.load() if r.state is not EnvState.ARCHIVED]

    def get(self, name_or_id: str) -> EnvironmentRecord:
        """A live environment by name or id (an archived one only by its exact id), a copy the
        caller may change."""
        records = self._shared()
        for record in records:
            if record.state is not EnvState.ARCHIVED and name_or_id in (record.name, record.id):
                return record.model_copy(deep=True)
        for record in records:
            if record.id == name_or_id:
                return record.model_copy(deep=True)
        raise EnvironmentNotFound(name_or_id)

    def add(self, record: EnvironmentRecord) -> EnvironmentRecord:
        with self._locked() as records:
            if any(r.name == record.name and r.state is not EnvState.ARCHIVED for r in records):
                raise EnvironmentExists(record.name)
            records.append(record)
        return record

    def change(
        self, env_id: str, fn: Callable[[EnvironmentRecord], T]
    ) -> tuple[EnvironmentRecord, T]:
        """Apply ``fn`` to the record under the lock and save it (unless ``fn`` raises)."""
        with self.store.lock("environments"):
            records = self.load()
            for index, record in enumerate(records):
                if record.id == env_id:
                    copy = record.model_copy(deep=True)
                    result = fn(copy)
                    copy.updated_at = now_iso()
                    records[index] = copy
                    self._save(records)
                    return copy, result
        raise EnvironmentNotFound(env_id)
