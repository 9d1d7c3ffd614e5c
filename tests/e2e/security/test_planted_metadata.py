"""Attack 1 of issue 13 end to end: an agent in a real run plants hooks and configs under
``.narrative/`` and ``.git`` look-alikes in its checkout. Its result must not carry them, and
``diff``/``merge`` of the run must bring only its legitimate work: the user's ``.git`` and store
stay byte-identical apart from the merge, and no planted program ever runs (a canary).

Runs for every provider that runs here (``worktree`` and ``local`` in their sandbox, Docker on
the private engine); the negative control shows that the canary would appear if the planted
config reached ``.git``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from narrative.store import Store
from tests.conftest import Cli, git, tree_bytes
from tests.e2e.security.conftest import env_create_args, over_isolated_providers

PLANTED = (
    ".narrative/hooks/post-checkout",
    ".Narrative/config",
    ".git/hooks/post-checkout",
    ".git/config",
    "sub/.GIT/config",
    "sub/.git./config",
    "git~1/config",
)

#: Plants every path (``.git`` in the checkout may be a file: it is replaced by a directory),
#: each a program or a config that would run ``touch $CANARY``, then does its real work.
AGENT = r"""
set -e
for path in $PLANTED; do
    dir=$(dirname "$path")
    [ -d "$dir" ] || { rm -f "$dir"; mkdir -p "$dir"; }
    case "$path" in
        */config) printf '[core]\n\tfsmonitor = "touch %s; false"\n' "$CANARY" > "$path" ;;
        *) printf '#!/bin/sh\ntouch %s\n' "$CANARY" > "$path"; chmod +x "$path" ;;
    esac
done
echo "the agent's work" > result.txt
"""


@over_isolated_providers
def test_planted_hooks_and_configs_never_come_home(
    provider: str, request: pytest.FixtureRequest, cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    isolated_env = env_create_args(request, provider, tmp_path)
    (workspace / "README.md").write_text("# the user's project\n")
    git("init", "-q", cwd=workspace)
    git("add", "-A", cwd=workspace)
    git("commit", "-qm", "user's work", cwd=workspace)
    cli.run("init")
    cli.run("snapshot", "-m", "before the run")
    store_dir = Path(Store.open(workspace=str(workspace)).git_dir)
    canary = tmp_path / "CANARY"
    cli.run("env", "create", "box", *isolated_env)
    env = {"PLANTED": " ".join(PLANTED), "CANARY": str(canary)}
    proc = cli.run("run", "start", "--env", "box", "--json", "--", "sh", "-c", AGENT, env=env)
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded", proc.stderr

    # the result holds the agent's work and none of what it planted (stock git reads it)
    commit = _commit_of(store_dir, run["result_snapshot"])
    listed = git("--git-dir", str(store_dir), "ls-tree", "-r", "--name-only", commit)
    assert "result.txt" in listed.split(), listed
    for path in PLANTED:
        assert path not in listed.split(), f"{path} travelled home in the result"
    diff = cli.run("diff", run["id"], "--name-status").stdout
    assert "result.txt" in diff and ".narrative" not in diff.lower() and ".git" not in diff.lower()

    user_git = tree_bytes(workspace / ".git")
    cli.run("merge", run["id"])
    assert (workspace / "result.txt").read_text() == "the agent's work\n"
    assert not (workspace / ".Narrative").exists() and not (workspace / "sub").exists()
    assert not (workspace / "git~1").exists()
    assert tree_bytes(workspace / ".git") == user_git  # the merge never wrote into .git
    git("status", "--porcelain", cwd=workspace)  # would run a planted fsmonitor
    cli.run("restore", run["result_snapshot"])  # and restoring the result plants nothing
    git("status", "--porcelain", cwd=workspace)
    assert not canary.exists(), "a planted program ran"
    git("--git-dir", str(store_dir), "fsck", "--strict", "--no-dangling")


def _commit_of(store_dir: Path, snapshot_id: str) -> str:
    """The commit of a snapshot id, by the snapshot's trailer (stock git, not our reader)."""
    grep = f"--grep=^Narrative-Snapshot: {snapshot_id}$"
    out = git("--git-dir", str(store_dir), "log", "--all", "--format=%H", grep)
    return out.split()[0]


def test_negative_control_a_planted_fsmonitor_in_git_runs(tmp_path: Path) -> None:
    """What the guards prevent is real: the same planted config in a repository's ``.git``
    runs its program on the next ``git status``."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    canary = tmp_path / "CANARY"
    env = {**os.environ, "PLANTED": ".git/config", "CANARY": str(canary)}
    subprocess.run(["sh", "-c", AGENT], cwd=repo, env=env, check=True)
    subprocess.run(["git", "status"], cwd=repo, capture_output=True, check=False)
    assert canary.exists()
