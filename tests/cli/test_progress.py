"""Progress on a terminal (issue 14 item 3): a long snapshot, restore, push and pull show what
they do (files scanned, bytes hashed, files restored, bytes sent and received, with rate and
ETA) on stderr when it is a terminal, and nothing with --json, -q or when piped."""

from __future__ import annotations

import os
import pty
import select
import subprocess
from pathlib import Path

from tests.conftest import NARRATIVE, Cli


def _on_a_terminal(cwd: Path, *args: str) -> tuple[int, str, str]:
    """Run narrative with stderr on a pseudo-terminal; its exit code, stdout and terminal."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [NARRATIVE, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    poller = select.poll()  # not select(): the suite's file descriptors may be past 1024
    poller.register(leader, select.POLLIN)
    while True:
        if not poller.poll(60_000):
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        seen += chunk
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read().decode()
    code = proc.wait(timeout=60)
    os.close(leader)
    return code, out, seen.decode(errors="replace")


def _big_workspace(ws: Path) -> None:
    for i in range(400):
        directory = ws / f"d{i % 20}"
        directory.mkdir(exist_ok=True)
        (directory / f"f{i}.bin").write_bytes(os.urandom(64 << 10))


def test_long_operations_show_progress_on_a_terminal(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    _big_workspace(workspace)
    code, out, terminal = _on_a_terminal(workspace, "snapshot", "-m", "big")
    assert code == 0 and out.startswith("snap-"), terminal
    assert "hashing" in terminal and "MB" in terminal
    remote = tmp_path / "remote"
    remote.mkdir()
    cli.run("remote", "add", "origin", str(remote))
    code, _out, terminal = _on_a_terminal(workspace, "push", "origin")
    assert code == 0 and "sending" in terminal
    for path in list(workspace.glob("d1*")):
        for f in path.iterdir():
            f.unlink()
    code, _out, terminal = _on_a_terminal(workspace, "restore", "main")
    assert code == 0 and "restoring" in terminal and "files" in terminal
    other = tmp_path / "other"
    other.mkdir()
    Cli(other).run("init")
    Cli(other).run("remote", "add", "origin", str(remote))
    code, _out, terminal = _on_a_terminal(other, "pull", "origin")
    assert code == 0 and "receiving" in terminal


def test_no_progress_with_json_quiet_or_a_pipe(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    _big_workspace(workspace)
    code, out, terminal = _on_a_terminal(workspace, "snapshot", "--json")
    assert code == 0 and out.lstrip().startswith("{") and "hashing" not in terminal
    (workspace / "new.bin").write_bytes(os.urandom(1 << 20))
    code, _out, terminal = _on_a_terminal(workspace, "snapshot", "-m", "q", "-q")
    assert code == 0 and "hashing" not in terminal
    (workspace / "newer.bin").write_bytes(os.urandom(1 << 20))
    piped = cli.run("snapshot", "-m", "piped")
    assert "hashing" not in piped.stderr
