"""The snapshot walk's C lister (``narrative/_listing.c``): built wherever a C compiler is, and
indistinguishable from the ``os.scandir`` walk it replaces: the same names, stat keys and
failures for every directory, the same scan of any tree, and snapshots whose tree ids stock
git computes for the same workspace, whether the walk runs in one process or in forked workers.
"""

from __future__ import annotations

import json
import operator
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from narrative.scan import ScanResult, scan_workspace
from narrative.statcache import StatCache
from narrative.walker import NATIVE_LISTER
from tests.conftest import Cli, git_tree_of
from tests.properties import examples

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "narrative" / "_listing.c"
COMPILER = shlex.split(sysconfig.get_config_var("CC") or "cc")
HAVE_COMPILER = shutil.which(COMPILER[0]) is not None
LIMIT = 50 << 20
stat_key = operator.attrgetter("st_mtime_ns", "st_ctime_ns", "st_size", "st_ino", "st_mode")

needs_lister = pytest.mark.skipif(NATIVE_LISTER is None, reason="the C lister is not built")


def test_the_lister_is_built_wherever_a_compiler_is() -> None:
    if not HAVE_COMPILER:
        pytest.skip(f"no C compiler ({COMPILER[0]}): the walk uses os.scandir")
    assert os.environ.get("NARRATIVE_NATIVE_LISTER") != "0"
    assert NATIVE_LISTER is not None, "installed without narrative/_listing.c compiled"


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler")
def test_the_source_compiles_without_a_warning(tmp_path: Path) -> None:
    include = sysconfig.get_paths()["include"]
    argv = [*COMPILER, "-O2", "-fPIC", "-shared", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
    argv += [f"-I{include}", str(SOURCE), "-o", str(tmp_path / "listing.so")]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def _listed(directory: Path) -> tuple[list[str], list[Any], list[str], list[Any]]:
    assert NATIVE_LISTER is not None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return NATIVE_LISTER(fd)
    finally:
        os.close(fd)


@needs_lister
def test_names_keys_and_kinds_are_those_of_scandir_and_lstat(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "file.txt").write_text("x")
    (root / "sub").mkdir()
    (root / "link-to-sub").symlink_to("sub")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    odd = os.fsdecode(b"bad-\xff\xfe-utf8")
    (root / odd).write_bytes(b"undecodable name")
    (root / "exec.sh").write_text("#!/bin/sh\n")
    (root / "exec.sh").chmod(0o755)
    (root / "old").write_text("before 1970")
    os.utime(root / "old", (0, -86400.5))
    files, keys, subdirs, failed = _listed(root)
    with os.scandir(root) as it:
        entries = list(it)
    assert files == [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
    assert subdirs == [e.name for e in entries if e.is_dir(follow_symlinks=False)] == ["sub"]
    assert keys == [stat_key(os.lstat(root / name)) for name in files]
    assert odd in files and failed == []
    assert stat.S_ISLNK(keys[files.index("link-to-sub")][4])
    assert stat.S_ISFIFO(keys[files.index("fifo")][4])


@needs_lister
def test_a_timestamp_past_64_bit_nanoseconds_reads_as_lstat_gives_it(tmp_path: Path) -> None:
    """An agent may set any mtime; past 2262 the nanoseconds overflow a C int64, and the key
    must still be Python's exact value (a wrapped one would disagree with the cache)."""
    far = tmp_path / "far"
    far.write_text("from the future")
    os.utime(far, (0, 13_600_000_000.25))  # the year 2400 (ext4 keeps it; tmpfs may clamp)
    [name], [key], _, _ = _listed(tmp_path)
    assert name == "far"
    assert key == stat_key(os.lstat(far))
    if os.lstat(far).st_mtime_ns < 2**63:
        pytest.skip("this file system clamps timestamps: the overflow path was not reached")


@needs_lister
def test_a_descriptor_that_is_not_a_directory_is_an_oserror(tmp_path: Path) -> None:
    assert NATIVE_LISTER is not None
    path = tmp_path / "plain"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(NotADirectoryError):
            NATIVE_LISTER(fd)
    finally:
        os.close(fd)
    closed = os.open(tmp_path, os.O_RDONLY)
    os.close(closed)
    with pytest.raises(OSError):
        NATIVE_LISTER(closed)
    with pytest.raises(ValueError):
        NATIVE_LISTER(-1)


@needs_lister
def test_the_callers_descriptor_still_lists_from_the_top(tmp_path: Path) -> None:
    for i in range(300):  # more than one getdents buffer
        (tmp_path / f"f{i:03}").write_text("")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = NATIVE_LISTER(fd)  # type: ignore[misc]
        with os.scandir(fd) as it:
            again = sorted(e.name for e in it)
        assert sorted(first[0]) == again == sorted(NATIVE_LISTER(fd)[0])  # type: ignore[misc]
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- whole scans

NAMES = st.sampled_from(
    [
        "a", "b.txt", "src", "Makefile", ".hidden", "x y", "ünï", os.fsdecode(b"\xff\xfeodd"),
        ".git", ".gitignore", ".narrativeignore", ".GIT", "git~1", "build", "a.log",
    ]
)  # fmt: skip
KINDS = st.sampled_from(["file", "dir", "link-file", "link-dir", "fifo", "exec"])
IGNORES = st.sampled_from(["*.log\n", "build/\n", "!a.log\n*.log\n", "src\n", "x*\n"])


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """Entries (parent path, name, kind) of a small tree, parents before children."""
    entries: list[tuple[str, str, str]] = []
    dirs = [""]
    for _ in range(draw(st.integers(1, 30))):
        parent = draw(st.sampled_from(dirs))
        name, kind = draw(NAMES), draw(KINDS)
        if name in (".gitignore", ".narrativeignore"):
            kind = "ignore:" + draw(IGNORES)
        elif name == ".git":
            kind = "dir"
        path = f"{parent}/{name}" if parent else name
        if any((f"{p}/{n}" if p else n) == path for p, n, _ in entries):
            continue
        entries.append((parent, name, kind))
        if kind == "dir":
            dirs.append(path)
    return entries


def _build(root: Path, entries: list[tuple[str, str, str]]) -> None:
    for parent, name, kind in entries:
        path = root / parent / name if parent else root / name
        if kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "link-file":
            path.symlink_to("b.txt")
        elif kind == "link-dir":
            path.symlink_to("src")
        elif kind.startswith("ignore:"):
            path.write_text(kind.removeprefix("ignore:"))
        else:
            path.write_bytes(os.fsencode(f"{parent}/{name}\n"))
            if kind == "exec":
                path.chmod(0o755)


def _summary(result: ScanResult) -> Any:
    """Everything a snapshot takes from a scan, in a comparable form."""
    dirs = sorted(
        (d.rel, d.sig, sorted((n, k) for n, k, _ in d.files), sorted(c.rel for c in d.children))
        for d in result.dirs
    )
    jobs = sorted((j.rel, j.key, j.mode) for j in result.jobs)
    return dirs, jobs, result.skipped, result.listed


@needs_lister
@settings(max_examples=examples(60))
@given(entries=trees())
@example(  # plain names below the top: the lister's own path, with its order and signature
    entries=[
        ("", "src", "dir"),
        ("src", "a", "file"),
        ("src", "b.txt", "exec"),
        ("src", "Makefile", "fifo"),
    ]
)
def test_a_scan_through_the_lister_equals_the_scandir_scan(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[str, str, str]]
) -> None:
    root = tmp_path_factory.mktemp("tree")
    (root / ".narrative").mkdir()  # the store's marker: never captured
    _build(root, entries)
    scans = [
        scan_workspace(str(root), StatCache(max_file_size=LIMIT), set(), LIMIT, native=native)
        for native in (True, False)
    ]
    assert _summary(scans[0]) == _summary(scans[1])


@pytest.mark.parametrize("native", ["1", "0"], ids=["c-lister", "scandir"])
def test_snapshots_are_the_trees_git_computes_walked_by_forked_workers(
    tmp_path: Path, native: str
) -> None:
    """Enough directories that the second snapshot's walk is shared with forked workers."""
    if native == "1" and NATIVE_LISTER is None:
        pytest.skip("the C lister is not built")
    ws = tmp_path / "ws"
    for d in range(260):
        sub = ws / f"d{d % 13}" / f"e{d}"
        sub.mkdir(parents=True)
        (sub / "f.txt").write_text(f"{d}\n")
        if d % 50 == 0:
            (sub / "run.sh").write_text("#!/bin/sh\n")
            (sub / "run.sh").chmod(0o755)
            (sub / "link").symlink_to("f.txt")
    (ws / ".gitignore").write_text("*.log\n")
    (ws / "d1" / "skip.log").write_text("ignored\n")
    cli = Cli(ws)
    env = {"NARRATIVE_NATIVE_LISTER": native}
    cli.run("init", env=env)
    first = cli.json("snapshot", "-m", "first", env=env)
    assert first["tree"] == git_tree_of(ws, tmp_path)
    (ws / "d3" / "e3" / "f.txt").write_text("changed in place\n")
    (ws / "d4" / "new.txt").write_text("new\n")
    shutil.rmtree(ws / "d5" / "e5")
    second = cli.json("snapshot", "-m", "second", env=env)
    assert second["tree"] == git_tree_of(ws, tmp_path) != first["tree"]


_SCAN_BOTH_WAYS = """
import json, sys
from narrative.scan import scan_workspace
from narrative.statcache import StatCache
from tests.narrative.test_native_listing import LIMIT, _summary
out = []
for native in (True, False):
    cache = StatCache(max_file_size=LIMIT)
    out.append(_summary(scan_workspace(sys.argv[1], cache, set(), LIMIT, native=native)))
print(json.dumps(out))
"""


@needs_lister
@pytest.mark.parametrize("rules", [False, True], ids=["plain", "with-ignore-rules"])
def test_entries_that_cannot_be_stat_ed_are_reported_as_the_scandir_walk_does(
    rules: bool,
) -> None:
    """As a user who may list a directory but not look up its entries (read without search
    permission): every entry's lstat fails with EACCES, in C as through os.scandir."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the scan as another user")
    root = Path(tempfile.mkdtemp(prefix="narrative-listing-"))
    try:
        root.chmod(0o755)
        (root / ".narrative").mkdir()
        locked = root / "locked"
        (locked / "inner").mkdir(parents=True)
        (locked / "a.txt").write_text("a\n")
        (locked / "b.log").write_text("b\n")
        (locked / "link").symlink_to("a.txt")
        (root / "open.txt").write_text("open\n")
        if rules:
            (root / ".gitignore").write_text("*.log\n")
        locked.chmod(0o704)  # others: read (list) without search (lstat)
        done = subprocess.run(
            [*nobody, sys.executable, "-c", _SCAN_BOTH_WAYS, str(root)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 and "Permission denied" in done.stderr and "python" in done.stderr:
            pytest.skip(f"this interpreter cannot run as another user: {done.stderr[-300:]}")
        assert done.returncode == 0, done.stderr
        native, scandir = json.loads(done.stdout)
        assert native == scandir
        skipped = {item["path"]: item["reason"] for item in native[2]}
        expected = {"locked/a.txt", "locked/link", "locked/inner"}
        if not rules:
            expected.add("locked/b.log")  # ignored (by name) when the rule is in force
        assert set(skipped) == expected, skipped
        assert set(skipped.values()) == {"unreadable: Permission denied"}
    finally:
        (root / "locked").chmod(0o755)
        shutil.rmtree(root)
