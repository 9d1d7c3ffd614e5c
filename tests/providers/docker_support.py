"""Docker test support: a real engine at ``DOCKER_HOST`` and a test image built offline.

Tests skip when no daemon answers, unless ``NARRATIVE_REQUIRE_DOCKER=1`` (CI), which turns the
skip into a failure. Nothing is ever pulled: the image is ``docker import`` of a skeleton root
file system (``/bin -> usr/bin`` and friends), run with the host's ``/usr`` bind-mounted
read-only. Start a local engine with ``scripts/docker-engine.sh start /tmp/narrative-dockerd``
and ``export DOCKER_HOST=unix:///tmp/narrative-dockerd/docker.sock``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from providers.docker.image import build_image

REQUIRE_DOCKER = os.environ.get("NARRATIVE_REQUIRE_DOCKER") == "1"
TEST_IMAGE = "narrative-test-base:2"
OWNER_PREFIX = "pytest-"
HOST_MOUNTS = [{"source": "/usr", "target": "/usr", "read_only": True}]


def docker_unavailable(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"{reason} (NARRATIVE_REQUIRE_DOCKER=1 demands the Docker tests run)")
    pytest.skip(reason)


def connect() -> Any:
    """A low-level client for ``DOCKER_HOST``, or skip/fail when no daemon answers."""
    try:
        import docker
    except ImportError:
        docker_unavailable("the docker SDK is not installed")
    kwargs = docker.utils.kwargs_from_env()
    url = str(kwargs.get("base_url") or "unix:///var/run/docker.sock")
    if url.startswith("unix://") and not os.path.exists(url[len("unix://") :]):
        docker_unavailable(f"no Docker engine socket at {url}")
    reason = ""
    try:
        api = docker.APIClient(version="auto", timeout=30, **kwargs)
        api.ping()
    except Exception as exc:
        reason = f"no Docker engine reachable at {url}: {exc}"
    if reason:
        # The SDK leaks the socket of a failed unix connect; collect it quietly here rather
        # than as an unraisable warning in some later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        docker_unavailable(reason)
    return api


def docker_reachable() -> bool:
    """Whether an engine answers at ``DOCKER_HOST``; where Docker is required
    (``NARRATIVE_REQUIRE_DOCKER=1``) a missing one fails the caller instead."""
    try:
        connect().close()
    except pytest.skip.Exception:
        return False
    return True


def ensure_image(api: Any) -> str:
    """The test image, imported offline when it is not present yet."""
    import docker.errors

    try:
        api.inspect_image(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        build_image(api, TEST_IMAGE)
    return TEST_IMAGE


def new_owner() -> str:
    return OWNER_PREFIX + uuid.uuid4().hex[:12]


def sweep_test_containers(api: Any) -> None:
    """Remove every container a test run left behind (owner label with the test prefix)."""
    import docker

    for container in api.containers(all=True, filters={"label": "narrative.owner"}):
        if str(container["Labels"].get("narrative.owner", "")).startswith(OWNER_PREFIX):
            with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile
                api.remove_container(container["Id"], force=True, v=True)


def session_api() -> Iterator[Any]:
    api = connect()
    try:
        yield api
    finally:
        sweep_test_containers(api)
        api.close()
