"""The one list of providers the project tests: each one as the contract suite drives it
(:mod:`providers.contract`, run by ``test_contract.py``) and as users create it from the CLI
(:func:`env_create_args`, which the attack suites of ``tests/security`` parametrise over), so a
provider added here inherits the contract and every attack at once."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.contract import ContractTarget
from providers.manager import EnvironmentManager

#: every provider of the contract suite
PROVIDERS = ["worktree", "local", "docker", "e2b", "daytona", "hybrid"]
#: handles of each provider's shape (and of the others') that it never issued
DIRECTORY_FOREIGN = ("proc:1", "proc:0:1:" + "0" * 24, "docker:x:y", "proc:12:34:zz")
DOCKER_FOREIGN = ("proc:1:2:" + "0" * 24, "docker:abc:def", "e2b:1:" + "0" * 24)
E2B_FOREIGN = ("e2b:0:" + "0" * 24, "e2b:12:short")
DAYTONA_FOREIGN = ("daytona:nosuchcommand:" + "0" * 24, "daytona:x:short", "daytona::" + "0" * 24)
#: those an agent can be run in from the CLI on this machine, isolated: the directory providers
#: in their sandbox and Docker on the test engine (e2b's stand-ins, envd and the control plane,
#: serve the provider's own tests in-process, not runs from the CLI)
ISOLATED_PROVIDERS = ["worktree", "local", "docker"]

HAVE_BWRAP = shutil.which("bwrap") is not None
REQUIRE_SANDBOX = os.environ.get("NARRATIVE_REQUIRE_SANDBOX") == "1"


def sandbox_or_skip() -> None:
    if not HAVE_BWRAP:
        if REQUIRE_SANDBOX:
            pytest.fail("bwrap is missing and NARRATIVE_REQUIRE_SANDBOX=1")
        pytest.skip("bwrap (bubblewrap) is not installed")


@pytest.fixture(scope="session")
def docker_image_or_skip() -> Iterator[str]:
    """The offline-built test image (skips without an engine, fails in CI without one)."""
    from tests.providers.docker_support import ensure_image, session_api

    for api in session_api():
        yield ensure_image(api)


def contract_target(request: pytest.FixtureRequest, provider: str, scratch: Path) -> ContractTarget:
    """``provider`` as the contract suite drives it: the config users get (sandboxed directory
    providers, a network-less container), e2b through its SDK against the envd stand-in."""
    if provider == "docker":
        from tests.providers.docker_support import HOST_MOUNTS

        image = request.getfixturevalue("docker_image_or_skip")
        return ContractTarget("docker", {"image": image, "mounts": HOST_MOUNTS, "stop_timeout": 2})
    if provider == "e2b":
        envd = request.getfixturevalue("envd")
        return ContractTarget(
            "e2b",
            before_create=envd.add_sandbox,  # debug mode: one sandbox id, made afresh
            after_delete=envd.kill,  # debug mode: the SDK's kill is the control plane's
            lists_resources=False,  # debug mode has no control plane to list from
            foreign_handles=E2B_FOREIGN,
            # the provider leaves the sandbox's /tmp (docs/security.md); the stand-in's
            # commands run on this host, whose /tmp nothing may empty
            empties_temp=False,
            # stop pauses an e2b sandbox and start resumes it, its processes with it (the
            # stand-in's debug mode cannot pause: they run on either way)
            stop_ends_processes=False,
        )
    if provider == "daytona":  # through its SDK against the Daytona stand-in
        from tests.providers.daytona_support import standin_config

        daytona = request.getfixturevalue("daytona")
        return ContractTarget(
            "daytona", standin_config(daytona, poll_interval=0.05), foreign_handles=DAYTONA_FOREIGN
        )
    sandbox_or_skip()
    if provider == "hybrid":  # over two worktrees: every operation is the agent one's
        config = {"agent": "contract-agent", "tools": "contract-tools", "route": ["fs:*"]}
        return ContractTarget(
            "hybrid",
            config,
            prepare=_hybrid_components,
            keeps_resource=True,  # its two environments are the user's: a delete keeps them
            lists_resources=False,  # nothing of its own to list: its components are listed
            foreign_handles=DIRECTORY_FOREIGN,
        )
    if provider == "local":
        config = {"path": str(scratch / "local-env")}
        return ContractTarget(
            "local",
            config,
            keeps_resource=True,
            lists_resources=False,
            foreign_handles=DIRECTORY_FOREIGN,
        )
    return ContractTarget(provider, foreign_handles=DIRECTORY_FOREIGN)


def _hybrid_components(manager: EnvironmentManager) -> None:
    """The agent and tools environments of the hybrid contract target, in a check's store."""
    known = {record.name for record in manager.environments()}
    for name in ("contract-agent", "contract-tools"):
        if name not in known:
            manager.create(name, "worktree")


def env_create_args(request: pytest.FixtureRequest, provider: str, tmp_path: Path) -> list[str]:
    """``env create`` arguments of an environment of ``provider`` as users get it: sandboxed
    directory providers, or a network-less container running this checkout's runtime."""
    if provider == "docker":
        from providers.base import RUNTIME_BOOTSTRAP
        from tests.gateway.hub.test_hub_docker import REPO, runtime_config

        image = request.getfixturevalue("docker_image_or_skip")
        runtime = json.dumps([sys.executable, "-I", "-c", RUNTIME_BOOTSTRAP, REPO])
        return ["--provider", "docker", *runtime_config(image), "--config", f"runtime={runtime}"]
    sandbox_or_skip()
    if provider == "local":
        return ["--provider", "local", "--config", f"path={tmp_path / 'local-env'}"]
    return ["--provider", provider]


#: parametrizes a test over :data:`ISOLATED_PROVIDERS` (``env_create_args(request,
#: provider, tmp_path)`` then gives its environment)
over_isolated_providers = pytest.mark.parametrize("provider", ISOLATED_PROVIDERS)
