"""Imports refuse every object stock ``git fsck --strict`` rejects, and change nothing.

Each malformed object is written with stock ``git hash-object --literally`` into a scratch
repository (where ``git fsck --strict`` must report it: git is the oracle), then packed with
stock ``git pack-objects`` into an otherwise valid bundle of a real snapshot.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git
from transfer.errors import InvalidArtifact
from transfer.exporter import export
from transfer.importer import import_stream

BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # the empty blob
TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # the empty tree


def _entry(mode: bytes, name: bytes, oid: str = BLOB) -> bytes:
    return mode + b" " + name + b"\x00" + bytes.fromhex(oid)


def _commit(head: bytes) -> bytes:
    return head + b"\n\nmessage\n"


SIG = b"A U Thor <a@example.com> 1700000000 +0000"
# (kind, content, git's message id that `git fsck --strict` reports)
MALFORMED: dict[str, tuple[str, bytes, str]] = {
    "duplicate-names": (
        "tree",
        _entry(b"100644", b"a") + _entry(b"100644", b"a"),
        "duplicateEntries",
    ),
    "file-and-dir-same-name": (
        "tree",
        _entry(b"100644", b"a") + _entry(b"40000", b"a", TREE),
        "duplicateEntries",
    ),
    "unsorted": ("tree", _entry(b"100644", b"b") + _entry(b"100644", b"a"), "treeNotSorted"),
    "zero-padded-mode": ("tree", _entry(b"0100644", b"a"), "zeroPaddedFilemode"),
    "bad-mode": ("tree", _entry(b"100664", b"a"), "badFilemode"),
    "dot": ("tree", _entry(b"100644", b"."), "hasDot"),
    "dotdot": ("tree", _entry(b"100644", b".."), "hasDotdot"),
    "empty-name": ("tree", _entry(b"100644", b""), "emptyName"),
    "slash-in-name": ("tree", _entry(b"100644", b"a/b"), "fullPathname"),
    "dotgit": ("tree", _entry(b"40000", b".git", TREE), "hasDotgit"),
    "dotgit-uppercase": ("tree", _entry(b"40000", b".GIT", TREE), "hasDotgit"),
    "commit-missing-tree": (
        "commit",
        _commit(b"author " + SIG + b"\ncommitter " + SIG),
        "missingTree",
    ),
    "commit-bad-tree": (
        "commit",
        _commit(b"tree xyz\nauthor " + SIG + b"\ncommitter " + SIG),
        "badTreeSha1",
    ),
    "commit-bad-parent": (
        "commit",
        _commit(b"tree " + TREE.encode() + b"\nparent 123\nauthor " + SIG + b"\ncommitter " + SIG),
        "badParentSha1",
    ),
    "commit-header-order": (
        "commit",
        _commit(b"tree " + TREE.encode() + b"\ncommitter " + SIG + b"\nauthor " + SIG),
        "missingAuthor",
    ),
    "commit-author-no-email": (
        "commit",
        _commit(b"tree " + TREE.encode() + b"\nauthor A 1 +0000\ncommitter " + SIG),
        "missingEmail",
    ),
    "commit-bad-timezone": (
        "commit",
        _commit(
            b"tree " + TREE.encode() + b"\nauthor A <a@b> 1 +00\ncommitter " + SIG  # short tz
        ),
        "badTimezone",
    ),
    "commit-two-authors": (
        "commit",
        _commit(
            b"tree "
            + TREE.encode()
            + b"\nauthor "
            + SIG
            + b"\nauthor "
            + SIG
            + b"\ncommitter "
            + SIG
        ),
        "multipleAuthors",
    ),
}


def store_listing(path: str) -> dict[str, str]:
    """Every file below ``path`` with a hash of its content (the store, byte for byte)."""
    out: dict[str, str] = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def snapshot_bundle(store: Store, workspace: Path, tmp_path: Path) -> tuple[bytes, Path]:
    """A valid bundle of one snapshot (header, scratch bare repo cloned from it)."""
    (workspace / "a.txt").write_text("a\n")
    take_snapshot(store)
    path = tmp_path / "good.bundle"
    export(store, str(path))
    scratch = tmp_path / "scratch.git"
    git("init", "-q", "--bare", str(scratch))
    git("--git-dir", str(scratch), "fetch", "-q", str(path), "refs/*:refs/*")
    header = path.read_bytes().split(b"\n\n", 1)[0] + b"\n\n"
    return header, scratch


def _with_object(scratch: Path, kind: str, content: bytes, header: bytes) -> tuple[bytes, int, str]:
    """A bundle carrying the snapshot plus one malformed object; git's fsck exit and output."""
    oid = subprocess.run(
        [
            "git",
            "--git-dir",
            str(scratch),
            "hash-object",
            "--literally",
            "-w",
            "-t",
            kind,
            "--stdin",
        ],
        input=content,
        capture_output=True,
        check=True,
    ).stdout.strip()
    fsck = subprocess.run(
        ["git", "--git-dir", str(scratch), "fsck", "--strict", "--no-dangling"],
        capture_output=True,
        text=True,
        check=False,
    )
    listing = git("--git-dir", str(scratch), "rev-list", "--objects", "--all")
    names = "\n".join(line.split()[0] for line in listing.splitlines()) + "\n"
    packing = subprocess.run(
        ["git", "--git-dir", str(scratch), "pack-objects", "--stdout"],
        input=names.encode() + oid + b"\n",
        capture_output=True,
        check=False,
    )
    assert packing.returncode == 0, packing.stderr.decode()
    pack = packing.stdout
    subprocess.run(
        ["git", "--git-dir", str(scratch), "prune", "--expire=now"], capture_output=True, check=True
    )
    return header + pack, fsck.returncode, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_import_refuses_what_git_fsck_strict_rejects(
    tmp_path: Path, snapshot_bundle: tuple[bytes, Path], case: str
) -> None:
    kind, content, message_id = MALFORMED[case]
    header, scratch = snapshot_bundle
    bundle, fsck_exit, fsck_output = _with_object(scratch, kind, content, header)
    # the oracle: stock git rejects it (badFilemode is only reported, at "info" level)
    assert fsck_exit != 0 or message_id in fsck_output, fsck_output
    target_ws = tmp_path / "target"
    target_ws.mkdir()
    target = Store.init(str(target_ws))
    before = store_listing(target.git_dir)
    with pytest.raises(InvalidArtifact, match=message_id):
        import_stream(target, io.BytesIO(bundle), "hostile.bundle", "hostile")
    assert store_listing(target.git_dir) == before
    # the same bundle without the malformed object imports fine (the test can pass)
    good = (tmp_path / "good.bundle").read_bytes()
    import_stream(target, io.BytesIO(good), "good.bundle", "good")
    git("--git-dir", target.git_dir, "fsck", "--strict", "--no-dangling")


def test_import_refuses_names_longer_than_file_systems_allow(
    tmp_path: Path, snapshot_bundle: tuple[bytes, Path]
) -> None:
    """git accepts a 300-byte name; no file system here could restore it."""
    header, scratch = snapshot_bundle
    bundle, fsck_exit, _output = _with_object(
        scratch, "tree", _entry(b"100644", b"n" * 300), header
    )
    assert fsck_exit == 0
    target_ws = tmp_path / "target"
    target_ws.mkdir()
    target = Store.init(str(target_ws))
    before = store_listing(target.git_dir)
    with pytest.raises(InvalidArtifact, match="longer than file systems allow"):
        import_stream(target, io.BytesIO(bundle), "long.bundle", "long")
    assert store_listing(target.git_dir) == before
