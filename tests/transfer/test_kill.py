"""kill -9 during export and import: no partial artifact is ever visible, the store stays sound."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Cli, git, kill_after
from transfer import verified


def _timed(run: Callable[[], object]) -> float:
    start = time.monotonic()
    run()
    return time.monotonic() - start


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
    # the kills land within how long each command takes on this machine (a fixed 0.05-0.6 s
    # let a fast machine finish most of them first: no kill, nothing tested)
    good = str(out / "good.bundle")
    export_time = _timed(lambda: cli.run("export", good))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    Cli(scratch).run("init")
    import_time = _timed(lambda: Cli(scratch).run("import", good))
    kills = 0
    for i in range(6):
        url = str(out / f"x{i}.bundle")
        delay = rng.uniform(0.05, 0.9) * export_time
        if kill_after(["export", url], src, delay) == -signal.SIGKILL:
            kills += 1
            # never a half-published artifact: either complete and verified, or nothing a reader
            # takes for one. A kill between the data's rename into place and its sidecar's
            # write leaves the data without the sidecar (unpublished to readers): it must then
            # be whole, as stock git checks by cloning it.
            if verified.exists(url):
                verified.verify(url)
            elif (out / f"x{i}.bundle").exists():
                git("clone", "-q", "--bare", url, str(tmp_path / f"check{i}.git"))
    for _ in range(4):
        delay = rng.uniform(0.05, 0.9) * import_time
        if kill_after(["import", good], dst, delay) == -signal.SIGKILL:
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
