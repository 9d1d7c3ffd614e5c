"""ConfinedRoot: descriptor-relative file access that never follows a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from narrative.confined import ConfinedRoot
from narrative.errors import InvalidInput, UnsafePath


@pytest.fixture
def layout(tmp_path: Path) -> tuple[ConfinedRoot, Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("outside")
    (root / "link-dir").symlink_to(outside)
    (root / "link-file").symlink_to(outside / "secret")
    (root / "plain").write_text("plain")
    return ConfinedRoot(root), root, outside


def test_read_write_unlink_inside(layout: tuple[ConfinedRoot, Path, Path]) -> None:
    box, root, _ = layout
    box.write_bytes("a/b/c.txt", b"data")
    assert (root / "a/b/c.txt").read_bytes() == b"data"
    assert box.read_bytes("a/b/c.txt") == b"data"
    assert box.read_bytes("a/b/c.txt", limit=2) == b"dat"  # limit + 1: the caller sees "more"
    box.write_bytes("a/b/c.txt", b"new", durable=True)
    assert box.read_bytes("a/b/c.txt") == b"new"
    assert [n for n in os.listdir(root / "a/b")] == ["c.txt"]  # no temp file left behind
    box.unlink("a/b/c.txt")
    assert not (root / "a/b/c.txt").exists()
    with pytest.raises(FileNotFoundError):
        box.read_bytes("a/b/c.txt")
    with pytest.raises(NotADirectoryError):
        box.read_bytes("plain/x")
    with pytest.raises(IsADirectoryError):
        box.write_bytes("a", b"x")
    with pytest.raises(InvalidInput, match="not a regular file"):
        box.read_bytes("a")


def test_symlinks_are_never_followed(layout: tuple[ConfinedRoot, Path, Path]) -> None:
    box, root, outside = layout
    for path in ("link-dir/secret", "link-file"):
        with pytest.raises(UnsafePath, match="symbolic link"):
            box.read_bytes(path)
    with pytest.raises(UnsafePath, match="'link-dir' is a symbolic link"):
        box.write_bytes("link-dir/planted", b"x")
    with pytest.raises(UnsafePath):
        box.open_dir("link-dir")
    # writing where a symlink is replaces the link; the target is untouched
    box.write_bytes("link-file", b"mine")
    assert not (root / "link-file").is_symlink()
    assert (outside / "secret").read_text() == "outside"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_fifo_does_not_hang_a_read(layout: tuple[ConfinedRoot, Path, Path]) -> None:
    box, root, _ = layout
    os.mkfifo(root / "pipe")
    with pytest.raises(InvalidInput, match="not a regular file"):
        box.read_bytes("pipe")


def test_path_rule_applies(layout: tuple[ConfinedRoot, Path, Path]) -> None:
    box, root, _ = layout
    for path in ("../outside/secret", "/etc/passwd", ".git/config", ".narrative/x", "a//b"):
        with pytest.raises(UnsafePath):
            box.write_bytes(path, b"x")
        with pytest.raises(UnsafePath):
            box.read_bytes(path)
    assert sorted(os.listdir(root)) == ["link-dir", "link-file", "plain"]


def test_walk_lists_without_following(layout: tuple[ConfinedRoot, Path, Path]) -> None:
    box, root, _ = layout
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("x")
    (root / ".narrative").mkdir()
    (root / "sub" / ".git").mkdir(parents=True)
    (root / "sub" / "f").write_text("f")
    listed = [(e.path, e.kind) for e in box.walk()]
    assert listed == [
        ("link-dir", "symlink"),
        ("link-file", "symlink"),
        ("plain", "file"),
        ("sub", "dir"),
        ("sub/f", "file"),
    ]
    assert [e.path for e in box.walk("sub")] == ["sub/f"]
    assert [e.path for e in box.walk(recursive=False)] == [p for p, _ in listed[:4]]


def test_directories_opens_each_once_and_never_through_a_symlink(
    layout: tuple[ConfinedRoot, Path, Path],
) -> None:
    box, root, outside = layout
    with box.directories(["a/b", "a/c", ""]) as fds:
        assert set(fds) == {"", "a", "a/b", "a/c"}
        os.mkdir("made", dir_fd=fds["a/b"])
        held = list(fds.values())
    assert (root / "a/b/made").is_dir() and (root / "a/c").is_dir()
    for fd in held:  # all closed on exit
        with pytest.raises(OSError):
            os.fstat(fd)
    for planted in ("link-dir", "link-dir/x", "plain/x"):
        with pytest.raises((UnsafePath, NotADirectoryError)), box.directories([planted]):
            pass
    with pytest.raises(UnsafePath), box.directories([".git/hooks"]):
        pass
    assert os.listdir(outside) == ["secret"]
