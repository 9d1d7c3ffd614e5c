"""Long-running commands stop cleanly on SIGTERM from the moment they announce themselves."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from gateway.hub.server import hub_files
from narrative.store import Store
from tests.conftest import NARRATIVE, Cli, store_dir_of


@pytest.mark.parametrize("command", [["serve"], ["gateway", "serve"]])
def test_sigterm_right_after_the_ready_line_is_a_clean_stop(
    cli: Cli, workspace: Path, command: list[str]
) -> None:
    cli.run("init")
    for _ in range(4):  # the window was narrow: a few tries hit it every time
        proc = subprocess.Popen(
            [NARRATIVE, *command, "--port", "0", "--json"],
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        with proc.stdout:
            assert proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    store = Store.open(str(store_dir_of(workspace)))
    assert list(Path(hub_files(store)).glob("*.json")) == []  # the hub cleaned up after itself
