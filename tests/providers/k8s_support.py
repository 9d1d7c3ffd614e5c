"""Fixtures of the ``k8s`` tests: the API server stand-in and test kubelet of
:mod:`tests.providers.k8s_standin` on the private Docker engine, or a real cluster.

Set ``NARRATIVE_K8S_CONTEXT`` to run the same tests against a real cluster instead: the context
of your kubeconfig (``KUBECONFIG`` or ``~/.kube/config``) to use, with ``NARRATIVE_K8S_IMAGE``
(an image with Python 3.11+ and narrative-engine, pullable by the cluster) and optionally
``NARRATIVE_K8S_NAMESPACE`` (default ``default``). Without it the tests need the private Docker
engine; they skip without one, unless ``NARRATIVE_REQUIRE_K8S=1`` (CI), which fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

REQUIRE_K8S = os.environ.get("NARRATIVE_REQUIRE_K8S") == "1"
REAL_CONTEXT = os.environ.get("NARRATIVE_K8S_CONTEXT")
#: process handles of other providers' shapes, and malformed ones of the k8s shape
K8S_FOREIGN = ("docker:abc:def", "proc:1:2:" + "0" * 24, "e2b:1:" + "0" * 24, "k8s:short", "k8s:")


STANDIN: list[Any] = []
"""The stand-in API server of the session, while it serves (none on a real cluster)."""


def k8s_unavailable(reason: str) -> None:
    if REQUIRE_K8S:
        pytest.fail(f"{reason} (NARRATIVE_REQUIRE_K8S=1 demands the k8s tests run)")
    pytest.skip(reason)


def _docker_api() -> Any:
    from tests.providers import docker_support

    try:
        return docker_support.connect()
    except pytest.skip.Exception as exc:
        k8s_unavailable(f"the k8s tests need a Docker engine for the test kubelet: {exc}")
        raise


@pytest.fixture(scope="session", name="k8s_config")
def k8s_config_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The ``--config`` of a k8s environment on the stand-in (or on the real cluster)."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        k8s_unavailable("the kubernetes client is not installed (pip install '.[k8s]')")
    if REAL_CONTEXT:
        yield {
            "context": REAL_CONTEXT,
            "namespace": os.environ.get("NARRATIVE_K8S_NAMESPACE", "default"),
            "image": os.environ["NARRATIVE_K8S_IMAGE"],
            "grace_period": 2,
        }
        return
    from providers.docker.image import DEFAULT_IMAGE, build_image
    from tests.providers.docker_support import new_owner
    from tests.providers.k8s_standin import standin_cluster

    api = _docker_api()
    import docker.errors

    try:
        api.inspect_image(DEFAULT_IMAGE)
    except docker.errors.ImageNotFound:
        build_image(api, DEFAULT_IMAGE)
    directory = str(tmp_path_factory.mktemp("k8s"))
    try:
        for kubeconfig, server in standin_cluster(api, directory, new_owner()):
            STANDIN.append(server)
            yield {"kubeconfig": kubeconfig, "image": DEFAULT_IMAGE, "grace_period": 2}
            STANDIN.remove(server)
    finally:
        from providers.k8s.client import close_clients

        close_clients()
        api.close()
