"""The ``k8s`` provider's manifests (pure functions) against the Kubernetes schema
(``kubernetes-validate``, strict: unknown fields refused), their hardening, and the reading of
pod statuses into environment states."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from providers.base import config_help
from providers.k8s import manifests
from providers.k8s.config import K8sConfig

SCHEMA = "1.37.0"
OWNER = manifests.owner_reference("PersistentVolumeClaim", "narrative-env-1", "uid-1")


def _all(cfg: K8sConfig) -> list[dict[str, Any]]:
    name = manifests.object_name("env_01HZY")
    labels = manifests.object_labels("narrative-0123456789abcdef", "env_01HZY", cfg.labels)
    return [
        manifests.claim_manifest(name, cfg, labels),
        manifests.pod_manifest(name, cfg, labels, OWNER),
        manifests.secret_manifest(name, cfg, labels, OWNER),
        manifests.network_policy_manifest(name, cfg, labels, OWNER),
    ]


FULL = K8sConfig(
    namespace="agents",
    image="registry.example/narrative:1",
    image_pull_secret="regcred",
    resources={"cpu_request": "500m", "cpu_limit": "2", "memory_limit": "4Gi", "gpu": 1},
    node_selector={"pool": "gpu"},
    tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    service_account="runner",
    labels={"team": "ml"},
    hub_address="10.0.0.5/32:8765",
    storage_class="fast",
)


@pytest.mark.parametrize("cfg", [K8sConfig(), FULL], ids=["defaults", "every-setting"])
def test_every_object_is_valid_against_the_schema(cfg: K8sConfig) -> None:
    for obj in _all(cfg):
        kubernetes_validate.validate(obj, SCHEMA, strict=True)


def test_the_schema_check_can_fail() -> None:
    pod = _all(K8sConfig())[1]
    pod["spec"]["containers"][0]["securityContex"] = {}  # a typo: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, SCHEMA, strict=True)


def test_pod_is_hardened_and_owned() -> None:
    pod = _all(FULL)[1]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    security = spec["containers"][0]["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsUser"] != 0
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/work", "/tmp"} <= mounts  # the writable places
    assert pod["metadata"]["ownerReferences"] == [OWNER]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "500m"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert spec["serviceAccountName"] == "runner"
    # nothing secret in the pod spec: the spawn environment comes from the Secret's volume
    assert not any("TOKEN" in e["name"] for e in container["env"])
    assert {"secretName": "narrative-env-01hzy-env"}.items() <= next(
        v["secret"] for v in spec["volumes"] if "secret" in v
    ).items()


def test_labels_mark_store_and_environment_and_cannot_be_overridden() -> None:
    cfg = K8sConfig(labels={manifests.LABEL_OWNER: "someone-else", "team": "ml"})
    for obj in _all(cfg):
        labels = obj["metadata"]["labels"]
        assert labels[manifests.LABEL_OWNER] == "narrative-0123456789abcdef"
        assert labels[manifests.LABEL_ENV] == "env_01HZY"
        assert labels["team"] == "ml"


def test_network_policy_allows_only_the_hub() -> None:
    policy = _all(FULL)[3]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == []
    assert policy["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.0.0.5/32"}}], "ports": [{"protocol": "TCP", "port": 8765}]}
    ]
    assert _all(K8sConfig())[3]["spec"]["egress"] == []  # no hub address: nothing out


def test_every_dependent_is_owned_by_the_claim() -> None:
    claim, *dependents = _all(K8sConfig())
    assert "ownerReferences" not in claim["metadata"]
    assert all(d["metadata"]["ownerReferences"] == [OWNER] for d in dependents)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"phase": "Pending"}, ("starting", "pending")),
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
            ("starting", "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
        ),
        (
            {
                "phase": "Pending",
                "containerStatuses": [
                    {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}}}
                ],
            },
            ("starting", "ImagePullBackOff: back-off"),
        ),
        (
            {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
            ("running", ""),
        ),
        (
            {"phase": "Running", "conditions": [{"type": "Ready", "status": "Unknown"}]},
            ("not_available", "the pod's node does not answer"),
        ),
        ({"phase": "Unknown"}, ("not_available", "the pod's node is lost")),
        (
            {"phase": "Failed", "reason": "NodeLost", "message": "node n1 lost"},
            ("not_available", "NodeLost: node n1 lost"),
        ),
        (
            {"phase": "Failed", "reason": "Evicted", "message": "low on memory"},
            ("error", "Evicted: low on memory"),
        ),
        (
            {
                "phase": "Failed",
                "containerStatuses": [{"state": {"terminated": {"reason": "OOMKilled"}}}],
            },
            ("error", "the pod ended (Failed: OOMKilled)"),
        ),
    ],
)
def test_pod_state(status: dict[str, Any], expected: tuple[str, str]) -> None:
    state = manifests.pod_state({"metadata": {"name": "p"}, "status": status})
    assert (state.state, state.reason) == expected


def test_a_deleted_pod_is_stopping() -> None:
    pod = {
        "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": "Running"},
    }
    assert manifests.pod_state(pod).state == "stopping"


def test_object_names_are_dns_labels() -> None:
    name = manifests.object_name("Env_" + "X" * 80)
    assert len(manifests.env_secret_name(name)) <= 63
    assert name == name.lower() and name[0].isalnum() and name[-1].isalnum()


def test_config_refuses_bad_values_and_documents_every_setting() -> None:
    for bad in (
        {"namespace": "Not_A_Namespace"},
        {"resources": {"cpu_limit": "lots"}},
        {"hub_address": "10.0.0.5"},
        {"workdir": "/"},
        {"tolerations": [{"operator": "Maybe"}]},
    ):
        with pytest.raises(ValidationError):
            K8sConfig.model_validate(bad)
    documented = dict(config_help(K8sConfig))
    for field in (
        "kubeconfig",
        "context",
        "namespace",
        "image",
        "image_pull_secret",
        "resources",
        "node_selector",
        "tolerations",
        "service_account",
        "labels",
    ):
        key = next(k for k in documented if k.startswith(field + "="))
        assert len(documented[key]) > 20, (key, documented[key])
