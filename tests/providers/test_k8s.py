"""The ``k8s`` provider: the contract suite (:mod:`providers.contract`) through the official
client against the API server stand-in and test kubelet (:mod:`tests.providers.k8s_standin`),
or a real cluster with ``NARRATIVE_K8S_CONTEXT`` (see :mod:`tests.providers.k8s_support`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from providers.contract import CHECKS, ContractTarget
from tests.providers.k8s_support import K8S_FOREIGN, k8s_config_fixture  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.long]


@pytest.mark.parametrize("check", CHECKS.values(), ids=list(CHECKS))
def test_contract(
    k8s_config: dict[str, Any], check: Callable[[ContractTarget, Path], None], tmp_path: Path
) -> None:
    check(ContractTarget("k8s", dict(k8s_config), foreign_handles=K8S_FOREIGN), tmp_path)
