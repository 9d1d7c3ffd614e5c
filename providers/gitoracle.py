"""Stock ``git`` as the oracle of what a collected result must hold (the provider contract's,
and the tests')."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["git_tree_of"]


def _git(*args: str, env: Mapping[str, str] | None = None) -> str:
    environ = {**os.environ, **(env or {})}
    return subprocess.run(
        ["git", *args], check=True, capture_output=True, text=True, env=environ
    ).stdout


def git_tree_of(workspace: Path, scratch: Path, exclude: tuple[str, ...] = ("/.narrative",)) -> str:
    """The tree id stock git computes for a directory (the anchor of every collect)."""
    shadow = scratch / f"oracle-{uuid.uuid4().hex[:8]}.git"
    _git("init", "-q", "--bare", str(shadow))
    (shadow / "info").mkdir(exist_ok=True)
    (shadow / "info" / "exclude").write_text("\n".join(exclude) + "\n")
    env = {"GIT_DIR": str(shadow), "GIT_WORK_TREE": str(workspace)}
    _git("add", "-A", env=env)
    return _git("write-tree", env=env).strip()
