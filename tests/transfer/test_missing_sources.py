"""A missing source is an error, never "nothing new" (issue 12 bug 5).

``fetch``/``pull`` of a remote whose directory or bucket does not exist, and ``import`` of a
URL with nothing there, exit 1 with one line naming the URL; the store is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli


def _store_files(cli: Cli) -> dict[str, bytes]:
    info = cli.json("info")
    root = Path(info["store"])
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cache" not in p.parts and not p.name.endswith(".lock")
    }


@pytest.mark.parametrize("command", ["fetch", "pull"])
def test_fetch_or_pull_of_a_missing_directory_fails(cli: Cli, tmp_path: Path, command: str) -> None:
    cli.run("init")
    cli.run("snapshot", "-m", "base")
    missing = tmp_path / "no" / "such" / "remote"
    cli.run("remote", "add", "origin", str(missing))
    before = _store_files(cli)
    proc = cli.run(command, "origin", check=False)
    assert proc.returncode == 1, proc.stdout
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _store_files(cli) == before


def test_fetch_of_an_existing_empty_remote_is_fine(cli: Cli, tmp_path: Path) -> None:
    cli.run("init")
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    cli.run("remote", "add", "origin", str(empty))
    cli.run("fetch", "origin")


def test_import_of_missing_urls_fails(cli: Cli, tmp_path: Path) -> None:
    cli.run("init")
    before = _store_files(cli)
    for url in (str(tmp_path / "nothing.bundle"), "memory://no-such-place/x.bundle"):
        proc = cli.run("import", url, check=False)
        assert proc.returncode == 1 and url in proc.stderr, proc.stderr
    assert _store_files(cli) == before


@pytest.mark.heavy
def test_s3_missing_bucket_fails_for_fetch_pull_and_import(
    cli: Cli, s3_options: dict[str, Any]
) -> None:
    cli.run("init")
    cli.run("snapshot", "-m", "base")
    endpoint = s3_options["client_kwargs"]["endpoint_url"]
    opts = ["--storage-option", f"client_kwargs.endpoint_url={endpoint}"]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    cli.run("remote", "add", "origin", "s3://no-such-bucket-here/narr", *opts, env=env)
    before = _store_files(cli)
    for args in (
        ["fetch", "origin"],
        ["pull", "origin"],
        ["import", "s3://no-such-bucket-here/x.bundle", *opts],
    ):
        proc = cli.run(*args, check=False, env=env)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "no-such-bucket-here" in proc.stderr and "Traceback" not in proc.stderr
    assert _store_files(cli) == before
    assert json.loads(cli.run("remote", "list", "--json").stdout)["items"]
