"""The provider contract (:mod:`providers.contract`) against every provider of
:data:`~tests.providers.contract_targets.PROVIDERS`: worktree and local in their sandbox,
Docker on the test engine (skipped without one unless ``NARRATIVE_REQUIRE_DOCKER=1``), e2b
through its SDK against the envd stand-in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from providers.contract import CHECKS, ContractTarget
from tests.providers.contract_targets import (  # noqa: F401  (fixtures)
    PROVIDERS,
    contract_target,
    docker_image_or_skip,
)
from tests.providers.daytona_support import daytona_fixture, daytona_server_fixture  # noqa: F401
from tests.providers.e2b_support import envd_fixture, envd_server_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(180)


#: daytona's checks go through its stand-in's containers (about 25 s): make test-long
_PARAMS = [pytest.param(p, marks=pytest.mark.long) if p == "daytona" else p for p in PROVIDERS]


@pytest.fixture(params=_PARAMS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> ContractTarget:
    return contract_target(request, request.param, tmp_path)


@pytest.mark.parametrize("check", CHECKS.values(), ids=list(CHECKS))
def test_contract(
    target: ContractTarget, check: Callable[[ContractTarget, Path], None], tmp_path: Path
) -> None:
    check(target, tmp_path)
