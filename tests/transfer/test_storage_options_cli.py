"""Storage options from the shell (issue 14 item 2): remotes keep and list their options with
credentials as ``***``, an option the backend does not know and an endpoint nothing answers at
are one named error each (exit 1, fast), and --help says how options are written."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import Cli


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_remote_list_shows_options_but_never_credentials(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    added = cli.run(
        "remote", "add", "origin", "s3://bucket/team",
        "--storage-option", "client_kwargs.endpoint_url=http://127.0.0.1:9000",
        "--storage-option", "secret=hunter2",
        "--storage-option", "client_kwargs.aws_session_token=t0k3n-value",
        "--json",
    )  # fmt: skip
    assert "plain text" in added.stderr and "hunter2" not in added.stdout + added.stderr
    [listed] = cli.items("remote", "list")
    assert listed["storage_options"] == {
        "client_kwargs.endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs.aws_session_token": "***",
        "secret": "***",
    }
    human = cli.run("remote", "list").stdout
    assert "client_kwargs.endpoint_url=http://127.0.0.1:9000" in human
    assert "hunter2" not in human and "t0k3n-value" not in human


@pytest.mark.long  # ~14 s: it waits out the client's retries against a closed port
def test_an_unknown_option_and_an_unreachable_endpoint_are_named(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("snapshot", "-m", "a")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cli.run(
        "remote", "add", "origin", "s3://bucket/team",
        "--storage-option", f"client_kwargs.endpoint_url={endpoint}",
    )  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    bad = cli.run("push", "origin", "--storage-option", "retriez=2", env=env, check=False)
    assert bad.returncode == 1 and "'retriez'" in bad.stderr and "Traceback" not in bad.stderr
    started = time.monotonic()
    proc = cli.run("push", "origin", "--json", env=env, check=False)
    assert time.monotonic() - started < 30
    error = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and endpoint in error["message"]
    assert "endpoint_url" in error["message"]


def test_help_explains_how_options_are_written(cli: Cli) -> None:
    for command in (["push"], ["pull"], ["fetch"], ["export"], ["import"], ["remote", "add"]):
        text = "".join(cli.run(*command, "--help").stdout.split())  # wrapping splits words
        assert "client_kwargs.endpoint_url=" in text and "NARRATIVE_STORAGE_" in text, command
