"""The ``kubernetes`` client as the k8s provider uses it: one shared client per cluster
configuration, and the client's errors in the provider's terms."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from typing import Any

from narrative.jsonio import parse_json

from ..errors import ProviderError, ProviderUnavailable, ResourceGone
from .config import K8sConfig

__all__ = ["api_client", "api_errors", "close_clients", "k8s_module", "new_api_client"]

_CLIENTS: dict[tuple[str | None, str | None], Any] = {}
"""One client (and connection pool) per cluster configuration, shared by every provider
instance of the process: a hub drives many environments of one cluster."""
_CLIENTS_LOCK = threading.Lock()


def api_client(cfg: K8sConfig) -> Any:
    """The shared client of the configured cluster (:func:`new_api_client`)."""
    key = (cfg.kubeconfig, cfg.context)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = new_api_client(cfg)
        return _CLIENTS[key]


def close_clients() -> None:
    """Close the shared clients (their connection pools)."""
    with _CLIENTS_LOCK:
        for client in _CLIENTS.values():
            client.close()
        _CLIENTS.clear()


def new_api_client(cfg: K8sConfig) -> Any:
    """A client for the configured cluster: the kubeconfig (and context) given, else the
    in-cluster config inside a pod, else the usual kubeconfig discovery."""
    client, config = k8s_module("kubernetes.client"), k8s_module("kubernetes.config")
    try:
        if cfg.kubeconfig is None and cfg.context is None:
            try:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                return client.ApiClient(configuration)
            except config.ConfigException:
                pass
        return config.new_client_from_config(config_file=cfg.kubeconfig, context=cfg.context)
    except (config.ConfigException, OSError, ValueError) as exc:
        raise ProviderUnavailable(f"k8s: no usable cluster configuration: {exc}") from exc


@contextlib.contextmanager
def api_errors(op: str, name: str = "") -> Iterator[None]:
    """Translate the client's errors: 404 → :class:`ResourceGone`, others → ProviderError."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        if exc.status == 404 and name:
            raise ResourceGone(name) from exc
        detail = exc.reason
        with contextlib.suppress(ValueError, AttributeError):
            detail = parse_json(exc.body or "{}").get("message") or detail
        raise ProviderError(f"k8s {op} {name}: {exc.status} {detail}".replace("  ", " ")) from exc
    except (HTTPError, OSError) as exc:
        raise ProviderError(f"k8s {op} {name}: the API server does not answer: {exc}") from exc


def k8s_module(name: str) -> Any:
    """A module of the (optional, loosely typed) ``kubernetes`` client."""
    return importlib.import_module(name)
