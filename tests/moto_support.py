"""moto's ``ThreadedMotoServer`` for tests that speak to AWS APIs (S3 in tests/transfer, EC2 in
tests/providers): one server on 127.0.0.1, and an environment in which botocore reads no AWS
setup of the developer's and sends nothing anywhere but that server.

Tests skip when moto is missing or its server does not start, unless
``NARRATIVE_REQUIRE_S3=1`` is set (CI), in which case they fail.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator

import pytest

REQUIRE_MOTO = os.environ.get("NARRATIVE_REQUIRE_S3") == "1"

# Variables that could send traffic somewhere other than the local moto server, or make
# botocore read the developer's AWS setup.
AWS_ENV_DROP = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
AWS_ENV_SET = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def moto_unavailable(reason: str) -> None:
    """Skip, or fail where the moto tests must run."""
    if REQUIRE_MOTO:
        pytest.fail(f"{reason} (NARRATIVE_REQUIRE_S3=1 demands the moto tests run)")
    pytest.skip(reason)


def post(url: str) -> None:
    """POST nothing to ``url`` (moto's ``/moto-api/reset``)."""
    # No proxy handler: the request must go straight to the loopback server.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, data=b"", method="POST"), timeout=10) as resp:
        resp.read()


def moto_server() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a fresh moto server, stopped when the generator ends (the
    body of a session fixture)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        moto_unavailable(f"these tests need moto[server]: {exc}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        post(f"{endpoint}/moto-api/reset")
    except Exception as exc:
        moto_unavailable(f"moto server did not start: {exc!r}")
    try:
        yield endpoint
    finally:
        server.stop()


def use_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials, and none of the developer's AWS setup or proxies, for this test."""
    for name in AWS_ENV_DROP:
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV_SET.items():
        monkeypatch.setenv(name, value)
