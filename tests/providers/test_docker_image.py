"""The docker provider's default image (issue 14 item 1): built offline on first use, it runs
this host's Python and narrative read-only; an image of one's own that lacks them fails the
run saying so and how to fix it (real engine, DESIGN.md §5)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from narrative.ids import new_id
from narrative.store import Store
from providers.base import ProviderContext
from providers.docker.config import DEFAULT_IMAGE
from providers.docker.image import IMAGE_LABEL, LIB_MOUNT, PACKAGES
from providers.errors import RuntimeBroken
from providers.worktree import WorktreeConfig, WorktreeProvider
from tests.conftest import Cli


def _remove_image(api: Any, tag: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        api.remove_image(tag, force=True)


def test_the_default_image_is_built_on_first_use_and_runs_an_agent(
    cli: Cli, workspace: Path, docker_api: Any
) -> None:
    _remove_image(docker_api, DEFAULT_IMAGE)
    cli.run("init")
    try:
        created = cli.json("env", "create", "box", "--provider", "docker", "--json")
        assert docker_api.inspect_image(DEFAULT_IMAGE)["Config"]["Labels"][IMAGE_LABEL] == "host"
        container = docker_api.inspect_container(created["resource_id"])
        mounts = {m["Destination"]: m for m in container["Mounts"]}
        ours = [f"{LIB_MOUNT}/{package}" for package in PACKAGES]
        assert all(mounts[target]["RW"] is False for target in [*ours, "/usr"])
        assert LIB_MOUNT not in mounts  # never the directory holding them (a checkout's .git)
        assert not any(str(workspace) in m["Source"] for m in container["Mounts"])
        assert cli.items("env", "health", "box", "--json")[0]["health"] == "ok"
        agent = "import gateway.client, sys; open('v.txt', 'w').write(sys.version[:4])"
        out = cli.run("-q", "run", "start", "--env", "box", "--", "python", "-c", agent)
        run = out.stdout.strip()
        assert run.startswith("run-"), out.stdout  # -q: the run id alone
        assert "+3.11" in cli.run("diff", run).stdout
    finally:
        cli.run("env", "delete", "box", check=False)


def test_an_image_without_narrative_fails_the_run_saying_how_to_fix_it(
    cli: Cli, workspace: Path, docker_image: str
) -> None:
    cli.run("init")
    mounts = json.dumps([{"source": "/usr", "target": "/usr"}])
    config = ["--config", f"image={docker_image}", "--config", f"mounts={mounts}"]
    cli.run("env", "create", "bare", "--provider", "docker", *config)
    try:
        out = cli.run("run", "start", "--env", "bare", "--", "true", check=False)
        assert out.returncode == 1
        assert "needs Python 3.11+ with narrative-engine" in out.stderr, out.stderr
        assert "leave out --config image" in out.stderr
    finally:
        cli.run("env", "delete", "bare", check=False)


def test_a_workdir_over_a_mount_is_refused(cli: Cli, docker_api: Any) -> None:
    cli.run("init")
    out = cli.run(
        "env", "create", "box", "--provider", "docker", "--config", f"workdir={LIB_MOUNT}",
        check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"overlaps the mount at {LIB_MOUNT}/narrative" in out.stderr
    assert "Traceback" not in out.stderr


def test_image_build_makes_a_labelled_image_offline(cli: Cli, docker_api: Any) -> None:
    tag = "narrative-host-test:7"
    _remove_image(docker_api, tag)
    try:
        built = cli.json("env", "image", "build", "--tag", tag, "--json")
        assert built["image"] == tag
        image = docker_api.inspect_image(tag)
        assert image["Id"] == built["id"]
        assert image["Config"]["Labels"][IMAGE_LABEL] == "host"
    finally:
        _remove_image(docker_api, tag)


def test_a_directory_environment_without_its_runtime_program_says_how_to_fix_it(
    store: Store,
) -> None:
    context = ProviderContext(store, "owner-test", new_id("environment"), "box")
    provider = WorktreeProvider(context, WorktreeConfig(runtime=["/nonexistent/narrative"]))
    resource = provider.create()
    try:
        with pytest.raises(RuntimeBroken, match=r"needs Python 3\.11\+ with narrative-engine"):
            provider.check_runtime(resource)
    finally:
        provider.delete(resource)
