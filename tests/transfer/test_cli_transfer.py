"""The transfer commands end to end, as separate processes talking to a local S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli


def _opts(s3_options: dict[str, Any]) -> list[str]:
    return [
        "--storage-option", f"key={s3_options['key']}",
        "--storage-option", f"secret={s3_options['secret']}",
        "--storage-option",
        f"client_kwargs.endpoint_url={s3_options['client_kwargs']['endpoint_url']}",
    ]  # fmt: skip


@pytest.mark.long  # several seconds: make test stays under ten minutes
@pytest.mark.heavy
def test_export_import_and_remotes_over_s3(
    s3_bucket: str, s3_options: dict[str, Any], workspace: Path, tmp_path: Path
) -> None:
    a = Cli(workspace)
    a.run("init")
    snap = a.json("snapshot", "-m", "over s3")
    url = f"{s3_bucket}/exports/a.bundle"
    exported = a.json("export", url, *_opts(s3_options))
    assert exported["sha256"] and exported["size"] > 0
    ws_b = tmp_path / "b"
    ws_b.mkdir()
    b = Cli(ws_b)
    b.run("init")
    imported = b.json("import", url, *_opts(s3_options))
    assert imported["updated"] == {snap["thread"]: snap["commit"]}
    assert b.json("show", snap["id"])["tree"] == snap["tree"]
    # storage options from the environment work as well as flags
    env = {
        "NARRATIVE_STORAGE_KEY": "testing",
        "NARRATIVE_STORAGE_SECRET": "testing",
        "NARRATIVE_STORAGE_CLIENT_KWARGS__ENDPOINT_URL": s3_options["client_kwargs"][
            "endpoint_url"
        ],
    }
    again = b.json("import", url, env=env)
    assert again["updated"] == {} and again["unchanged"] == [snap["thread"]]
    # remotes
    a.run("remote", "add", "origin", f"{s3_bucket}/remote", *_opts(s3_options))
    assert [r["name"] for r in a.items("remote", "list")] == ["origin"]
    pushed = a.json("push", "origin")
    assert pushed["pushed"] == {snap["thread"]: snap["commit"]}
    (workspace / "more.txt").write_text("more\n")
    second = a.json("snapshot")
    a.json("push", "origin")
    b.run("remote", "add", "origin", f"{s3_bucket}/remote", *_opts(s3_options))
    b.json("pull", "origin")
    assert b.items("log", "--thread", snap["thread"], "-n", "1")[0]["id"] == second["id"]
    # piped output: no progress bar noise, one JSON document
    empty = b.run("export", str(tmp_path / "y.tar.zst"), "--format", "tar.zst", check=False)
    assert empty.returncode == 1 and "has no snapshots" in empty.stderr
    proc = b.run(
        "export",
        str(tmp_path / "x.tar.zst"),
        "--format",
        "tar.zst",
        "--snapshot",
        second["id"],
        "--json",
    )
    assert proc.stderr == ""
    bad = b.run("import", f"{s3_bucket}/nothing-here.bundle", *_opts(s3_options), check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
