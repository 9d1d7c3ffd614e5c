"""Attack 1 of issue 13: code execution through the store. Nothing a run (or a bundle, or an
archive) carries can write into the user's ``.git`` or the store: snapshots never contain
``.git`` look-alikes at any depth or ``.narrative`` at the top, and restore/merge refuse, whole
and before writing anything, a tree that holds one (with the path named)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from narrative.store import Store
from tests.conftest import Cli, git, tree_bytes

HOSTILE = [
    ".narrative/hooks/post-checkout",
    ".Narrative/config",
    ".git/hooks/post-checkout",
    "sub/.GIT/config",
    "sub/.git./config",
    "git~1/config",
]


def _store(ws: Path) -> Store:
    return Store.open(workspace=str(ws))


def _crafted_snapshot(cli: Cli, ws: Path, hostile: str) -> str:
    """A snapshot commit (real trailers) whose tree also holds ``hostile``, made with stock git
    and put at the head of the workspace's thread, as an imported bundle could."""
    base = cli.json("snapshot", "-m", "base")
    git_dir = ["--git-dir", _store(ws).git_dir]

    def run(*args: str, stdin: str = "") -> str:
        return subprocess.run(
            ["git", *git_dir, *args], input=stdin, capture_output=True, text=True, check=True
        ).stdout.strip()

    blob = run("hash-object", "-w", "--stdin", stdin="#!/bin/sh\ntouch CANARY\n")
    # update-index refuses such paths, so the trees are built by hand (mktree takes them)
    parts = hostile.split("/")
    tree = run("mktree", stdin=f"100755 blob {blob}\t{parts[-1]}\n")
    for part in reversed(parts[:-1]):
        tree = run("mktree", stdin=f"040000 tree {tree}\t{part}\n")
    top = run("ls-tree", base["commit"])
    tree = run(
        "mktree", stdin=top + f"\n040000 tree {tree}\t{parts[0]}\n" if len(parts) > 1 else top
    )
    message = git(*git_dir, "cat-file", "commit", base["commit"]).split("\n\n", 1)[1]
    commit = run("commit-tree", tree, "-p", base["commit"], stdin=message)
    git(*git_dir, "update-ref", f"refs/narrative/threads/{base['thread']}", commit)
    return commit


@pytest.mark.parametrize("hostile", HOSTILE)
def test_restore_refuses_a_tree_that_writes_into_git_or_the_store(
    cli: Cli, workspace: Path, tmp_path: Path, hostile: str
) -> None:
    cli.run("init")
    commit = _crafted_snapshot(cli, workspace, hostile)
    (workspace / "README.md").write_text("changed, so a restore has work to do\n")
    before = tree_bytes(workspace)
    for args in (["restore", commit], ["restore", commit, "--to", str(tmp_path / "out")]):
        proc = cli.run(*args, check=False)
        assert proc.returncode == 1, proc.stdout
        assert hostile.split("/", maxsplit=1)[0] in proc.stderr and "Traceback" not in proc.stderr
    assert tree_bytes(workspace) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not list(workspace.rglob("CANARY"))


def test_snapshots_never_capture_git_or_store_look_alikes(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    for path in HOSTILE:
        target = workspace / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\ntouch CANARY\n")
    (workspace / ".narrative" / ".gitignore").unlink()  # an agent would remove it first
    (workspace / "fine.txt").write_text("kept\n")
    snap = cli.json("snapshot")
    out = workspace.parent / "materialized"
    cli.run("restore", snap["id"], "--to", str(out))
    stored = set(tree_bytes(out))
    assert "fine.txt" in stored
    assert not [p for p in stored if p.split("/")[0].lower().startswith((".narrative", ".git"))]
    assert not [p for p in stored if ".git" in p.lower() or "git~1" in p.lower()]
    skipped = {s["path"] for s in snap["skipped"]}
    assert {".Narrative", "sub/.GIT", "sub/.git.", "git~1"} <= skipped
