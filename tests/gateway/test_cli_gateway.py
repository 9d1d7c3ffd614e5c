"""``narrative gateway`` through the real executable."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NARRATIVE, Cli, store_dir_of


@pytest.fixture
def ws_cli(cli: Cli) -> Cli:
    cli.run("init")
    return cli


def test_token_creates_the_key_in_the_store(ws_cli: Cli, workspace: Path) -> None:
    data = ws_cli.json("gateway", "token", "--run", "run-1", "--env", "sandbox", "--ttl", "15m")
    assert data["run"] == "run-1" and data["environment"] == "sandbox"
    key = store_dir_of(workspace) / "gateway.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    plain = ws_cli.run("gateway", "token", "--run", "run-1", "--env", "sandbox").stdout.strip()
    assert plain.startswith("ng2.") and plain != data["token"]
    bad = ws_cli.run("gateway", "token", "--run", "r", "--env", "e", "--ttl", "soon", check=False)
    assert bad.returncode == 2 and "--ttl" in bad.stderr
    bad = ws_cli.run("gateway", "token", "--run", "r r", "--env", "e", check=False)
    assert bad.returncode == 1 and "malformed run id" in bad.stderr


def test_token_needs_a_store_or_key_file(cli: Cli, tmp_path: Path) -> None:
    res = cli.run("gateway", "token", "--run", "r", "--env", "e", check=False)
    assert res.returncode == 1 and "narrative init" in res.stderr
    key = tmp_path / "k" / "gateway.key"
    cli.run("gateway", "token", "--run", "r", "--env", "e", "--key-file", str(key))
    assert key.exists()


def test_routes_explains(cli: Cli, workspace: Path) -> None:
    assert cli.json("gateway", "routes")["rules"] == [{"rule": "(default)", "mode": "local"}]
    (workspace / "proxyExecution.json").write_text(
        json.dumps(
            {
                "rules": {
                    "*": {"mode": "local"},
                    "fs": {"mode": "proxy", "environment": "sandbox"},
                    "fs:readFile": {"mode": "local"},
                }
            }
        )
    )
    rules = cli.json("gateway", "routes")["rules"]
    assert [r["rule"] for r in rules] == ["fs:readFile", "fs", "*", "(default)"]
    hit = cli.json("gateway", "routes", "fs", "writeFile")
    assert hit["rule"] == "fs" and hit["environment"] == "sandbox"
    assert cli.json("gateway", "routes", "fs", "readFile")["mode"] == "local"
    text = cli.run("gateway", "routes", "fs", "writeFile").stdout
    assert text.startswith("fs:writeFile -> fs") and "environment=sandbox" in text
    (workspace / "bad.json").write_text('{"rules": {"fs": {"mode": "proxy"}}}')
    res = cli.run("gateway", "routes", "--config", "bad.json", check=False)
    assert res.returncode == 1
    assert "bad.json" in res.stderr and "rules.fs" in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_and_call(ws_cli: Cli, workspace: Path) -> None:
    proc = subprocess.Popen(
        [NARRATIVE, "gateway", "serve", "--port", "0", "--json", "--env", "box"],
        cwd=workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["environment"] == "box" and ready["root"] == str(workspace.resolve())
        url = ready["url"]
        token = ws_cli.run("gateway", "token", "--run", "r", "--env", "agent").stdout.strip()
        env = {"NARRATIVE_TOKEN": token}
        got = ws_cli.json(
            "gateway",
            "call",
            "fs",
            "readFile",
            "--payload",
            '{"path": "README.md"}',
            "--url",
            url,
            env=env,
        )
        assert got["result"]["content"] == "# demo\n" and got["partials"] == []
        res = ws_cli.run(
            "gateway",
            "call",
            "exec",
            "run",
            "--payload",
            '{"argv": ["echo", "hi"]}',
            "--url",
            url,
            env=env,
        )
        assert json.loads(res.stdout)["exitCode"] == 0 and res.stderr == "hi\n"
        # the store and its key live outside the workspace: out of every caller's reach
        key = store_dir_of(workspace) / "gateway.key"
        res = ws_cli.run(
            "gateway",
            "call",
            "fs",
            "readFile",
            "--payload",
            json.dumps({"path": str(key)}),
            "--url",
            url,
            env=env,
            check=False,
        )
        assert res.returncode == 1 and "absolute path" in res.stderr
        res = ws_cli.run("gateway", "call", "gateway", "echo", "--url", url, check=False)
        assert res.returncode == 2 and "no token" in res.stderr
        res = ws_cli.run(
            "gateway",
            "call",
            "gateway",
            "echo",
            "--url",
            url,
            "--token",
            token[:-4] + "AAAA",
            check=False,
        )
        assert res.returncode == 1 and "refused the token" in res.stderr
        res = ws_cli.run(
            "gateway",
            "call",
            "gateway",
            "echo",
            "--url",
            url,
            "--payload",
            "[1]",
            env=env,
            check=False,
        )
        assert res.returncode == 2
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        for s in (proc.stdout, proc.stderr):
            if s is not None:
                s.close()
    # the port is free again, and a taken port is a clear error
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        res = ws_cli.run("gateway", "serve", "--port", str(port), check=False)
        assert res.returncode == 1 and "cannot listen" in res.stderr


def test_serve_tls_and_call_with_cafile(
    ws_cli: Cli, workspace: Path, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    proc = subprocess.Popen(
        [NARRATIVE, "gateway", "serve", "--port", "0", "--json", "--env", "box",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        cwd=workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        assert url.startswith("wss://127.0.0.1:")
        token = ws_cli.run("gateway", "token", "--run", "r", "--env", "agent").stdout.strip()
        got = ws_cli.json(
            "gateway", "call", "gateway", "echo", "--payload", '{"tls": true}',
            "--url", url, "--token", token, "--cafile", str(cert),
        )  # fmt: skip
        assert got["result"] == {"tls": True}
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    res = ws_cli.run("gateway", "serve", "--tls-cert", str(cert), check=False)
    assert res.returncode == 2 and "go together" in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--env", "no spaces"],
        ["--run", "../x"],
        ["--capability", "a b"],
        ["--tls-cert", "README.md", "--tls-key", "README.md"],
    ],
)
def test_serve_refuses_bad_options_in_one_line(ws_cli: Cli, args: list[str]) -> None:
    res = ws_cli.run("gateway", "serve", "--port", "0", *args, check=False)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("narrative: error:") and "Traceback" not in res.stderr
