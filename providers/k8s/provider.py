"""The ``k8s`` provider: one pod per environment, through the official ``kubernetes`` client.

The resource id is the name shared by the environment's objects (:mod:`.manifests`): its
workspace claim (the root, kept across stop and start), its pod (made by :meth:`start`, deleted
with its grace period, SIGTERM first, by :meth:`stop`), its Secret and NetworkPolicy. Deleting
the claim deletes the rest through their ``ownerReferences``. The pod's phase and conditions are
followed with the watch API while it starts, and a pod that does not run says why (the
scheduler's reason: unschedulable, quota; the kubelet's: image pull back-off).

Commands, files and snapshots go through the ``pods/exec`` API (:mod:`.podexec`): files and
snapshots as tar on stdin and stdout. The runtime a hub spawns dials the hub over TCP at its
advertised URL (``narrative hub serve --advertise-url``); the run token travels in the
environment's Secret, which the pod mounts, never in the pod spec or on a command line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from narrative.errors import InvalidInput

from ..base import (
    SPAWN_LOG_LIMIT,
    BaseProvider,
    ExecResult,
    Health,
    OutputFn,
    ProviderConfig,
    ProviderContext,
    Signal,
    SpawnLog,
    check_relative_path,
    tail_argv,
    tail_read,
)
from ..emptying import empty_argv, sweep_and_empty_argv
from ..errors import ProviderError, ProviderUnavailable, ResourceGone
from ..proctree import MARKER_VAR, signal_argv, sweep_argv
from ..shipping import scratch_dir, snapshot_from_tar, write_snapshot_tar
from . import manifests
from .client import api_client, api_errors
from .config import K8sConfig
from .podexec import (
    ALIVE_SCRIPT,
    AWAIT_END_SCRIPT,
    SIGNAL_PID_SCRIPT,
    PodExec,
    new_marker,
    wrap,
)
from .rest import CLAIMS, NETWORK_POLICIES, PODS, SECRETS, KubeRest
from .spawning import PodSpawn, SpawnEnds, parse_handle, spawn_log

if TYPE_CHECKING:
    from narrative.models import Snapshot

__all__ = ["K8sProvider"]


log = logging.getLogger(__name__)


class K8sProvider(BaseProvider):
    """One pod per environment on a Kubernetes cluster; the resource id is the objects' name."""

    name: ClassVar[str] = "k8s"
    category = "cloud"
    resets_without_store: ClassVar[bool] = True  # its workspace lives elsewhere
    capabilities: ClassVar[frozenset[str]] = frozenset({"k8s", "isolation", "exec", "files"})
    config_model: ClassVar[type[ProviderConfig]] = K8sConfig
    preference: ClassVar[int] = 70

    def __init__(self, context: ProviderContext, config: ProviderConfig) -> None:
        if not isinstance(config, K8sConfig):
            raise InvalidInput(f"k8s provider needs a K8sConfig, not {type(config).__name__}")
        super().__init__(context, config)
        self.cfg: K8sConfig = config
        self._client: Any = None
        self._claim_uids: dict[str, str] = {}
        """The uid of each claim this instance created (the owner of its pod): no read for it."""
        self._ends = SpawnEnds()
        """Held spawns and ended runtimes' logs (see :meth:`_spawn` and :meth:`await_end`)."""

    @classmethod
    def capabilities_for(cls, config: ProviderConfig) -> frozenset[str]:
        extra = set(config.capabilities) if isinstance(config, K8sConfig) else set()
        if isinstance(config, K8sConfig) and config.resources.gpu:
            extra.add("gpu")
        return cls.capabilities | extra

    @classmethod
    def resource_config(cls, resources: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """cpus → a CPU limit, memory → a memory limit, disk → the workspace claim's size."""
        res: dict[str, Any] = {}
        if "cpus" in resources:
            res["cpu_limit"] = str(resources["cpus"])
        if "memory" in resources:
            res["memory_limit"] = str(resources["memory"])
        config: dict[str, Any] = {"resources": res} if res else {}
        if "disk" in resources:
            config["workspace_size"] = str(resources["disk"])
        return config, sorted(k for k in resources if k not in ("cpus", "memory", "disk"))

    # -- connection -----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The API client, connected on first use."""
        if self._client is None:
            self._client = api_client(self.cfg)
        return self._client

    @property
    def api(self) -> KubeRest:
        return KubeRest(self.client)

    @property
    def pods(self) -> PodExec:
        """Commands in pods (their WebSockets use the client's configuration only)."""
        return PodExec(self.api, self.cfg.namespace)

    @property
    def _labels(self) -> dict[str, str]:
        return manifests.object_labels(self.context.owner, self.context.env_id, self.cfg.labels)

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> str:
        """The workspace claim, then the Secret and NetworkPolicy it owns (the pod comes with
        :meth:`start`)."""
        cfg, name, labels = self.cfg, manifests.object_name(self.context.env_id), self._labels
        ns = cfg.namespace
        with api_errors("create", name):
            claim = self.api.create(
                CLAIMS.collection(ns), manifests.claim_manifest(name, cfg, labels)
            )
        uid = _uid(claim, name)
        self._claim_uids[name] = uid
        owner = manifests.owner_reference("PersistentVolumeClaim", name, uid)
        with api_errors("create", name):
            self.api.create(
                SECRETS.collection(ns), manifests.secret_manifest(name, cfg, labels, owner)
            )
            self.api.create(
                NETWORK_POLICIES.collection(ns),
                manifests.network_policy_manifest(name, cfg, labels, owner),
            )
        log.debug("created k8s environment %s for %s", name, self.context.env_name)
        return str(name)

    def _claim(self, name: str) -> dict[str, Any]:
        """The workspace claim (its JSON); ResourceGone when it is gone or going."""
        with api_errors("read", name):
            claim = self.api.get(CLAIMS.item(self.cfg.namespace, name))
        if _metadata(claim).get("deletionTimestamp") is not None:
            raise ResourceGone(name)
        return claim

    def _pod(self, name: str) -> dict[str, Any] | None:
        """The pod as the API server sent it, None when there is none."""
        try:
            with api_errors("read", name):
                return self.api.get(PODS.item(self.cfg.namespace, name))
        except ResourceGone:
            return None

    def start(self, resource_id: str) -> None:
        """Create the pod (unless one runs already) and wait, watching it, until it runs.

        An environment this instance just created has no pod yet: its pod is made at once,
        with no reads first (each request counts when fifty environments start)."""
        uid = self._claim_uids.pop(resource_id, None)
        if uid is None:
            uid = _uid(self._claim(resource_id), resource_id)
            pod = self._pod(resource_id)
            if pod is not None and manifests.pod_state(pod).state in ("error", "not_available"):
                self._delete_pod(resource_id, 0)
                pod = None
            if pod is not None:
                self._wait_pod(resource_id, self._running, "run", self.cfg.start_timeout, pod)
                return
        owner = manifests.owner_reference("PersistentVolumeClaim", resource_id, uid)
        manifest = manifests.pod_manifest(resource_id, self.cfg, self._labels, owner)
        with api_errors("start", resource_id):
            pod = self.api.create(PODS.collection(self.cfg.namespace), manifest)
        self._wait_pod(resource_id, self._running, "run", self.cfg.start_timeout, pod)

    @staticmethod
    def _running(pod: dict[str, Any] | None, name: str) -> bool:
        if pod is None:
            raise ProviderError(f"pod {name} vanished while starting")
        state = manifests.pod_state(pod)
        if state.state in ("error", "not_available"):
            raise ProviderError(f"pod {name} does not run: {state.state}: {state.reason}")
        return state.state == "running"

    def _wait_pod(
        self,
        name: str,
        done: Callable[[dict[str, Any] | None, str], bool],
        what: str,
        timeout: float,
        pod: dict[str, Any] | None = None,
    ) -> None:
        """Follow the pod with the watch API until ``done`` (given the pod, None once
        deleted); the last reason it gave when the time is up. ``pod``: as it is now (read
        when not given)."""
        deadline = time.monotonic() + timeout
        if pod is None:
            pod = self._pod(name)
        last = ""
        while not done(pod, name):
            if pod is not None:
                last = manifests.pod_state(pod).reason or last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProviderError(
                    f"pod {name} did not {what} within {timeout:g}s{': ' + last if last else ''}"
                )
            events = self.api.watch(
                PODS.collection(self.cfg.namespace),
                [("fieldSelector", f"metadata.name={name}")],
                seconds=max(1, int(min(remaining, 30))),
                timeout=min(remaining, 30) + 5,
            )
            with api_errors("watch", name), contextlib.closing(events):
                for event in events:
                    pod = None if event["type"] == "DELETED" else event["object"]
                    if done(pod, name):
                        return
                    if pod is not None:
                        last = manifests.pod_state(pod).reason or last
            pod = self._pod(name)

    def _delete_pod(self, name: str, grace: int) -> None:
        """Delete the pod (SIGTERM, then SIGKILL after ``grace`` seconds) and wait until gone."""
        try:
            with api_errors("delete", name):
                self.api.delete(PODS.item(self.cfg.namespace, name), {"gracePeriodSeconds": grace})
        except ResourceGone:
            return
        self._wait_pod(name, lambda pod, _name: pod is None, "end", grace + 60)

    def stop(self, resource_id: str) -> None:
        """Delete the pod with its grace period; the workspace claim stays."""
        self._claim(resource_id)
        self._delete_pod(resource_id, self.cfg.grace_period)

    def delete(self, resource_id: str) -> None:
        """Delete the pod (with its grace period) and the claim, whose dependents the garbage
        collector removes. Idempotent."""
        self._delete_pod(resource_id, self.cfg.grace_period)
        try:
            with api_errors("delete", resource_id):
                self.api.delete(
                    CLAIMS.item(self.cfg.namespace, resource_id),
                    {"propagationPolicy": "Background"},
                )
        except ResourceGone:
            pass

    def reconnect(self, resource_id: str) -> None:
        labels = _metadata(self._claim(resource_id)).get("labels") or {}
        if labels.get(manifests.LABEL_ENV) != manifests.label_value(self.context.env_id):
            raise ResourceGone(resource_id)

    def health(self, resource_id: str) -> Health:
        """GONE without the claim, UNREACHABLE while its pod does not run (stopped, starting,
        node lost); with a ``runtime`` configured, the runtime's import check too."""
        try:
            self._claim(resource_id)
            pod = self._pod(resource_id)
        except ResourceGone:
            return Health.GONE
        except ProviderError:
            return Health.UNREACHABLE
        if pod is None or manifests.pod_state(pod).state != "running":
            return Health.UNREACHABLE
        if self.cfg.runtime:
            self.check_runtime(resource_id)
        return Health.OK

    def list_resources(self) -> list[str]:
        """The environments' claims labelled with this store's owner; none when no cluster is
        configured at all (a sweep with the default config on a machine without one)."""
        try:
            if self._client is None:
                self._client = api_client(self.cfg)
        except ProviderUnavailable as exc:
            log.debug("no k8s cluster to sweep: %s", exc)
            return []
        selector = f"{manifests.LABEL_OWNER}={manifests.label_value(self.context.owner)}"
        with api_errors("list"):
            claims = self.api.get(
                CLAIMS.collection(self.cfg.namespace), [("labelSelector", selector)]
            ).get("items")
        if not isinstance(claims, list):
            raise ProviderError("k8s list: the answer has no items")
        alive = [_metadata(c) for c in claims if _metadata(c).get("deletionTimestamp") is None]
        return self.listed(
            {str(m.get("name")): m.get("labels") for m in alive}, manifests.LABEL_ENV
        )

    # -- commands -------------------------------------------------------------------------------

    def _live_pod(self, resource_id: str) -> str:
        """The pod's name if it can run commands (``ResourceGone`` when it is being deleted)."""
        pod = self._pod(resource_id)
        if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
            raise ResourceGone(resource_id)
        return resource_id

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        marker = new_marker()
        command = wrap(self.cfg.workdir, argv, {**(env or {}), MARKER_VAR: marker})
        return self.pods.run(
            self._live_pod(resource_id),
            command,
            timeout=timeout,
            on_output=on_output,
            kill_marker=marker,
        )

    def _helper(
        self, resource_id: str, argv: list[str], what: str, stdin: bytes | None = None
    ) -> bytes:
        return self.pods.quiet(self._live_pod(resource_id), argv, what, stdin)

    def spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """Start ``argv`` detached in the workdir; its environment goes through the
        environment's Secret (mounted in the pod), so a run token is never on a command line or
        in the pod spec, and is taken out of the Secret once the process read it. The output
        goes to ``/tmp/narrative-spawn-<marker>.log`` in the pod with ``log_path`` (read by
        :meth:`read_spawn_log`), else nowhere. The handle is ``k8s:<marker>``."""
        return self._spawn(resource_id, argv, env, log_path, hold=False)

    def spawn_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """As :meth:`spawn`, but the exec returns only once the runtime is connected to its hub
        or ended (:data:`~providers.base.UP_FD_VAR`), or after
        :data:`~providers.k8s.spawning.RUNTIME_UP_HOLD` seconds: a hub waiting for fifty
        runtimes to start then does not look into each pod again and again (each look is an
        exec)."""
        return self._spawn(resource_id, argv, env, log_path, hold=True)

    def start_runtime(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> str:
        """:meth:`prepare_for_run` and :meth:`spawn_runtime` in one exec."""
        return self._spawn(resource_id, argv, env, log_path, hold=True, prepare=True)

    def _spawn(
        self,
        resource_id: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        log_path: str | None,
        *,
        hold: bool,
        prepare: bool = False,
    ) -> str:
        if not argv:
            raise InvalidInput("empty command")
        pod = resource_id  # no read first (one request per run): a failed exec asks why below
        marker = new_marker()
        handle = f"k8s:{marker}"
        spawn = PodSpawn(self.cfg, marker, lambda data: self._secret_data(resource_id, data))
        command = spawn.command(
            argv,
            env,
            logfile=spawn_log(marker) if log_path is not None else "",
            hold=hold,
            empty_first=self._run_dirs if prepare else None,
        )
        try:
            if hold:  # open until the runtime ended: no exec of await_end's needed
                self._ends.hold(handle, spawn.run_held(self.pods, pod, command, env, prepare))
            else:
                spawn.run(self.pods, pod, command, env, after_sweep=prepare)
        except ResourceGone:
            raise
        except ProviderError:
            self._live_pod(resource_id)  # ResourceGone when the pod is gone or going
            raise
        return handle

    def _secret_data(self, resource_id: str, data: Mapping[str, str | None]) -> None:
        """Add (or with None, remove) keys of the environment's Secret (a JSON merge patch)."""
        name = manifests.env_secret_name(resource_id)
        with api_errors("update", name):
            self.api.merge_patch(SECRETS.item(self.cfg.namespace, name), {"data": dict(data)})

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        marker = parse_handle(handle)
        if self._pod(resource_id) is None:
            return  # its processes died with the pod
        by_pid = ["sh", "-c", SIGNAL_PID_SCRIPT, marker, "TERM" if sig == "term" else "KILL"]
        self._helper(resource_id, by_pid, f"signalling {handle}")
        self._helper(resource_id, signal_argv(marker, sig), f"signalling {handle}")

    def alive(self, resource_id: str, handle: str) -> bool:
        """Whether the spawned process runs; :class:`ProviderUnavailable` when the probe itself
        failed (the API server or the exec did not answer): a hub then waits, instead of taking
        its runtime for one that ended."""
        marker = parse_handle(handle)
        try:
            pod = self._live_pod(resource_id)
            code = self.pods.run(pod, ["sh", "-c", ALIVE_SCRIPT, marker]).exit_code
        except ResourceGone:
            return False
        except ProviderError as exc:
            raise ProviderUnavailable(f"cannot tell whether {handle} runs: {exc}") from exc
        if code not in (0, 1):
            raise ProviderUnavailable(f"cannot tell whether {handle} runs (probe exit {code})")
        return code == 0

    def await_end(self, resource_id: str, handle: str, seconds: float) -> bool | None:
        """One exec that looks every tenth of a second in the pod (None when that exec
        failed: the caller looks with :meth:`alive`); once the process ended, the same exec
        reads the end of its log, which the caller's next :meth:`read_spawn_log` of it takes
        (one exec per run fewer: fifty runs' execs cost CPU-seconds)."""
        marker = parse_handle(handle)
        ended = self._ends.from_held(handle, seconds)
        if ended is not None:
            return ended
        tenths = str(max(0, round(seconds * 10)))
        then = tail_argv(spawn_log(marker), 0, SPAWN_LOG_LIMIT)
        argv = ["sh", "-c", AWAIT_END_SCRIPT, marker, tenths, *then]
        try:  # no read of the pod first: a pod being deleted is waited for as any other
            result = self.pods.run(resource_id, argv, timeout=seconds + 30)
        except ResourceGone:
            return True
        except ProviderError as exc:
            log.debug("cannot wait for %s in %s: %s", handle, resource_id, exc)
            return None
        ended = {0: True, 1: False}.get(result.exit_code)
        if ended:
            self._ends.keep_log(handle, result.stdout)
        return ended

    def end_leftovers(self, resource_id: str) -> None:
        """Kill every process in the pod's container but PID 1 and its first child (the endless
        ``sleep`` of :data:`~providers.k8s.manifests.KEEP_ALIVE`, or the warm runtime)."""
        self._helper(resource_id, sweep_argv(True), "ending earlier runs' processes")

    def read_spawn_log(
        self,
        resource_id: str,
        handle: str,
        *,
        log_path: str | None = None,
        since: int = 0,
        limit: int = SPAWN_LOG_LIMIT,
    ) -> SpawnLog:
        """The end of ``/tmp/narrative-spawn-<marker>.log`` in the pod; empty when there is
        none (or no pod)."""
        path = spawn_log(parse_handle(handle))
        ended = self._ends.take_log(handle, since, limit)
        if ended is not None:
            return ended
        try:
            out = self.pods.run(resource_id, tail_argv(path, since, limit))  # (no read first)
        except ProviderError as exc:
            log.debug("no spawn log %s in %s: %s", path, resource_id, exc)
            return SpawnLog(0, b"")
        return tail_read(out.exit_code, out.stdout)

    runtime_hint: ClassVar[str] = (
        "the image needs Python 3.11+ with narrative-engine installed (docker/Dockerfile), "
        "or name the CLI in it with --config runtime=..."
    )

    def runtime_command(self) -> list[str]:
        return self.cfg.runtime_command()

    # -- files ----------------------------------------------------------------------------------

    def read_file(self, resource_id: str, path: str) -> bytes:
        rel = check_relative_path(path)
        return self._helper(
            resource_id, wrap(self.cfg.workdir, ["cat", "--", rel], {}), f"reading {rel}"
        )

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        rel = check_relative_path(path)
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        argv = wrap(self.cfg.workdir, ["sh", "-c", script, "sh", rel], {})
        self._helper(resource_id, argv, f"writing {rel}", stdin=data)

    def delete_file(self, resource_id: str, path: str) -> None:
        rel = check_relative_path(path)
        self._helper(
            resource_id, wrap(self.cfg.workdir, ["rm", "-f", "--", rel], {}), f"deleting {rel}"
        )

    # -- snapshots ------------------------------------------------------------------------------

    def _empty(self, resource_id: str, directories: list[str]) -> None:
        self._helper(resource_id, empty_argv(directories), "emptying")

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        self._empty(resource_id, [self.cfg.workdir])
        self._put_snapshot(resource_id, snapshot)

    def reset(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """Empty the workdir and ``/tmp``, then restore ``snapshot``."""
        self._empty(resource_id, self._run_dirs)
        if snapshot is not None:
            self._put_snapshot(resource_id, snapshot)

    @property
    def _run_dirs(self) -> list[str]:
        """What a run may write: emptied before the next one."""
        return [self.cfg.workdir, manifests.TMP_MOUNT]

    def prepare_for_run(self, resource_id: str, snapshot: Snapshot | None) -> None:
        """:meth:`end_leftovers` and :meth:`reset` in one exec."""
        argv = sweep_and_empty_argv(True, self._run_dirs)
        self._helper(resource_id, argv, "resetting for a run")
        if snapshot is not None:
            self._put_snapshot(resource_id, snapshot)

    def _put_snapshot(self, resource_id: str, snapshot: Snapshot) -> None:
        store = self.context.store
        with tempfile.TemporaryFile(dir=f"{store.git_dir}/narrative/tmp") as spool:
            write_snapshot_tar(store, snapshot, spool)
            spool.seek(0)
            archive = spool.read()
        argv = ["tar", "-C", self.cfg.workdir, "--no-same-owner", "-xf", "-"]
        self._helper(resource_id, argv, "restoring", stdin=archive)

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        limit = min(self.cfg.max_collect_bytes, self.cfg.max_result_bytes)
        pod = self._live_pod(resource_id)
        result = self.pods.run(
            pod, ["tar", "-C", self.cfg.workdir, "-cf", "-", "."], max_stdout=limit + (1 << 20)
        )
        if result.exit_code != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise ProviderError(f"collecting from pod {pod} failed: {detail}")
        return snapshot_from_tar(
            self.context.store,
            io.BytesIO(result.stdout),
            scratch_dir(self.context.store, self.context.env_id),
            thread_id,
            run_id,
            message,
            strip="./",
            max_bytes=limit,
        )


def _metadata(obj: Any) -> dict[str, Any]:
    """The ``metadata`` of an object the API server sent (empty when it has none)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def _uid(obj: dict[str, Any], name: str) -> str:
    uid = _metadata(obj).get("uid")
    if not isinstance(uid, str) or not uid:
        raise ProviderError(f"k8s: {name} came back without a uid")
    return uid
