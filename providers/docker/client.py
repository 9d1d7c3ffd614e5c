"""The Engine API client of the ``docker`` provider and the translation of its errors.

:func:`connect` makes the low-level client (never pulling, never guessing a socket that is not
there); :func:`sdk_errors` turns every error of the SDK, of requests and of urllib3 into the
providers error tree (:func:`translate_error`, the one place that knows them). The client
remembers, per thread, the HTTP responses it received inside :func:`capturing_responses`, so
that an exec's attached stream can be closed for good without the SDK's private attributes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from ..errors import ExecFailed, ImageNotFound, ProviderError, ProviderUnavailable, ResourceGone
from .config import DEFAULT_IMAGE
from .image import build_image

__all__ = [
    "SDK_ERRORS",
    "archive_url",
    "build_default_image",
    "capturing_responses",
    "connect",
    "raise_for_status",
    "sdk_errors",
    "translate_error",
]


def connect(base_url: str | None = None, timeout: float = 60.0) -> Any:
    """A low-level Engine API client for ``base_url`` (default: ``DOCKER_HOST`` and friends).

    Raises:
        ProviderUnavailable: no daemon answers there.
    """
    with sdk_errors("connect"):
        if base_url is not None:
            kwargs: dict[str, Any] = {"base_url": base_url}
        else:
            kwargs = docker.utils.kwargs_from_env()
        url = str(kwargs.get("base_url") or "unix:///var/run/docker.sock")
        # Checked here because the SDK leaks a socket when a unix connect fails.
        if url.startswith("unix://") and not os.path.exists(url[len("unix://") :]):
            raise ProviderUnavailable(f"docker daemon unreachable: no socket at {url}")
        api = docker.APIClient(version="auto", timeout=timeout, **kwargs)
        api.hooks["response"].append(_remember_response)
        return api


def build_default_image(tag: str = DEFAULT_IMAGE, base_url: str | None = None) -> str:
    """Build (or rebuild) the default image offline under ``tag``; returns its id."""
    api = connect(base_url)
    try:
        with sdk_errors("build", image=tag):
            return build_image(api, tag)
    finally:
        api.close()


def translate_error(
    exc: BaseException,
    op: str,
    resource_id: str | None = None,
    image: str | None = None,
    path: str | None = None,
) -> Exception:
    """The error of the providers tree (or a built-in file error) standing for ``exc``."""
    if isinstance(exc, docker.errors.APIError):
        explanation = str(exc.explanation or exc)
        status = exc.response.status_code if exc.response is not None else None
        if isinstance(exc, docker.errors.NotFound):
            if image is not None:
                return ImageNotFound(image)
            if resource_id is not None and "no such container" in explanation.lower():
                return ResourceGone(resource_id)
            if path is not None:
                return FileNotFoundError(f"{path}: no such file in the environment")
            if resource_id is not None:
                return ResourceGone(resource_id)
        if status == 409 and ("not running" in explanation or "paused" in explanation):
            detail = f"container {resource_id} is not running: {explanation}"
            return ExecFailed(detail) if op in ("exec", "spawn") else ProviderUnavailable(detail)
        if op == "spawn" and "OCI runtime exec failed" in explanation:
            # a detached exec reports a program that cannot be started as the API call's error
            return ExecFailed(f"cannot start the command: {explanation}")
        return ProviderError(f"docker {op} failed: {explanation}")
    if isinstance(exc, requests.exceptions.Timeout):
        return ProviderUnavailable(f"docker daemon did not answer in time ({op}): {exc}")
    if isinstance(exc, requests.exceptions.RequestException):
        return ProviderUnavailable(f"docker daemon unreachable ({op}): {exc}")
    if isinstance(exc, OSError) or "fetching server API version" in str(exc):
        # A stream's socket failing mid-command, or the client's start-up version probe.
        return ProviderUnavailable(f"docker daemon unreachable ({op}): {exc}")
    return ProviderError(f"docker {op} failed: {exc}")


SDK_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


@contextlib.contextmanager
def sdk_errors(
    op: str, resource_id: str | None = None, image: str | None = None, path: str | None = None
) -> Iterator[None]:
    """Raise what :func:`translate_error` makes of an SDK error inside the block."""
    try:
        yield
    except SDK_ERRORS as exc:
        raise translate_error(exc, op, resource_id, image, path) from exc


_responses = threading.local()
"""Per thread, while :func:`capturing_responses` runs: the HTTP responses the client got."""


def _remember_response(response: Any, *args: Any, **kwargs: Any) -> Any:
    """A requests response hook (installed on every client :func:`connect` makes)."""
    held = getattr(_responses, "held", None)
    if held is not None:
        held.append(response)
    return response


@contextlib.contextmanager
def capturing_responses() -> Iterator[list[Any]]:
    """The responses the client receives in this thread inside the block."""
    held: list[Any] = []
    _responses.held = held
    try:
        yield held
    finally:
        _responses.held = None


def archive_url(api: Any, resource_id: str) -> str:
    """The Engine API's archive endpoint of a container (what ``get_archive`` calls)."""
    container = urllib.parse.quote(resource_id, safe="")
    return f"{api.base_url}/v{api.api_version}/containers/{container}/archive"


def raise_for_status(response: Any) -> None:
    """Raise the SDK's error for a failed response (as its own calls do)."""
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        raise docker.errors.create_api_error_from_http_exception(exc) from exc
