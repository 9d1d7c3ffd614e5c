"""Fixtures of the provider tests."""

from tests.providers.k8s_support import k8s_config_fixture  # noqa: F401  (one stand-in per session)
