"""Racing pushers never lose a push (issue 12 clarification): four ``narrative push``
processes from four stores hit one remote at the same moment (a local directory and moto's S3);
every push lands in the remote's index, and stock git takes every published bundle."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NARRATIVE, Cli, git
from transfer import verified


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_four_concurrent_pushers_lose_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    options: dict[str, Any] = {}
    env: dict[str, str] = {}
    if kind == "local":
        url = str(tmp_path / "remote")
        os.mkdir(url)
    else:
        options = request.getfixturevalue("s3_options")
        url = "s3://narrative-test/racing"
        endpoint = options["client_kwargs"]["endpoint_url"]
        env = {
            "NARRATIVE_STORAGE_CLIENT_KWARGS__ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
    heads: dict[str, str] = {}
    clis = []
    for i in range(4):
        ws = tmp_path / f"m{i}"
        ws.mkdir()
        cli = Cli(ws)
        cli.run("init")
        for round_no in range(2):
            (ws / "work.txt").write_text(f"machine {i} round {round_no}\n")
            snap = cli.json("snapshot")
        heads[f"refs/narrative/threads/{snap['thread']}"] = snap["commit"]
        cli.run("remote", "add", "origin", url, env=env)
        clis.append(cli)
    procs = [
        subprocess.Popen(
            [NARRATIVE, "push", "origin"],
            cwd=cli.cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cli in clis
    ]
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _out, _err in outcomes), outcomes
    index = json.loads(verified.read_small(f"{url}/index.json", options))
    for ref, commit in heads.items():
        assert index["heads"][ref] == commit  # every push is in the index
    # stock git takes every published bundle, and together they hold every thread
    receiver = tmp_path / "receiver.git"
    git("init", "-q", "--bare", str(receiver))
    for entry in index["bundles"]:
        local = tmp_path / entry["name"]
        local.write_bytes(
            verified.read_small(f"{url}/bundles/{entry['name']}", options, limit=1 << 30)
        )
        git("--git-dir", str(receiver), "bundle", "verify", str(local))
        git(
            "--git-dir",
            str(receiver),
            "fetch",
            "-q",
            str(local),
            "refs/narrative/threads/*:refs/t/*",
        )
    git("--git-dir", str(receiver), "fsck", "--strict", "--no-dangling")
    for ref, commit in heads.items():
        got = git("--git-dir", str(receiver), "rev-parse", "refs/t/" + ref.rsplit("/", 1)[1])
        assert got.strip() == commit
