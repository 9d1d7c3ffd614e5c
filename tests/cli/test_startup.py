"""CLI start-up stays light: the everyday read-only commands load none of the heavy libraries
that only some commands need (fsspec and asyncio for transfers and hubs, websockets, pydantic
for providers, rich for progress, dulwich and pygit2 for packs). bench/ measures the time;
this catches the import that would quietly add a tenth of a second to every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli

HEAVY = ("fsspec", "asyncio", "websockets", "pydantic", "rich", "dulwich", "pygit2", "s3fs")

_PROBE = """
import json, sys
sys.argv = ["narrative", *json.loads(sys.argv[1])]
from cli.main import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["info"], ["status"], ["log"], ["--help"]], ids=" ".join)
def test_everyday_commands_load_no_heavy_library(
    cli: Cli, workspace: Path, args: list[str]
) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("snapshot", "-m", "one")
    probe = _PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(args)],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert loaded == [], f"narrative {' '.join(args)} imported {loaded}"


def test_a_runtime_loads_no_team_client() -> None:
    """Every run starts a runtime in its environment (fifty pods at once on a fan-out): only a
    runtime that delegates its agent to another hub needs the team client (~50 ms)."""
    code = "import sys, cli.main, gateway.hub.runtime; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gateway.hub.team_client" not in done.stdout
