"""Several environments in one command (issue 17's fan-out at scale): ``env create a b c``
creates them side by side, ``env delete a b c`` deletes them; bad input creates none, and one
that fails does not stop the others."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from narrative.store import Store
from providers.errors import EnvironmentExists
from providers.lifecycle import EnvState
from providers.manager import EnvironmentManager
from providers.worktree import WorktreeProvider
from tests.conftest import Cli, store_dir_of, tree_bytes
from tests.providers.fixtures import rendezvous


class RendezvousProvider(WorktreeProvider):
    """A worktree that is created only once the other two are being created too."""

    met: threading.Barrier

    def create(self) -> str:
        self.met.wait()
        return super().create()


@pytest.fixture
def three() -> Iterator[threading.Barrier]:
    with rendezvous("rendezvous", RendezvousProvider, 3) as met:
        yield met


def test_environments_are_created_side_by_side(store: Store, three: threading.Barrier) -> None:
    done: list[str] = []
    outcomes = EnvironmentManager(store).create_many(
        ["a", "b", "c"], provider="rendezvous", on_done=lambda name, _: done.append(name)
    )
    assert [o.name for o in outcomes if not isinstance(o, Exception)] == ["a", "b", "c"]
    assert all(not isinstance(o, Exception) and o.state is EnvState.RUNNING for o in outcomes)
    assert sorted(done) == ["a", "b", "c"]


def test_create_and_delete_several_from_the_cli(cli: Cli) -> None:
    cli.run("init")
    made = cli.run("env", "create", "w1", "w2", "w3", "--provider", "worktree", "--json")
    doc = json.loads(made.stdout)
    assert doc["kind"] == "environment_list"
    assert [(e["name"], e["state"]) for e in doc["items"]] == [
        ("w1", "running"),
        ("w2", "running"),
        ("w3", "running"),
    ]
    assert "[3/3]" in made.stderr  # one progress line per environment
    stopped = cli.items("env", "stop", "w1", "w2")
    assert [e["state"] for e in stopped] == ["stopped", "stopped"]
    cli.run("env", "delete", "w1", "w2", "w3")
    assert cli.items("env", "list") == []
    # one name: one document, as before
    assert cli.json("env", "create", "solo", "--provider", "worktree")["kind"] == "environment"


@pytest.mark.parametrize(
    "args",
    [
        ["env", "create", "x", "y", "x", "--provider", "worktree"],  # a name twice
        ["env", "create", "x", "taken", "--provider", "worktree"],  # one exists
        ["env", "create", "x", "../y", "--provider", "worktree"],  # a bad name
        ["env", "create", "x", "y", "--provider", "worktree", "--config", "bogus=1"],
        ["env", "delete", "taken", "nope"],  # one unknown
    ],
)
def test_bad_input_creates_or_deletes_none(cli: Cli, workspace: Path, args: list[str]) -> None:
    cli.run("init")
    cli.run("env", "create", "taken", "--provider", "worktree")
    store_dir = store_dir_of(workspace)
    before = tree_bytes(store_dir)
    failed = cli.run(*args, check=False)
    assert failed.returncode == 1
    assert len([line for line in failed.stderr.splitlines() if "error" in line]) == 1
    assert "Traceback" not in failed.stderr
    assert tree_bytes(store_dir) == before


def test_one_failure_does_not_stop_the_others(cli: Cli, workspace: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("not empty: a local environment cannot take it")
    (workspace / "narrative.toml").write_text(
        f'[environments.bad]\nprovider = "local"\nconfig = {{ path = "{busy}" }}\n'
    )
    cli.run("init")
    out = cli.run("env", "create", "ok1", "bad", "ok2", check=False)
    assert out.returncode == 1
    assert "bad failed" in out.stderr and "1 of 3 environments failed" in out.stderr
    states = {e["name"]: e["state"] for e in cli.items("env", "list")}
    assert states == {"ok1": "running", "bad": "error", "ok2": "running"}


def test_existing_name_is_refused_by_the_manager(store: Store) -> None:
    manager = EnvironmentManager(store)
    manager.create("a")
    with pytest.raises(EnvironmentExists):
        manager.create_many(["b", "a"])
    assert [r.name for r in manager.environments()] == ["a"]
