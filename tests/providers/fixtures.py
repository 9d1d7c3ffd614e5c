"""Shared fixtures for provider tests. Each provider keeps its fixtures in its own block."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from narrative.ids import new_id
from narrative.store import Store
from providers.base import BaseProvider
from providers.registry import register, unregister


@contextmanager
def rendezvous(name: str, cls: type[BaseProvider], parties: int) -> Iterator[threading.Barrier]:
    """``cls`` registered as provider ``name`` while the block runs, with a fresh barrier of
    ``parties`` in its ``met`` (a provider whose calls wait for one another: done one after
    another, they never meet)."""
    met = threading.Barrier(parties, timeout=20)
    setattr(cls, "met", met)  # noqa: B010 (a class of the caller's, not of BaseProvider)
    register(name, cls)
    try:
        yield met
    finally:
        unregister(name)


# ---------------------------------------------------------------------------------------------
# Docker (real engine at DOCKER_HOST; see tests/providers/docker_support.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_api() -> Iterator[Any]:
    """Low-level client of the test engine; skips (or fails in CI) without one."""
    from tests.providers.docker_support import session_api

    yield from session_api()


@pytest.fixture(scope="session")
def docker_image(docker_api: Any) -> str:
    """Tag of the offline-built test image."""
    from tests.providers.docker_support import ensure_image

    return ensure_image(docker_api)


@pytest.fixture
def make_docker_provider(
    docker_api: Any, docker_image: str, store: Store
) -> Iterator[Callable[..., Any]]:
    """Factory of DockerProviders on the test image; their containers are removed afterwards.

    Keyword arguments override config fields; ``owner``/``env_id`` override the context.
    """
    from providers.base import ProviderContext
    from providers.docker.config import DockerConfig
    from providers.docker.provider import DockerProvider
    from tests.providers.docker_support import HOST_MOUNTS, new_owner

    made: list[DockerProvider] = []

    def make(owner: str | None = None, env_id: str | None = None, **config: Any) -> Any:
        fields: dict[str, Any] = {
            "image": docker_image,
            "mounts": HOST_MOUNTS,
            "stop_timeout": 2,
            **config,
        }
        context = ProviderContext(
            store=store,
            owner=owner or new_owner(),
            env_id=env_id or new_id("environment"),
            env_name="test-env",
        )
        provider = DockerProvider(context, DockerConfig.model_validate(fields))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        for resource_id in docker_api.containers(
            all=True, filters={"label": f"narrative.owner={provider.context.owner}"}
        ):
            docker_api.remove_container(resource_id["Id"], force=True, v=True)
        provider.close()


# ---------------------------------------------------------------------------------------------
