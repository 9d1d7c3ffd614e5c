"""The Kubernetes API calls the k8s provider makes, through the official client's ``ApiClient``
(its kubeconfig and in-cluster auth, TLS, proxies and urllib3 pool) with plain JSON in and out.

Not the generated ``CoreV1Api``: importing it costs ~0.6 CPU-seconds (hundreds of methods, each
wrapped in a pydantic ``validate_call``), paid by every ``narrative`` command that touches a
cluster before its first request, and each call then builds and reads the client's models where
the provider wants the JSON (docs/decisions.md, "Kubernetes client"). Watches are read as the
API server's JSON lines; execs open the client's own WebSocket (``kubernetes.stream.ws_client``),
which needs no lock: nothing of the shared client is swapped while it opens.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any
from urllib.parse import quote

from narrative.jsonio import parse_json

from ..errors import ProviderError
from .client import k8s_module

__all__ = ["CLAIMS", "NETWORK_POLICIES", "PODS", "SECRETS", "KubeRest", "ObjectPath"]

_AUTH = ["BearerToken"]
"""The client's name for the kubeconfig's credentials (token, client certificate or plugin)."""


class ObjectPath:
    """The REST paths of one kind of namespaced object (``api`` group path, ``plural``)."""

    def __init__(self, api: str, plural: str) -> None:
        self.api, self.plural = api, plural

    def collection(self, namespace: str) -> str:
        return f"{self.api}/namespaces/{quote(namespace, safe='')}/{self.plural}"

    def item(self, namespace: str, name: str, sub: str = "") -> str:
        return f"{self.collection(namespace)}/{quote(name, safe='')}" + (f"/{sub}" if sub else "")


PODS = ObjectPath("/api/v1", "pods")
CLAIMS = ObjectPath("/api/v1", "persistentvolumeclaims")
SECRETS = ObjectPath("/api/v1", "secrets")
NETWORK_POLICIES = ObjectPath("/apis/networking.k8s.io/v1", "networkpolicies")


class KubeRest:
    """JSON requests to the API server of ``client`` (a ``kubernetes.client.ApiClient``).

    Errors are the client's own (``ApiException`` with the status and the server's body), so
    :func:`.client.api_errors` reads them as before."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Sequence[tuple[str, Any]] = (),
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """The response (urllib3's, body not read yet), raising ``ApiException`` unless 2xx."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.client.param_serialize(
            method, path, query_params=list(query), header_params=headers, body=body,
            auth_settings=_AUTH,
        )  # fmt: skip
        response = self.client.call_api(*request, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            text = response.data.decode("utf-8", "replace") if response.data else None
            exceptions = k8s_module("kubernetes.client.exceptions")
            raise exceptions.ApiException.from_response(http_resp=response, body=text, data=None)
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON object the server answered ``method path`` with (arguments as :meth:`_send`)."""
        response = self._send(method, path, **kwargs)
        response.read()
        try:
            doc = parse_json(response.data)
        except ValueError as exc:
            raise ProviderError(f"k8s {method} {path}: the answer is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ProviderError(f"k8s {method} {path}: the answer is not an object")
        return doc

    def get(self, path: str, query: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
        return self.call("GET", path, query=query)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", path, body=body)

    def delete(self, path: str, options: dict[str, Any]) -> dict[str, Any]:
        """DELETE with ``DeleteOptions`` (``gracePeriodSeconds``, ``propagationPolicy``)."""
        return self.call(
            "DELETE", path, body={"kind": "DeleteOptions", "apiVersion": "v1", **options}
        )

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386: null removes a key)."""
        return self.call("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def watch(
        self, path: str, query: Sequence[tuple[str, Any]], seconds: int, timeout: float
    ) -> Generator[dict[str, Any], None, None]:
        """The events (``type``, ``object``) of a watch of ``path`` that the server ends after
        ``seconds``; ``timeout``: the socket's. An ``ERROR`` event (an expired watch, say)
        raises ``ApiException`` with its status, as the client's ``Watch`` does."""
        response = self._send(
            "GET", path, query=[*query, ("watch", "true"), ("timeoutSeconds", seconds)],
            timeout=timeout,
        )  # fmt: skip
        raw = response.response  # urllib3's, streaming
        lines = k8s_module("kubernetes.watch.watch").iter_resp_lines  # the client's own reader
        try:
            for line in lines(raw):
                if not line:
                    continue
                event = _event(line, path)
                if event["type"] == "ERROR":
                    status = event["object"]
                    exceptions = k8s_module("kubernetes.client.exceptions")
                    raise exceptions.ApiException(
                        status=status.get("code", 500),
                        reason=f"{status.get('reason', '')}: {status.get('message', '')}",
                    )
                yield event
        finally:
            raw.close()
            raw.release_conn()

    def open_exec(self, pod: str, namespace: str, query: Sequence[tuple[str, Any]]) -> Any:
        """The exec WebSocket of ``pod`` (the client's ``WSClient``; query: ``command``,
        ``container``, ``stdin``...), as ``stream(connect_get_namespaced_pod_exec, ...,
        _preload_content=False, binary=True)`` opens it."""
        ws_client = k8s_module("kubernetes.stream.ws_client")
        _, url, headers, _, _ = self.client.param_serialize(
            "GET", PODS.item(namespace, pod, "exec"), header_params={"Accept": "*/*"},
            auth_settings=_AUTH,
        )  # fmt: skip
        return ws_client.websocket_call(
            self.client.configuration, "GET", url, query_params=list(query), headers=headers,
            _preload_content=False, binary=True,
        )  # fmt: skip


def _event(line: str, path: str) -> dict[str, Any]:
    try:
        event = parse_json(line)
    except ValueError as exc:
        raise ProviderError(f"k8s watch {path}: an event is not JSON: {exc}") from exc
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("type"), str)
        or not isinstance(event.get("object"), dict)
    ):
        raise ProviderError(f"k8s watch {path}: not a watch event")
    return event
