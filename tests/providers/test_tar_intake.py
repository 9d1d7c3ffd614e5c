"""The fast extraction of an environment's tar (:mod:`providers.tar_intake`) against Python's
``data`` filter extracting every member (what it replaced, kept here as the oracle): on random
tars of files, directories, symbolic and hard links over a few names, with link targets inside
and outside, both refuse the same tars, write nothing outside, and leave the same tree (paths,
kinds, contents, exec bits, link targets)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from narrative.errors import InvalidInput
from providers.tar_intake import extract_tar
from tests.properties import examples

NAMES = [
    "a",
    "b",
    "a/x",
    "b/x",
    "a/x/y",
    "b/y",
    "sub",
    "sub/x",
    "sub/x/evil",
    ".git/config",
    "a/.git",
]


def oracle(data: bytes, scratch: str) -> None:
    """Every member through the ``data`` filter; symlinks placed as data, as before."""
    root = os.path.realpath(scratch)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for member in tar:
            if member.issym():
                parent = os.path.realpath(os.path.join(root, os.path.dirname(member.name)))
                if parent != root and not parent.startswith(root + os.sep):
                    raise InvalidInput("escapes")
                os.makedirs(parent, exist_ok=True)
                dest = os.path.join(parent, os.path.basename(member.name))
                if os.path.isdir(dest) and not os.path.islink(dest):
                    raise InvalidInput("is a directory")
                if os.path.lexists(dest):
                    os.unlink(dest)
                os.symlink(member.linkname, dest)
                continue
            if member.islnk() and (
                not os.path.isfile(source := os.path.join(root, member.linkname))
                or os.path.islink(source)
                or os.path.lexists(os.path.join(root, member.name))
            ):
                # our one rule over the data filter: a hard link only to a file (not a link to
                # one) made before it, at a name not taken (tarfile would otherwise copy another
                # member there, or give up silently, by the names as read, not as stripped)
                raise InvalidInput("not a file")
            try:
                tar.extract(member, root, filter="data")
            except tarfile.FilterError as exc:
                raise InvalidInput(str(exc)) from None


def listing(root: Path) -> dict[str, tuple[str, object]]:
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (path.read_bytes(), bool(st_.st_mode & 0o100)))
    return out


def build(members: list[tuple[str, str, str]], outside: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, arg in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                body = arg.encode()
                info.size, info.mode = len(body), 0o4755 if "x" in arg else 0o644
                tar.addfile(info, io.BytesIO(body))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = str(outside) if arg == "out" else arg
            else:
                info.type, info.linkname = tarfile.LNKTYPE, arg
            tar.addfile(info)
    return out.getvalue()


member = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from(["file", "dir", "sym", "hard"]),
    st.sampled_from(["out", "sub", "a", "b", "../..", "x body", "body"]),
)


def run(extract, data: bytes, scratch: Path):
    scratch.mkdir()
    try:
        extract(data, str(scratch))
    except (InvalidInput, OSError, KeyError, tarfile.TarError) as exc:
        return type(exc)
    return listing(scratch)


@settings(max_examples=examples(300), deadline=None)
@given(members=st.lists(member, min_size=1, max_size=6))
@example(members=[("a", "file", "x body"), ("b", "hard", "a")])  # the link's mode on both names
@example(members=[("a", "dir", ""), ("b", "hard", "a")])  # a directory is never linked
@example(members=[("a", "file", "body"), ("b", "sym", "a"), ("sub", "hard", "b")])
@example(members=[("a", "file", "body"), ("a/x", "hard", "a")])  # a file on the way
def test_same_tree_as_the_data_filter(tmp_path_factory: pytest.TempPathFactory, members) -> None:
    base = tmp_path_factory.mktemp("intake")
    outside = base / "outside"
    outside.mkdir()
    data = build(members, outside)
    ours = run(lambda d, s: extract_tar(io.BytesIO(d), s, "", 1 << 20), data, base / "ours")
    theirs = run(oracle, data, base / "theirs")
    assert list(outside.iterdir()) == [], "something was written outside"
    if isinstance(theirs, dict):
        assert ours == theirs
    else:  # the data filter refused: so do we (or the file system did, in both)
        assert not isinstance(ours, dict) and issubclass(ours, (InvalidInput, OSError))


def test_a_file_through_a_link_made_under_a_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    data = build(
        [
            ("sub", "dir", ""),
            ("a", "sym", "sub"),
            ("a/x", "sym", "out"),
            ("sub/x/evil", "file", ""),
        ],
        outside,
    )
    with pytest.raises(InvalidInput):
        extract_tar(io.BytesIO(data), str(scratch), "", 1 << 20)
    assert list(outside.iterdir()) == []


def test_a_broken_tar_or_a_hard_link_to_nothing_is_one_clear_error(tmp_path: Path) -> None:
    dangling = build([("a", "hard", "nowhere")], tmp_path)
    for data in (dangling, b"not a tar at all" * 64):
        with pytest.raises(InvalidInput, match="refused the environment tar"):
            extract_tar(io.BytesIO(data), str(tmp_path), "", 1 << 20)


def test_only_the_exec_bit_is_kept(tmp_path: Path) -> None:
    data = build([("run.sh", "file", "x body"), ("plain", "file", "body")], tmp_path)
    (tmp_path / "s").mkdir()
    extract_tar(io.BytesIO(data), str(tmp_path / "s"), "", 1 << 20)
    assert stat.S_IMODE((tmp_path / "s" / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "s" / "plain").stat().st_mode) == 0o644


@settings(max_examples=examples(150), deadline=None)
@given(members=st.lists(member, min_size=1, max_size=6))
@example(members=[("a", "file", "body"), ("sub", "dir", ""), ("sub/x", "hard", "a")])
@example(members=[("a", "dir", "out"), ("b", "hard", "a")])  # found by hypothesis in CI
@example(members=[("a", "file", "out"), ("a", "hard", "a")])
def test_a_stripped_prefix_is_stripped_from_every_name_a_member_carries(
    tmp_path_factory: pytest.TempPathFactory, members
) -> None:
    """A tar whose names (and hard links' targets, as the Docker engine writes them) all start
    with ``work/``, extracted with that prefix stripped, gives what the same tar without the
    prefix gives whenever that one is accepted (a symbolic link's target is data: never
    rewritten). Where the tar without the prefix is refused for a hard link that tarfile cannot
    resolve within the stream (to itself, to a later member), the prefixed one may instead
    leave that link out: ``tarfile`` looks such links up by the names as they were read."""
    base = tmp_path_factory.mktemp("strip")
    outside = base / "outside"
    outside.mkdir()
    prefixed = [("work", "dir", "")] + [
        ("work/" + name, kind, "work/" + arg if kind == "hard" else arg)
        for name, kind, arg in members
    ]
    plain = run(
        lambda d, s: extract_tar(io.BytesIO(d), s, "", 1 << 20), build(members, outside), base / "p"
    )
    stripped = run(
        lambda d, s: extract_tar(io.BytesIO(d), s, "work/", 1 << 20),
        build(prefixed, outside),
        base / "s",
    )
    assert list(outside.iterdir()) == [], "something was written outside"
    if isinstance(plain, dict):
        assert stripped == plain
    else:
        assert not isinstance(stripped, dict), "refused without the prefix, taken with it"
