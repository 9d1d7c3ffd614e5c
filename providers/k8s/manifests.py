"""The Kubernetes objects of one environment, as plain manifests built by pure functions (the
tests validate each against the Kubernetes schema with ``kubernetes-validate``), and the
reading of a pod's status into an environment state.

An environment is four objects sharing one name (:func:`object_name`):

* a PersistentVolumeClaim holding the workspace: the environment's *root*; every other object
  names it in its ``ownerReferences``, so deleting it deletes everything the environment made
  (the cluster's garbage collector does), and it outlives a stop, which deletes only the pod;
* the pod: hardened (no service account token, non-root, no privilege escalation, read-only
  root file system with the workspace and ``/tmp`` writable, every capability dropped, the
  runtime's default seccomp profile);
* a Secret (``<name>-env``) holding the environment of spawned processes (the run token of a
  hub's runtime): mounted read-only in the pod, never in the pod spec or on a command line;
* a NetworkPolicy admitting nothing in and letting out only the hub (``hub_address``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..zygote import WARM_FLAG
from .config import K8sConfig

__all__ = [
    "ENV_MOUNT",
    "LABEL_ENV",
    "LABEL_OWNER",
    "KEEP_ALIVE",
    "WARM_KEEP_ALIVE",
    "PodState",
    "claim_manifest",
    "env_secret_name",
    "keep_alive_command",
    "network_policy_manifest",
    "object_labels",
    "object_name",
    "owner_reference",
    "pod_manifest",
    "pod_state",
    "secret_manifest",
]

LABEL_OWNER = "narrative-engine/owner"
"""Label marking every object created for one store (leaked ones are swept by it)."""
LABEL_ENV = "narrative-engine/env"
"""Label naming the environment an object belongs to."""
ENV_MOUNT = "/var/run/narrative-env"
"""Where the environment Secret is mounted in the container (one file per spawn)."""
TMP_MOUNT = "/tmp"
KEEP_ALIVE = "trap 'exit 0' TERM; sleep 2147483647 & wait $!"
"""PID 1 of the container: a shell (which, unlike a bare ``sleep`` as PID 1, ends at once on
the SIGTERM of a pod deletion) whose only child, its first, is one endless ``sleep``: the
"command" that :data:`providers.proctree.SWEEP_SCRIPT` spares in ``init`` mode."""

WARM_KEEP_ALIVE = (
    "trap 'exit 0' TERM\n\"$@\" & wait $!\ncase $? in 126|127) sleep 2147483647 & wait $!;; esac\n"
)
"""As :data:`KEEP_ALIVE`, but its first child is the warm runtime ($@: ``narrative runtime
--warm``, :mod:`providers.zygote`). Where the image cannot run that program (126, 127: not
found, a missing interpreter), the endless ``sleep`` takes its place at once, at boot, before
any exec (so it is still the first child alive, the one sweeps spare); a warm runtime that
cannot import becomes that ``sleep`` itself. Any other end of it ends the pod, as the end of
the ``sleep`` does."""


def keep_alive_command(cfg: K8sConfig) -> list[str]:
    """The container's command: :data:`WARM_KEEP_ALIVE` or :data:`KEEP_ALIVE`."""
    if not cfg.warm_runtime:
        return ["sh", "-c", KEEP_ALIVE]
    return ["sh", "-c", WARM_KEEP_ALIVE, "keep-alive", *cfg.runtime_command(), "runtime", WARM_FLAG]


_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def object_name(env_id: str) -> str:
    """The name of every object of environment ``env_id`` (a DNS-1123 label)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", env_id.lower()).strip("-")
    return ("narrative-" + slug)[:52].rstrip("-")  # room for the "-env" of the Secret


def env_secret_name(name: str) -> str:
    """The Secret of environment object ``name``."""
    return name + "-env"


def label_value(value: str) -> str:
    """``value`` as a label value (63 characters of ``[-A-Za-z0-9_.]``, alphanumeric ends)."""
    cleaned = re.sub(r"[^-A-Za-z0-9_.]+", "-", value)[:63].strip("-_.")
    assert _LABEL_VALUE.fullmatch(cleaned)
    return cleaned


def object_labels(owner: str, env_id: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The labels of every object of an environment: the user's, then the store's and the
    environment's (which the user's cannot override)."""
    return {**extra, LABEL_OWNER: label_value(owner), LABEL_ENV: label_value(env_id)}


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """A reference making an object a dependent of the environment's root object."""
    return {
        "apiVersion": "v1",
        "kind": kind,
        "name": name,
        "uid": uid,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, cfg: K8sConfig, labels: Mapping[str, str], owner: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": cfg.namespace, "labels": dict(labels)}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return meta


def claim_manifest(name: str, cfg: K8sConfig, labels: Mapping[str, str]) -> dict[str, Any]:
    """The workspace's PersistentVolumeClaim: the environment's root object."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": cfg.workspace_size}},
    }
    if cfg.storage_class is not None:
        spec["storageClassName"] = cfg.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(name, cfg, labels, None),
        "spec": spec,
    }


def _resources(cfg: K8sConfig) -> dict[str, Any]:
    res = cfg.resources
    requests = {"cpu": res.cpu_request, "memory": res.memory_request}
    limits = {"cpu": res.cpu_limit, "memory": res.memory_limit}
    if res.gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpu)
    out: dict[str, Any] = {}
    if any(requests.values()):
        out["requests"] = {k: v for k, v in requests.items() if v}
    if any(limits.values()):
        out["limits"] = {k: v for k, v in limits.items() if v}
    return out


def pod_manifest(
    name: str, cfg: K8sConfig, labels: Mapping[str, str], owner: Mapping[str, Any]
) -> dict[str, Any]:
    """The environment's hardened pod, owned by its claim."""
    container: dict[str, Any] = {
        "name": "env",
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "command": keep_alive_command(cfg),
        "workingDir": cfg.workdir,
        "env": [{"name": k, "value": v} for k, v in {"HOME": TMP_MOUNT, **cfg.env}.items()],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "workspace", "mountPath": cfg.workdir},
            {"name": "tmp", "mountPath": TMP_MOUNT},
            {"name": "spawn-env", "mountPath": ENV_MOUNT, "readOnly": True},
        ],
    }
    resources = _resources(cfg)
    if resources:
        container["resources"] = resources
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": cfg.grace_period,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "fsGroup": cfg.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": name}},
            {"name": "tmp", "emptyDir": {}},
            {
                "name": "spawn-env",
                "secret": {
                    "secretName": env_secret_name(name),
                    "optional": True,
                    "defaultMode": 0o440,
                },
            },
        ],
    }
    if cfg.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": cfg.image_pull_secret}]
    if cfg.node_selector:
        spec["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in cfg.tolerations]
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(name, cfg, labels, owner),
        "spec": spec,
    }


def secret_manifest(
    name: str, cfg: K8sConfig, labels: Mapping[str, str], owner: Mapping[str, Any]
) -> dict[str, Any]:
    """The (empty) Secret the environment of spawned processes travels in."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(env_secret_name(name), cfg, labels, owner),
        "data": {},
    }


def network_policy_manifest(
    name: str, cfg: K8sConfig, labels: Mapping[str, str], owner: Mapping[str, Any]
) -> dict[str, Any]:
    """Nothing in; out only to ``hub_address`` (nothing at all without one)."""
    egress: list[dict[str, Any]] = []
    if cfg.hub_address:
        cidr, _, port = cfg.hub_address.rpartition(":")
        egress.append(
            {"to": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": int(port)}]}
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, cfg, labels, owner),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_ENV: labels[LABEL_ENV]}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


StateName = Literal["starting", "running", "stopping", "error", "not_available"]


@dataclass(frozen=True)
class PodState:
    """What a pod's status says about its environment."""

    state: StateName
    reason: str = ""
    """Why it is not running (the scheduler's or the kubelet's reason and message)."""


_NODE_LOST = {"NodeLost", "NodeShutdown", "Terminated"}


def _reason(source: Mapping[str, Any]) -> str:
    reason, message = source.get("reason") or "", source.get("message") or ""
    return f"{reason}: {message}" if reason and message else reason or message


def pod_state(pod: Mapping[str, Any]) -> PodState:
    """Read a pod (a manifest with its ``status``) as an environment state: Pending (not
    scheduled, image pull back-off, quota) → starting with the reason; Running and ready →
    running; Failed or evicted → error; node lost or unknown → not_available."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    if meta.get("deletionTimestamp"):
        return PodState("stopping", "the pod is being deleted")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    waiting = [
        s.get("state", {}).get("waiting")
        for s in status.get("containerStatuses") or []
        if (s.get("state") or {}).get("waiting")
    ]
    if phase == "Pending":
        scheduled = conditions.get("PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            return PodState("starting", _reason(scheduled) or "not scheduled yet")
        if waiting:
            return PodState("starting", _reason(waiting[0]))
        return PodState("starting", "pending")
    if phase == "Unknown" or status.get("reason") in _NODE_LOST:
        return PodState("not_available", _reason(status) or "the pod's node is lost")
    if phase == "Running":
        ready = conditions.get("Ready")
        if ready and ready.get("status") == "Unknown":
            return PodState("not_available", _reason(ready) or "the pod's node does not answer")
        if waiting:
            return PodState("starting", _reason(waiting[0]))
        return PodState("running")
    if status.get("reason") == "Evicted":
        return PodState("error", _reason(status))
    terminated = [
        s["state"]["terminated"]
        for s in status.get("containerStatuses") or []
        if (s.get("state") or {}).get("terminated")
    ]
    detail = _reason(status) or (_reason(terminated[0]) if terminated else "")
    return PodState("error", f"the pod ended ({phase}{': ' + detail if detail else ''})")
