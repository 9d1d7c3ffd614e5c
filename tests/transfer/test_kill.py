"""kill -9 during export and import: no partial artifact is ever visible, the store stays sound."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.conftest import Cli, Killer, git
from transfer import verified


def _populate(ws: Path, files: int) -> None:
    rng = random.Random(3)
    for i in range(files):
        d = ws / f"d{i % 41}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(2000, 40000)))


@pytest.mark.long  # several seconds: make test stays under ten minutes
@pytest.mark.slow
def test_kill_during_export_and_import(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.mkdir()
    _populate(src, 2500)
    cli = Cli(src)
    cli.run("init")
    cli.run("snapshot")
    dst = tmp_path / "b"
    dst.mkdir()
    other = Cli(dst)
    store = other.json("init")["store"]
    rng = random.Random(11)
    out = tmp_path / "out"
    out.mkdir()
    kills = 0
    exports = Killer(rng, guess=0.6)
    for i in range(6):
        url = str(out / f"x{i}.bundle")
        if exports.kill(["export", url], src) == -signal.SIGKILL:
            kills += 1
            # never a half-published artifact: either complete and verified, or nothing a reader
            # takes for one. A kill between the data's rename into place and its sidecar's
            # write leaves the data without the sidecar (unpublished to readers): it must then
            # be whole, as stock git checks by cloning it.
            if verified.exists(url):
                verified.verify(url)
            elif (out / f"x{i}.bundle").exists():
                git("clone", "-q", "--bare", url, str(tmp_path / f"check{i}.git"))
    good = str(out / "good.bundle")
    cli.run("export", good)
    imports = Killer(rng, guess=0.6)
    for _ in range(4):
        if imports.kill(["import", good], dst) == -signal.SIGKILL:
            kills += 1
        git("--git-dir", store, "fsck", "--strict", "--no-dangling", "--connectivity-only")
        for oid in git("--git-dir", store, "for-each-ref", "--format=%(objectname)").split():
            assert git("--git-dir", store, "cat-file", "-t", oid).strip() == "commit"
    assert kills >= 3, "the kills must interrupt real work for this test to mean anything"
    result = other.json("import", good)
    assert result["format"] == "bundle"
    git("--git-dir", store, "fsck", "--strict", "--no-dangling")
    head = cli.items("log", "-n", "1")[0]
    assert other.json("show", head["id"])["tree"] == head["tree"]
