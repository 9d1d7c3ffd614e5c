"""The provider interface: one ABC for every place a snapshot can be restored into and run.

Lifecycle (create/start/stop/delete/reconnect/health) is kept apart from operations (exec,
files, restore, collect), as SWE-ReX splits deployments from runtimes. A provider is stateless
apart from its configuration: everything it must remember about an environment lives in the
persisted record (``resource_id``), so a fresh process can reconnect to an environment that an
earlier one created. Each provider has a pydantic config model discriminated by ``type``.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from narrative.errors import InvalidInput
from narrative.ids import is_id

from .config_help import config_help
from .usage import ProcessUsage, UsageMeter

if TYPE_CHECKING:
    from narrative.models import Snapshot
    from narrative.store import Store

__all__ = [
    "CHECK_DONE",
    "RUNTIME_BOOTSTRAP",
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_RESULT_BYTES",
    "config_help",
    "BaseProvider",
    "Category",
    "ExecResult",
    "Health",
    "HubSocket",
    "OutputFn",
    "ProviderConfig",
    "ProviderContext",
    "SPAWN_LOG_LIMIT",
    "Signal",
    "SpawnLog",
    "check_relative_path",
    "tail_argv",
    "tail_read",
    "tail_start",
    "UP_FD_VAR",
]

Category = Literal["local", "cloud", "hybrid"]
OutputFn = Callable[[str, bytes], None]
"""Receives ``("stdout" | "stderr", chunk)`` while a command runs."""
Signal = Literal["term", "kill"]
"""A signal :meth:`BaseProvider.signal` can send: SIGTERM or SIGKILL."""
SPAWN_LOG_LIMIT = 64 * 1024
"""Default bound on what :meth:`BaseProvider.read_spawn_log` returns, in bytes."""


class Health(StrEnum):
    """What a health probe found."""

    OK = "ok"
    """The resource exists and answers."""
    UNREACHABLE = "unreachable"
    """The resource may exist but does not answer (daemon down, network, paused)."""
    GONE = "gone"
    """The resource no longer exists."""


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    usage: ProcessUsage | None = None
    """CPU and memory of the command, when the provider measured them as it ended."""


@dataclass(frozen=True)
class SpawnLog:
    """The end of a spawned process's output log."""

    size: int
    """The log's length in bytes (0 when there is no log)."""
    data: bytes
    """Its last bytes: those after the offset asked for, at most the limit asked for."""

    @property
    def start(self) -> int:
        """The offset of ``data`` in the log."""
        return self.size - len(self.data)


def tail_start(size: int, since: int, limit: int) -> int:
    """Where a read of the end of a ``size``-byte log starts: after ``since`` (ignored when the
    log is shorter, i.e. was replaced), and no more than ``limit`` bytes before its end."""
    return max(since if since <= size else 0, size - limit, 0)


# $0: the log, $1: since, $2: limit. Prints the log's size on a line of its own, then the bytes
# from :func:`tail_start` to that size (exactly those, should the log grow meanwhile); exit 3
# when there is no log. One command: where each is a round trip into an environment.
_TAIL_SCRIPT = r"""
[ -f "$0" ] || exit 3
size=$(wc -c < "$0") || exit 3
start=$1
[ "$start" -le "$size" ] || start=0
[ "$start" -ge $((size - $2)) ] || start=$((size - $2))
[ "$start" -ge 0 ] || start=0
echo "$size"
tail -c +$((start + 1)) "$0" | head -c $((size - start))
"""


def tail_argv(path: str, since: int, limit: int) -> list[str]:
    """The command printing the end of the log ``path`` in an environment (read its output
    with :func:`tail_read`)."""
    return ["sh", "-c", _TAIL_SCRIPT, path, str(int(since)), str(int(limit))]


def tail_read(exit_code: int, stdout: bytes) -> SpawnLog:
    """What a :func:`tail_argv` command printed, as a :class:`SpawnLog` (empty: no log)."""
    head, newline, data = stdout.partition(b"\n")
    if exit_code != 0 or not newline or not head.strip().isdigit():
        return SpawnLog(0, b"")
    return SpawnLog(int(head), data)


@dataclass(frozen=True)
class HubSocket:
    """The unix socket a hub serves an environment's runtime on (see :mod:`gateway.unix`)."""

    host_path: str
    """Where the hub listens, on this machine (in a private directory, mode 0700)."""
    environment_path: str
    """The same socket as the runtime in the environment sees it (a bind mount)."""


@dataclass(frozen=True)
class ProviderContext:
    """What a provider knows about its surroundings."""

    store: Store
    owner: str
    """Label value marking resources created for this store (leaked ones are swept by it)."""
    env_id: str
    env_name: str


DEFAULT_MAX_RESULT_BYTES = 4 << 30
"""Default cap on a run's result, as on an import (``transfer.packin.DEFAULT_MAX_EXPANDED``)."""
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_MAX_EVENT_BYTES = 16 << 20
DEFAULT_MAX_OUTPUT_BYTES = 64 << 20


class ProviderConfig(BaseModel):
    """Base of every provider's configuration model, with the caps on what a run in the
    environment may send home (all of it is hostile input: the agent controls the environment
    and its runtime). Each field's docstring is its help: ``narrative env create --provider P
    --help`` lists them (:func:`config_help`, which reads them from the source when asked:
    pydantic's ``use_attribute_docstrings`` reads it at import, and finding the source costs
    ~10 ms in a process with hundreds of modules loaded, as the runtime every run starts)."""

    model_config = ConfigDict(extra="forbid")

    max_result_bytes: int = Field(default=DEFAULT_MAX_RESULT_BYTES, gt=0)
    """Most bytes a run's result may take: the bundle its runtime ships, the objects in it once
    inflated, the files a provider collects."""
    max_events: int = Field(default=DEFAULT_MAX_EVENTS, gt=0)
    """Most events of its runtime a run's log records (then one ``events.truncated``)."""
    max_event_bytes: int = Field(default=DEFAULT_MAX_EVENT_BYTES, gt=0)
    """Most bytes of its runtime's events a run's log records."""
    max_output_bytes: int = Field(default=DEFAULT_MAX_OUTPUT_BYTES, gt=0)
    """Most bytes of agent output a run's log records (the head; then one
    ``output.truncated``)."""


def check_relative_path(path: str) -> str:
    """Normalise a path inside an environment's workspace; refuse absolute or escaping ones."""
    if not path or "\x00" in path:
        raise InvalidInput(f"invalid path {path!r}")
    if path.startswith("/"):
        raise InvalidInput(f"path must be relative to the environment's workspace: {path}")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise InvalidInput(f"path escapes the environment's workspace: {path}")
    return norm


class BaseProvider(ABC):
    """An environment backend. Subclasses set the class attributes and implement the methods.

    Resource ids are whatever the backend uses (a directory, a container id, a sandbox id);
    file paths given to the file operations are relative to the environment's workspace.
    """

    name: ClassVar[str]
    category: ClassVar[Category]
    capabilities: ClassVar[frozenset[str]]
    config_model: ClassVar[type[ProviderConfig]]
    preference: ClassVar[int] = 50
    """Lower is picked first when several providers meet a ``--require`` (ties: by name)."""
    _listed_environments: Mapping[str, str] = {}
    """Each listed resource's environment (see :meth:`listed`; replaced, never changed)."""

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        self.context = context
        self.config = config

    @classmethod
    def capabilities_for(cls, config: ProviderConfig) -> frozenset[str]:
        """Capabilities of an environment with ``config`` (default: the class's)."""
        return cls.capabilities

    @classmethod
    def capabilities_in(cls, config: ProviderConfig, store: Store) -> frozenset[str]:
        """Capabilities of an environment with ``config`` among the other environments of
        ``store``, refusing (``InvalidInput``) a config that does not fit them, before
        anything is recorded (default: :meth:`capabilities_for`; a hybrid environment's
        depend on the environments it is made of)."""
        return cls.capabilities_for(config)

    @classmethod
    def resource_config(cls, resources: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The config keys that enforce ``resources`` (``cpus``, ``memory``, ``disk`` from the
        project file) and the names of those this provider cannot enforce (default: none
        enforced)."""
        return {}, sorted(resources)

    @classmethod
    def check_config(cls, config: ProviderConfig) -> None:
        """Refuse a configuration this machine cannot honour, before anything is recorded or
        created (default: accept)."""
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    @abstractmethod
    def create(self) -> str:
        """Create the resource (not yet started); return its id."""

    @abstractmethod
    def start(self, resource_id: str) -> None:
        """Start (or resume) the resource."""

    @abstractmethod
    def stop(self, resource_id: str) -> None:
        """Stop (or pause) the resource, keeping its state."""

    @abstractmethod
    def delete(self, resource_id: str) -> None:
        """Destroy the resource. Idempotent: a resource that is gone already is fine."""

    @abstractmethod
    def reconnect(self, resource_id: str) -> None:
        """Attach to an existing resource from a fresh process; ``ResourceGone`` if it is not."""

    @abstractmethod
    def health(self, resource_id: str) -> Health:
        """Probe the resource without changing it."""

    def list_resources(self) -> list[str]:
        """Ids of every resource labelled with this store's owner (for sweeping leaks)."""
        return []

    def environment_of(self, resource_id: str) -> str | None:
        """The id of the environment ``resource_id`` was made for, if the resource says so
        (default: its label as :meth:`listed` noted it). The sweep leaves the resource of an
        environment being created alone, and deletes a leak as the environment it was made
        for, so that what that keys by the id (its processes' marker, its state) is found."""
        return self._listed_environments.get(resource_id)

    def listed(self, labels: Mapping[str, Mapping[str, Any] | None], key: str) -> list[str]:
        """What :meth:`list_resources` returns: the ids of ``labels`` (resource id -> its
        labels), sorted; the environment each one's label ``key`` names is noted for
        :meth:`environment_of` (a value that is no environment id is ignored)."""
        environments = {}
        for resource, its in labels.items():
            env = its.get(key) if isinstance(its, Mapping) else None
            if isinstance(env, str) and is_id(env, "environment"):
                environments[resource] = env
        self._listed_environments = environments
        return sorted(labels)

    # -- operations -----------------------------------------------------------------------------

    @abstractmethod
    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the environment's workspace, streaming output to ``on_output``."""

    @abstractmethod
    def read_file(self, resource_id: str, path: str) -> bytes:
        """Content of a file in the workspace."""

    @abstractmethod
    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        """Create or replace a file in the workspace (parents created)."""

    @abstractmethod
    def delete_file(self, resource_id: str, path: str) -> None:
        """Remove a file from the workspace."""

    @abstractmethod
    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        """Make the environment's workspace hold exactly ``snapshot``."""

    @abstractmethod
    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        """Snapshot the environment's workspace onto ``thread_id`` in the local store; with a
        ``run_id`` (a run's result) staged under :func:`narrative.runs.incoming_ref` instead,
        for the secret screening to record on the thread."""

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process that earlier commands and spawned processes left running in the
        environment (before a new run starts there: nothing of one run may reach the next).

        Default: nothing, for a backend whose processes all end with their command."""
        return None

    def prepare_for_run(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """:meth:`end_leftovers`, then :meth:`reset` (what a new run needs first).

        Default: those two; a backend where each command is a round trip into the environment
        does both in one."""
        self.end_leftovers(resource_id)
        self.reset(resource_id, snapshot)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Make the workspace hold exactly ``snapshot`` (None: nothing) for a new run, whatever
        an earlier run left there: it is emptied (ignored files, symlinks, the runtime's store
        included) and restored afresh, and the environment's private temporary directories
        are emptied too. Called after :meth:`end_leftovers`, so nothing writes meanwhile.

        Default: :meth:`restore` (a backend that restores into an emptied workspace anyway);
        with None, nothing (the runtime restores the run's input over what is there).
        """
        if snapshot is not None:
            self.restore(resource_id, snapshot)

    # -- background processes -------------------------------------------------------------------

    @abstractmethod
    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` in the environment's workspace in the background.

        The process is detached from the caller: it runs in its own session (process group)
        and outlives the calling process. The returned handle is an opaque string that stays
        valid across restarts of the caller, so that a fresh process with a new provider
        instance for the same resource can :meth:`signal` it or ask whether it is
        :meth:`alive`.

        Args:
            resource_id: The environment's resource (it must be running).
            argv: The command and its arguments.
            env: Variables added to the environment of the command.
            log_path: A host path the process's stdout and stderr are appended to, where the
                provider can do that; providers that cannot write host files document where
                the output goes instead. Without it the output is discarded.

        Returns:
            The process handle.

        Raises:
            InvalidInput: ``argv`` is empty.
            ExecFailed: The command could not be started.
        """

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start the runtime a hub drives a run through (``narrative runtime``), as
        :meth:`spawn` does; its handle goes to :meth:`signal` and :meth:`alive` like any other.

        Default: :meth:`spawn` in the environment. A provider whose environment is driven
        from this machine (``remote``: another hub runs the agent) starts it here instead.
        """
        return self.spawn(resource_id, argv, env=env, log_path=log_path)

    def start_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Ready the environment for a run that restores its own input
        (:meth:`prepare_for_run` with no snapshot), then :meth:`spawn_runtime`.

        Default: the two calls; a provider whose every call is a round trip into the
        environment makes them one."""
        self.prepare_for_run(resource_id, None)
        return self.spawn_runtime(resource_id, argv, env=env, log_path=log_path)

    @abstractmethod
    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        """Send SIGTERM (``"term"``) or SIGKILL (``"kill"``) to a spawned process and all
        its descendants.

        Args:
            resource_id: The environment's resource.
            handle: What :meth:`spawn` returned.
            sig: Which signal to send.

        Raises:
            InvalidInput: ``handle`` is not a handle this provider issues.

        A process that has exited already is no error: nothing is signalled.
        """

    @abstractmethod
    def alive(self, resource_id: str, handle: str) -> bool:
        """Whether a spawned process is still running (a zombie counts as not running).

        Args:
            resource_id: The environment's resource.
            handle: What :meth:`spawn` returned.

        Raises:
            InvalidInput: ``handle`` is not a handle this provider issues.
        """

    def await_end(self, resource_id: str, handle: str, seconds: float) -> bool | None:
        """Wait up to ``seconds`` for a spawned process to end, where the environment can wait
        by itself: one round trip instead of a look (:meth:`alive`) now and then.

        Returns:
            True: it ended (or never ran); False: it still runs; None: this provider does not
            wait in the environment (the default): the caller looks with :meth:`alive`.
        """
        return None

    extra_stop_time: ClassVar[float] = 0.0
    """Seconds that ending an agent here takes beyond what the hub allows any environment
    (a remote run stopped there and its result brought home); the hub waits that much longer
    before it kills the runtime of a run being stopped or past its deadline."""

    resets_without_store: ClassVar[bool] = False
    """Whether :meth:`end_leftovers`, :meth:`reset` with no snapshot, :meth:`usage_meter` and
    :meth:`spawn_runtime` leave the store alone (a backend whose workspace lives elsewhere
    just empties it; a directory's first snapshots what a run left there). A hub then starts
    runs here in the environment's own lane, beside other environments' starts, instead of
    on its one store thread."""

    spawn_log_on_host: ClassVar[bool] = False
    """Whether :meth:`spawn` appends the output to the host's ``log_path`` itself; when not,
    the output stays in the environment and :meth:`read_spawn_log` fetches it."""

    @abstractmethod
    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The end of a spawned process's output log, wherever :meth:`spawn` put it.

        Works while the process runs and after it exited, on a stopped environment where the
        backend can read one; a log that does not exist (the process was spawned without one,
        or the environment is gone or unreachable) is an empty :class:`SpawnLog`, not an error.

        Args:
            resource_id: The environment's resource.
            handle: What :meth:`spawn` returned.
            log_path: The ``log_path`` given to :meth:`spawn` (read by providers that write
                the output to the host; the others ignore it).
            since: Only the bytes after this offset (what an earlier call returned already).
            limit: At most this many bytes, the last ones.

        Raises:
            InvalidInput: ``handle`` is not a handle this provider issues.
        """

    def usage_meter(self, resource_id: str) -> UsageMeter:
        """A meter of what runs in the environment from now on (see
        :class:`providers.usage.UsageMeter`); this one measures nothing."""
        return UsageMeter(f"{self.name}: CPU and memory not measured")

    def warnings(self) -> list[str]:
        """What the user should know about this environment's isolation (``env show``)."""
        return []

    @abstractmethod
    def runtime_command(self) -> list[str]:
        """The argv prefix that runs the ``narrative`` CLI inside the environment."""

    def hub_socket(self, resource_id: str) -> HubSocket | None:
        """The unix socket through which the runtime of this environment reaches a hub on
        this machine (which listens there while it drives a run here); None: the runtime
        dials the hub's TCP address (default)."""
        return None

    def check_runtime(self, resource_id: str) -> None:
        """Run the runtime's import check (``narrative runtime --check``) in the environment,
        with the same command, working directory and environment the hub starts it with.

        Raises:
            RuntimeBroken: the runtime does not start, or a module of the workspace shadows
                one of its own (named in the message).
        """
        from .errors import ExecFailed, RuntimeBroken

        argv = [*self.runtime_command(), "runtime", "--check"]
        try:
            result = self.exec(resource_id, argv, env={"NARRATIVE_STORE": ""}, timeout=120)
        except ExecFailed as exc:  # the program itself is missing
            raise RuntimeBroken(f"no runtime in {resource_id}: {exc}; {self.runtime_hint}") from exc
        shadowed = _check_report(result.stdout)
        if result.exit_code != 0 or shadowed is None:
            tail = (result.stderr or result.stdout).decode(errors="replace").strip()
            tail = tail.splitlines()[-1] if tail else f"exit code {result.exit_code}"
            if shadowed:
                modules = ", ".join(f"{name} ({path})" for name, path in sorted(shadowed.items()))
                tail = f"workspace files shadow its modules: {modules}"
            elif result.exit_code in (126, 127) or "ModuleNotFoundError" in tail:
                tail = f"{tail}; {self.runtime_hint}"  # no program, no Python, or no package
            raise RuntimeBroken(f"the runtime in {resource_id} is broken: {tail}")

    runtime_hint: ClassVar[str] = (
        "the environment needs Python 3.11+ with narrative-engine installed, "
        "or --config runtime=... naming the CLI there"
    )
    """How to give an environment a working runtime, appended to a :class:`RuntimeBroken`
    that says it has none."""


RUNTIME_BOOTSTRAP = (
    "import runpy, sys; root = sys.argv.pop(1); "
    "root in sys.path or sys.path.insert(0, root); "
    "runpy.run_module('cli', run_name='__main__', alter_sys=True)"
)
"""What ``python -I -c`` runs to start the runtime. Isolated mode (``-I``) keeps the working
directory (the environment's workspace, which the agent controls) off ``sys.path`` and ignores
``PYTHON*`` variables, so no workspace file (``cli/``, ``json.py``...) replaces a module of the
runtime; the installation's own directory (the first argument) is put back explicitly, which
also serves a checkout run through ``PYTHONPATH`` or an editable install."""


UP_FD_VAR = "NARRATIVE_UP_FD"
"""Names a file descriptor (3 or above) a spawned runtime inherits: it writes ``up`` there once
it is connected to its hub, then closes it. A provider whose spawn is a round trip into the
environment holds that spawn open on it (:meth:`BaseProvider.spawn_runtime`): the spawn returns
when the runtime is up or ended, so the hub need not look again and again while it starts."""


CHECK_DONE = "narrative-runtime-check"
"""The last line ``narrative runtime --check`` prints, followed by ``ok`` or ``broken``; lines
before it are ``shadowed<TAB>module<TAB>path``."""


def _check_report(stdout: bytes) -> dict[str, str] | None:
    """The shadowed modules ``narrative runtime --check`` reported, or None when it did not
    finish its report."""
    lines = stdout.decode(errors="replace").splitlines()
    if not lines or not lines[-1].startswith(CHECK_DONE + " "):
        return None
    shadowed = {}
    for line in lines[:-1]:
        kind, _, rest = line.partition("\t")
        name, _, path = rest.partition("\t")
        if kind == "shadowed" and name:
            shadowed[name] = path
    return shadowed
