"""Attack 6 of issue 13: files in an environment's workspace must not replace the modules of
the runtime started there. A workspace holding ``cli/``, ``json.py`` and ``logging.py`` that
would write a canary goes through runs in a worktree environment (the real CLI and hub): the
runs work, ``env health`` is ok, and the canary never appears. With the old invocation
(``python -m cli`` in the workspace) the same workspace runs the planted code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import Cli

CANARY = "SHADOW-CANARY"
PLANTED = ("cli/__init__.py", "json.py", "logging.py")
OLD_RUNTIME = json.dumps([sys.executable, "-m", "cli"])


def plant(workspace: Path, names: tuple[str, ...] = PLANTED) -> None:
    """Modules that, when imported, append their name to a canary in the working directory
    (the environment's checkout: writable whatever the sandbox)."""
    for name in names:
        path = workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"open({CANARY!r}, 'a').write({name!r} + '\\n')\n")


def checkout(cli: Cli, env: str) -> Path:
    return Path(cli.json("env", "show", env)["resource_id"])


def health(cli: Cli, env: str) -> dict[str, str]:
    rows = cli.items("env", "health", env)
    assert len(rows) == 1
    return dict(rows[0])


def run(cli: Cli, env: str, *command: str) -> dict[str, object]:
    proc = cli.run("run", "start", "--env", env, "--json", "--", *command, check=False)
    return dict(json.loads(proc.stdout)) if proc.stdout.strip() else {"stderr": proc.stderr}


def test_workspace_modules_do_not_shadow_the_runtime(cli: Cli, workspace: Path) -> None:
    plant(workspace)
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    first = run(cli, "box", "true")  # restores the planted files into the checkout
    assert first.get("status") == "succeeded", first
    box = checkout(cli, "box")
    assert (box / "cli" / "__init__.py").exists() and (box / "json.py").exists()
    report = health(cli, "box")
    assert report["health"] == "ok", report
    second = run(cli, "box", "sh", "-c", "echo second run")  # the runtime starts among them
    assert second.get("status") == "succeeded", second
    assert not (box / CANARY).exists()
    assert not (workspace / CANARY).exists()


def test_negative_control_the_old_invocation_runs_the_planted_code(
    cli: Cli, workspace: Path
) -> None:
    plant(workspace)
    cli.run("init")
    cli.run("env", "create", "old", "--provider", "worktree", "--config", f"runtime={OLD_RUNTIME}")
    run(cli, "old", "true")
    box = checkout(cli, "old")
    report = health(cli, "old")
    assert report["health"] != "ok", report
    assert "cli/__init__.py" in (box / CANARY).read_text()


def test_health_names_a_shadowing_module(cli: Cli, workspace: Path) -> None:
    """Only ``json.py``: the old invocation still starts, but ``env health`` names the module
    the workspace replaced."""
    plant(workspace, ("json.py",))
    cli.run("init")
    cli.run("env", "create", "old", "--provider", "worktree", "--config", f"runtime={OLD_RUNTIME}")
    cli.run("env", "create", "new", "--provider", "worktree")
    run(cli, "old", "true")
    run(cli, "new", "true")
    report = health(cli, "old")
    assert report["health"] == "unreachable", report
    assert "json (" in report["detail"] and "shadow" in report["detail"], report
    assert health(cli, "new")["health"] == "ok"
