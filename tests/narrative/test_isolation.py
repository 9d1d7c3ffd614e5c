"""The user's repository is never written, whatever GIT_* variables and hooks say."""

from __future__ import annotations

import os
from pathlib import Path

from tests.cli.test_cli import _digest_tree
from tests.conftest import Cli, git

_FAILING_HOOK = '#!/bin/sh\necho ran > "{marker}"\nexit 1\n'


def test_user_repository_is_byte_for_byte_unchanged(workspace: Path, tmp_path: Path) -> None:
    git("init", "-q", cwd=workspace)
    git("add", "-A", cwd=workspace)
    git("commit", "-qm", "user commit", cwd=workspace)
    marker = tmp_path / "hook-ran"
    hooks = workspace / ".git" / "hooks"
    for name in (
        "pre-commit",
        "post-commit",
        "reference-transaction",
        "post-checkout",
        "pre-auto-gc",
        "post-index-change",
    ):
        (hooks / name).write_text(_FAILING_HOOK.format(marker=marker))
        (hooks / name).chmod(0o755)
    # a hostile global config: hooks elsewhere, signing on
    global_cfg = tmp_path / "gitconfig"
    global_cfg.write_text(f"[core]\n\thooksPath = {hooks}\n[commit]\n\tgpgSign = true\n")
    (workspace / ".git" / "info").mkdir(exist_ok=True)
    (workspace / ".git" / "info" / "exclude").write_text("*.secret\n")
    (workspace / "token.secret").write_text("excluded by the user's info/exclude")
    (workspace / "work.txt").write_text("uncommitted user work\n")
    user_git_before = _digest_tree(workspace / ".git")
    hostile = {
        "GIT_DIR": str(workspace / ".git"),
        "GIT_WORK_TREE": str(workspace),
        "GIT_INDEX_FILE": str(workspace / ".git" / "index"),
        "GIT_OBJECT_DIRECTORY": str(workspace / ".git" / "objects"),
        "GIT_CONFIG_GLOBAL": str(global_cfg),
        "GIT_CONFIG_NOSYSTEM": "0",
    }
    cli = Cli(workspace)
    cli.run("init", env=hostile)
    first = cli.json("snapshot", env=hostile)
    (workspace / "work.txt").write_text("more work\n")
    cli.json("snapshot", env=hostile)
    cli.run("restore", first["id"], env=hostile)
    cli.run("diff", first["id"], env=hostile)
    store = cli.json("info")["store"]
    names = git("--git-dir", store, "ls-tree", "-r", "--name-only", first["tree"]).split()
    assert "token.secret" not in names and "work.txt" in names
    cli.run("gc", "--keep-last", "1", env=hostile)
    assert _digest_tree(workspace / ".git") == user_git_before
    assert not marker.exists()
    # the store does not borrow the user's objects: it stands alone
    assert not os.path.exists(os.path.join(store, "objects", "info", "alternates"))
    git("--git-dir", store, "fsck", "--strict", "--no-dangling")
    # and the user's own git still sees only its own state
    status = git("status", "--porcelain", cwd=workspace)
    assert ".narrative" not in status
