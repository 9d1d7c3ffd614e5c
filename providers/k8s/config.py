"""Configuration of the ``k8s`` provider, kept apart from the provider so that it validates
(CLI, environment records, ``--help``) without the optional ``kubernetes`` client installed."""

from __future__ import annotations

import posixpath
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..base import ProviderConfig
from ..shipping import DEFAULT_MAX_COLLECT_BYTES

__all__ = ["K8sConfig", "K8sResources", "K8sToleration"]

_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def _quantity(value: str | None) -> str | None:
    if value is not None and not _QUANTITY.fullmatch(value):
        raise ValueError(f"not a Kubernetes quantity: {value!r} (e.g. 500m, 2, 512Mi, 4Gi)")
    return value


class K8sResources(BaseModel):
    """Requests and limits of the environment's container (Kubernetes quantities)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    cpu_request: str | None = None
    """CPU the scheduler reserves (``500m``, ``2``)."""
    cpu_limit: str | None = None
    """Most CPU the container may use."""
    memory_request: str | None = None
    """Memory the scheduler reserves (``512Mi``)."""
    memory_limit: str | None = None
    """Most memory the container may use before it is OOM-killed."""
    gpu: int | None = Field(default=None, ge=0)
    """GPUs (``nvidia.com/gpu``, requested and limited alike)."""

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit")
    @classmethod
    def _quantities(cls, value: str | None) -> str | None:
        return _quantity(value)


class K8sToleration(BaseModel):
    """A toleration of node taints (the Kubernetes field names)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class K8sConfig(ProviderConfig):
    """One pod per environment on a Kubernetes cluster, its workspace on a volume claim."""

    type: Literal["k8s"] = "k8s"
    """Discriminator of the provider configs."""
    kubeconfig: str | None = None
    """Path of the kubeconfig file; default: in-cluster config inside a pod, else the usual
    discovery (``KUBECONFIG``, ``~/.kube/config``)."""
    context: str | None = None
    """Context of the kubeconfig to use (default: its current context)."""
    namespace: str = "default"
    """Namespace every object of the environment is created in."""
    image: str = "narrative-host:1"
    """Image of the environment's container: it needs a POSIX ``sh``, ``tar``, coreutils and,
    for runs through a hub, Python 3.11+ with narrative-engine (``docker/Dockerfile``)."""
    image_pull_secret: str | None = None
    """Name of a docker-registry Secret in the namespace used to pull the image."""
    resources: K8sResources = Field(default_factory=K8sResources)
    """Requests and limits: ``{"cpu_request": "1", "memory_limit": "2Gi", "gpu": 1}``."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Labels a node must carry to run the pod."""
    tolerations: list[K8sToleration] = Field(default_factory=list)
    """Taints the pod tolerates (``[{"key": "gpu", "operator": "Exists"}]``)."""
    service_account: str | None = None
    """Service account of the pod (its token is never mounted); default: the namespace's."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on every object the environment creates."""
    hub_address: str | None = None
    """``CIDR:port`` (``10.0.0.5/32:8765``) the hub is reached at: the NetworkPolicy lets the
    pod reach that and nothing else. Default: no egress at all (the runtime cannot reach a
    hub off the pod; set it, with the hub's ``--advertise-url``)."""
    workdir: str = "/work"
    """Absolute directory of the workspace in the container (the volume claim's mount)."""
    workspace_size: str = "10Gi"
    """Size of the workspace's PersistentVolumeClaim (kept across stop and start)."""
    storage_class: str | None = None
    """StorageClass of the workspace claim (default: the cluster's default class)."""
    run_as_user: int = Field(default=1000, gt=0)
    """Non-root user id the container runs as."""
    grace_period: int = Field(default=10, ge=0)
    """Seconds between SIGTERM and SIGKILL when the pod is deleted (stop, delete)."""
    start_timeout: float = Field(default=300.0, gt=0)
    """Seconds to wait for the pod to run (scheduling, image pull) before giving up."""
    api_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for one API call (not for a command; see ``exec``'s timeout)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment of the container (nothing secret: it is in the pod spec)."""
    capabilities: list[str] = Field(default_factory=list)
    """Extra capabilities the image provides (``python``, ``git``, ``gpu``...)."""
    max_collect_bytes: int = Field(default=DEFAULT_MAX_COLLECT_BYTES, gt=0)
    """Upper bound on the file bytes a collect accepts from the pod."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the pod (default: ``narrative`` on PATH)."""
    warm_runtime: bool = True
    """Start a warm runtime with the pod (``narrative runtime --warm``, about 40 MB): it has
    imported the runtime once and forks one for each run, which then starts in a fraction of
    the time. Off: each run starts a fresh runtime."""

    def runtime_command(self) -> list[str]:
        """The argv prefix that runs the narrative CLI in the pod."""
        return list(self.runtime) if self.runtime else ["narrative"]

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        norm = posixpath.normpath(value) if value.startswith("/") else ""
        if norm in ("", "/", "/tmp") or "\x00" in value:
            raise ValueError(f"workdir must be an absolute directory other than / ({value!r})")
        return norm

    @field_validator("workspace_size")
    @classmethod
    def _size(cls, value: str) -> str:
        return _quantity(value) or value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", value):
            raise ValueError(f"not a namespace name: {value!r}")
        return value

    @field_validator("hub_address")
    @classmethod
    def _hub_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F.:]+/[0-9]{1,3}:[0-9]{1,5}", value):
            raise ValueError(f"hub_address must be CIDR:port (10.0.0.5/32:8765), not {value!r}")
        return value
