"""A snapshot built straight from an environment's tar (:mod:`providers.tar_snapshot`) against
the extract-then-snapshot path it replaced (``snapshot_from_tar(..., extract=True)``, the
oracle): the same tree id, stats and refusals on random workspaces (nested and empty
directories, exec bits, symlinks, ignore files at any depth, members in any order) and on
random hostile tars; stock ``git fsck --strict`` on every store."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narrative.commitmsg import snapshot_from_commit
from narrative.commits import read_commit
from narrative.errors import InvalidInput
from narrative.hierarchy import create_thread
from narrative.models import Snapshot
from narrative.objects import hash_object
from narrative.store import Store
from providers import tar_snapshot
from providers.shipping import scratch_dir, snapshot_from_tar
from tests.conftest import git
from tests.properties import examples
from tests.providers.test_tar_intake import build, member

DIRS = ["", "a", "a/b", "a/b/c", "build", "sub"]
FILES = ["x.txt", "y.log", "keep.log", "run.sh", "e", "Case", "case", ".env"]
PATTERNS = ["*.log", "!keep.log", "build/", "/e", "b", "c/", "x.*", "*", "!*.txt", "sub/*", "# c"]
TARGETS = ["x.txt", "../e", "/etc/passwd", "missing", "b", ".."]


def _snap(store: Store, snapshot: Snapshot) -> Snapshot:
    """The snapshot with its parsed stats, as ``snapshot_from_commit`` reads them back."""
    oid = bytes.fromhex(snapshot.commit)
    return snapshot_from_commit(oid, read_commit(store, oid), None)


def both_ways(store: Store, data: bytes, strip: str = "work/") -> list[object]:
    """The outcome of each path on ``data``: (tree, stats, skipped paths), or the error type."""
    outcomes: list[object] = []
    for extract in (False, True):  # streamed first: it writes the new objects
        thread = create_thread(store, store.config.default_objective, f"t{extract}").id
        scratch = scratch_dir(store, "env-test")
        try:
            snap = snapshot_from_tar(
                store, io.BytesIO(data), scratch, thread, None, "m", strip, extract=extract
            )
        except (InvalidInput, OSError) as exc:
            outcomes.append(type(exc))
            continue
        finally:
            assert not Path(scratch).exists()
        full = _snap(store, snap)
        skipped = sorted(s["path"] for s in full.skipped)
        outcomes.append((snap.tree, full.stats, skipped))
    return outcomes


def _workspace_tar(draw: st.DrawFn) -> bytes:
    """A random workspace as ``docker get_archive`` sends it: members under ``work/``."""
    members: dict[str, tuple[str, object]] = {}
    for directory in draw(st.lists(st.sampled_from(DIRS), max_size=5)):
        for depth in range(1, len(directory.split("/")) + 1 if directory else 0):
            members.setdefault(
                "/".join(directory.split("/")[:depth]), ("dir", None)
            )  # parents first
    dirs = ["", *[m for m, (k, _) in members.items() if k == "dir"]]
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(dirs))
        name = draw(st.sampled_from([*FILES, ".gitignore", ".narrativeignore"]))
        path = f"{parent}/{name}" if parent else name
        if path in members:
            continue
        if name in (".gitignore", ".narrativeignore"):
            lines = draw(st.lists(st.sampled_from(PATTERNS), max_size=4))
            members[path] = ("file", ("\n".join(lines) + "\n").encode(), False)
        elif draw(st.integers(0, 4)) == 0:
            members[path] = ("sym", draw(st.sampled_from(TARGETS)))
        else:
            body = draw(st.binary(max_size=64))
            members[path] = ("file", body, draw(st.booleans()))
    order = list(members)
    draw(st.randoms(use_true_random=False)).shuffle(order)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir_info("work"))
        for path in order:
            kind, *rest = members[path]
            if kind == "dir":
                tar.addfile(_dir_info("work/" + path))
            elif kind == "sym":
                info = tarfile.TarInfo("work/" + path)
                info.type, info.linkname = tarfile.SYMTYPE, str(rest[0])
                tar.addfile(info)
            else:
                body, exe = rest
                assert isinstance(body, bytes)
                info = tarfile.TarInfo("work/" + path)
                info.size, info.mode = len(body), 0o755 if exe else 0o644
                tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


workspace_tars = st.composite(_workspace_tar)


@settings(max_examples=examples(150), deadline=None)
@given(
    data=workspace_tars(),
    cap=st.sampled_from([1 << 20, 16]),
    members=st.sampled_from([tar_snapshot.MAX_MEMBERS, 3, 1]),
)
def test_random_workspaces_give_the_same_tree_both_ways(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, cap: int, members: int
) -> None:
    """Also with few members kept in memory: the rest extracted, the first ones written out
    (files over the size cap as sparse files of their size)."""
    store = Store.init(str(tmp_path_factory.mktemp("ws")))
    store.config = store.config.replace(max_file_size=cap)  # some files too large
    with mock.patch.object(tar_snapshot, "MAX_MEMBERS", members):
        streamed, extracted = both_ways(store, data)
    assert isinstance(extracted, tuple), extracted
    assert streamed == extracted
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")


@settings(max_examples=examples(300), deadline=None)
@given(members=st.lists(member, min_size=1, max_size=6))
def test_random_hostile_tars_give_the_same_outcome_both_ways(
    tmp_path_factory: pytest.TempPathFactory, members: list[tuple[str, str, str]]
) -> None:
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    (base / "ws").mkdir()
    store = Store.init(str(base / "ws"))
    streamed, extracted = both_ways(store, build(members, outside), strip="")
    assert list(outside.iterdir()) == [], "something was written outside"
    if isinstance(extracted, tuple):
        assert streamed == extracted
    else:  # refused (or failed in the file system): so is it from the stream
        assert not isinstance(streamed, tuple)
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = str(payload)
                tar.addfile(info)
            elif kind in ("dir", "fifo"):
                info.type = tarfile.DIRTYPE if kind == "dir" else tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                body = payload if isinstance(payload, bytes) else payload.encode()
                info.size, info.mode = len(body), 0o755 if kind == "exe" else 0o644
                tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


CASES = {
    "duplicate-file": [("a", "file", b"1"), ("a", "exe", b"2")],
    "file-then-dir": [("a", "file", b"1"), ("a", "dir", "")],
    "dir-then-file": [("a/x", "file", b"1"), ("a", "file", b"2")],
    "link-then-file": [("a", "sym", "b"), ("b", "dir", ""), ("a/x", "file", b"1")],
    "file-then-link": [("a", "file", b"1"), ("a", "sym", "/etc")],
    "case-and-nfc": [
        ("Aa", "file", b"1"),
        ("aA", "file", b"2"),
        ("é", "file", b"3"),
        ("e\u0301", "file", b"4"),
    ],
    "dotgit-and-exclude": [
        ("r/.git/info/exclude", "file", b"*.o\n"),
        ("r/m.o", "file", b"1"),
        ("r/m.c", "file", b"2"),
    ],
    "unsafe-names": [
        (".GIT/config", "file", b"1"),
        ("git~1", "file", b"2"),
        (".narrative", "file", b"3"),
        ("ok", "file", b"4"),
    ],
    "our-temp-name": [(".narrative-tmp-abc", "file", b"1"), ("ok", "file", b"2")],
    "hardlink-inside": [("a", "file", b"1"), ("b", "hard", "a")],
    "hardlink-out": [("b", "hard", "/etc/passwd")],
    "fifo": [("ok", "file", b"1"), ("p", "fifo", "")],
    "dotdot": [("ok", "file", b"1"), ("a/../../x", "file", b"1")],
    "absolute": [("/x", "file", b"1")],
    "ignore-after-files": [
        ("d/y.log", "file", b"1"),
        ("d/z", "file", b"2"),
        (".gitignore", "file", b"*.log\n!d/keep.log\n"),
        ("d/keep.log", "file", b"3"),
    ],
    "ignore-file-is-a-link": [
        ("t", "file", b"*\n"),
        (".gitignore", "sym", "t"),
        ("x", "file", b"1"),
    ],
    "ignore-file-is-a-dir": [(".narrativeignore/x", "file", b"1")],
    "empty-link-target": [("l", "sym", "")],
    "only-dot": [(".", "dir", ""), ("./a", "file", b"1")],
}


@pytest.mark.parametrize("members", CASES.values(), ids=CASES.keys())
def test_crafted_tars_give_the_same_outcome_both_ways(
    store: Store, members: list[tuple[str, str, bytes | str]]
) -> None:
    streamed, extracted = both_ways(store, _tar(*members), strip="")
    assert streamed == extracted
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")


def test_an_ignored_file_never_reaches_the_store(store: Store) -> None:
    secret = random.Random(7).randbytes(40)
    data = _tar(
        ("x.env", "file", secret), ("x.txt", "file", b"kept"), (".gitignore", "file", "*.env")
    )
    thread = create_thread(store, store.config.default_objective, "t").id
    snapshot_from_tar(store, io.BytesIO(data), scratch_dir(store, "e"), thread, None, "m")
    listed = git("--git-dir", store.git_dir, "cat-file", "--batch-all-objects", "--batch-check")
    assert hash_object("blob", secret).hex() not in listed
    assert hash_object("blob", b"kept").hex() in listed


def test_a_large_file_streams_through_and_dedupes(store: Store) -> None:
    big = random.Random(3).randbytes(9 << 20)  # over the in-memory threshold
    data = _tar(("big", "file", big), ("copy", "file", big), ("small", "file", b"s"))
    with mock.patch.object(tar_snapshot, "_SPOOL_IN_MEMORY", 1 << 20):  # the spool on disk
        streamed, extracted = both_ways(store, data, strip="")
    assert streamed == extracted
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")


def test_past_the_member_cap_what_was_taken_is_written_out_exactly(store: Store) -> None:
    """The members taken before the cap are written to disk for the extractor: contents, exec
    bits, links, and a file over the size cap as a file of its size (reported, not stored)."""
    store.config = store.config.replace(max_file_size=16)
    data = _tar(
        ("big", "file", b"x" * 40),
        ("run.sh", "exe", b"#!/bin/sh\n"),
        ("d/l", "sym", "../big"),
        ("d/e", "file", b"e"),
        ("z", "file", b"z"),
    )
    with mock.patch.object(tar_snapshot, "MAX_MEMBERS", 3):
        streamed, extracted = both_ways(store, data, strip="")
    assert streamed == extracted
    assert isinstance(streamed, tuple) and streamed[2] == ["big"]
