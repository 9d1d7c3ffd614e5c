"""The project file ``narrative.toml`` (issue 14 item 7): environment profiles, the default
provider and its base config, resource limits (enforced by Docker, reported as not enforced
elsewhere) and agent manifests that ``run start --agent NAME`` runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from narrative.store import Store
from tests.conftest import Cli, store_dir_of, tree_bytes


def _file(store: Store, snapshot_id: str, path: str) -> str:
    from narrative.history import resolve_snapshot
    from narrative.trees import flatten_tree

    snap = resolve_snapshot(store, snapshot_id)
    _mode, oid = flatten_tree(store.odb, bytes.fromhex(snap.tree))[path]
    return store.odb.read(oid)[1].decode()


def test_profiles_and_defaults_fill_in_env_create(cli: Cli, workspace: Path) -> None:
    (workspace / "narrative.toml").write_text(
        """
[defaults]
provider = "worktree"

[resources]
memory = "1g"

[environments.offline]
config = { network = "none" }
resources = { cpus = 1 }
"""
    )
    cli.run("init")
    created = cli.run("env", "create", "offline", "--json")
    record = json.loads(created.stdout)
    assert record["provider"] == "worktree" and record["config"]["network"] == "none"
    assert record["resources"] == {"memory": "1g", "cpus": 1.0}
    assert sorted(record["unenforced"]) == ["cpus", "memory"]
    assert "not enforced by the worktree provider" in created.stderr
    shown = cli.json("env", "show", "offline")
    assert any("not enforced" in w for w in shown["warnings"])
    plain = cli.json("env", "create", "plain", "--config", "network=host")
    assert plain["provider"] == "worktree" and plain["config"].get("network", "host") == "host"


def test_an_agent_manifest_is_what_run_start_runs(cli: Cli, workspace: Path) -> None:
    (workspace / "narrative.toml").write_text(
        """
[defaults]
agent = "writer"

[agents.writer]
command = ["sh", "-c", "echo written by the manifest > out.txt"]
environment = "wt"
timeout = 60
"""
    )
    cli.run("init")
    cli.run("env", "create", "wt", "--provider", "worktree")
    run = cli.json("run", "start")  # no command: [defaults] agent's manifest
    assert run["status"] == "succeeded" and run["agent"] == "writer" and run["environment"] == "wt"
    store = Store.open(workspace=str(workspace))
    assert _file(store, run["result_snapshot"], "out.txt") == "written by the manifest\n"
    command = ["run", "start", "--agent", "writer", "--env", "wt", "--json", "--", "true"]
    other = json.loads(cli.run(*command).stdout)
    assert other["status"] == "succeeded"  # a command given wins over the manifest
    assert "out.txt" not in cli.run("diff", other["id"], "--name-status").stdout


def test_a_bad_project_file_is_one_named_error(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    before = tree_bytes(store_dir_of(workspace))
    for text, where in (
        ("[agents.x]\ncommand = []\n", "agents.x.command"),
        ("[defaults]\nprovidr = 'docker'\n", "defaults.providr"),
        ("[resources]\nmemory = 'lots'\n", "resources.memory"),
        ("[defaults\n", "not valid TOML"),
    ):
        (workspace / "narrative.toml").write_text(text)
        proc = cli.run("env", "create", "box", "--provider", "worktree", check=False)
        assert proc.returncode == 1, proc
        assert "narrative.toml" in proc.stderr and where in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert tree_bytes(store_dir_of(workspace)) == before


def test_docker_enforces_the_projects_limits(
    cli: Cli, workspace: Path, docker_api: Any, docker_image: str
) -> None:
    (workspace / "narrative.toml").write_text(
        f"""
[providers.docker]
image = "{docker_image}"

[resources]
cpus = 0.5
memory = "256m"
"""
    )
    cli.run("init")
    record = cli.json("env", "create", "box", "--provider", "docker", "--no-start")
    assert record["unenforced"] == []
    host = docker_api.inspect_container(record["resource_id"])["HostConfig"]
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 256 << 20
    cli.run("env", "delete", "box")


def test_the_readme_example_is_a_valid_project_file(tmp_path: Path) -> None:
    from providers.project import load_project

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    assert blocks, "README shows no narrative.toml"
    for block in blocks:
        (tmp_path / "narrative.toml").write_text(block)
        project = load_project(str(tmp_path))
        assert project.agents and project.environments
        settings = project.run(None, [], [], [], None)
        assert settings.command and settings.environments == ["box"]
