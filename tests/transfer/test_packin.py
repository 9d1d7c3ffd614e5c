"""Received packs: stock git's deltas and thin packs are taken in, hostile packs refused."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from narrative.snapshot import take_snapshot
from narrative.store import Store
from transfer.bundle import write_bundle
from transfer.packin import PackError, receive_pack

from ..conftest import git


def _git_pack(repo: Path, revs: str, *extra: str) -> bytes:
    return subprocess.run(
        ["git", "--git-dir", str(repo), "pack-objects", "--stdout", "--revs", *extra],
        input=revs.encode(),
        capture_output=True,
        check=True,
    ).stdout


def _other_store(tmp_path: Path, name: str = "other") -> Store:
    ws = tmp_path / name
    ws.mkdir()
    return Store.init(str(ws))


def _pack_files(store: Store) -> set[str]:
    return set(os.listdir(store.odb.pack_dir))


def test_own_bundle_pack_round_trip(store: Store, workspace: Path, tmp_path: Path) -> None:
    (workspace / "data.bin").write_bytes(os.urandom(100_000))
    snap = take_snapshot(store).snapshot
    buf = io.BytesIO()
    write_bundle(store.odb, buf, {"refs/narrative/x": bytes.fromhex(snap.commit)})
    pack = buf.getvalue().split(b"\n\n", 1)[1]
    other = _other_store(tmp_path)
    got = receive_pack(io.BytesIO(pack), other.odb)
    assert bytes.fromhex(snap.commit) in got.objects
    assert got.missing_below([bytes.fromhex(snap.commit)], other.odb) == []
    got.publish()
    other.refs.update("refs/narrative/x", bytes.fromhex(snap.commit))
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")


def test_git_deltas_and_thin_packs(tmp_path: Path) -> None:
    repo = tmp_path / "src"
    git("init", "-q", str(repo))
    body = "".join(f"line {i} of a long enough text file\n" for i in range(2000))
    (repo / "a.txt").write_text(body)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "one", cwd=repo)
    base = git("rev-parse", "HEAD", cwd=repo).strip()
    (repo / "a.txt").write_text(body.replace("line 1000 ", "LINE 1000 "))
    (repo / "b.txt").write_text(body + "more\n")
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "two", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo).strip()
    full = _git_pack(repo / ".git", f"{head}\n")
    store = _other_store(tmp_path, "a")
    got = receive_pack(io.BytesIO(full), store.odb)
    assert bytes.fromhex(head) in got.objects and bytes.fromhex(base) in got.objects
    got.publish()
    store.refs.update("refs/narrative/t", bytes.fromhex(head))
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
    # a thin pack deltas against objects only the receiver has
    store2 = _other_store(tmp_path, "b")
    receive_pack(io.BytesIO(_git_pack(repo / ".git", f"{base}\n")), store2.odb).publish()
    thin = _git_pack(repo / ".git", f"{head}\n^{base}\n", "--thin")
    partial = receive_pack(io.BytesIO(thin), store2.odb)
    assert partial.missing_below([bytes.fromhex(head)], store2.odb) == []
    partial.publish()
    store2.refs.update("refs/narrative/t", bytes.fromhex(head))
    git("--git-dir", store2.git_dir, "fsck", "--strict", "--no-dangling")
    # ... and is refused where the bases are missing
    store3 = _other_store(tmp_path, "c")
    before = _pack_files(store3)
    with pytest.raises(PackError, match="delta base"):
        receive_pack(io.BytesIO(thin), store3.odb)
    assert _pack_files(store3) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "count"])
def test_damaged_packs_are_refused_and_nothing_is_stored(
    store: Store, workspace: Path, tmp_path: Path, damage: str
) -> None:
    (workspace / "x.txt").write_text("x" * 5000)
    snap = take_snapshot(store).snapshot
    buf = io.BytesIO()
    write_bundle(store.odb, buf, {"refs/narrative/x": bytes.fromhex(snap.commit)})
    pack = bytearray(buf.getvalue().split(b"\n\n", 1)[1])
    if damage == "flip":
        pack[len(pack) // 2] ^= 0x40
    elif damage == "truncate":
        pack = pack[: len(pack) - 30]
    elif damage == "garbage":
        pack = bytearray(os.urandom(500))
    else:  # declares more objects than it holds, with a valid trailer
        import hashlib

        body = bytes(pack[:8]) + (int.from_bytes(pack[8:12], "big") + 1).to_bytes(4, "big")
        body += bytes(pack[12:-20])
        pack = bytearray(body + hashlib.sha1(body).digest())
    other = _other_store(tmp_path)
    before = _pack_files(other)
    with pytest.raises(PackError):
        receive_pack(io.BytesIO(bytes(pack)), other.odb)
    assert _pack_files(other) == before
    assert os.listdir(other.odb.tmp_dir) == []


def test_oversized_objects_are_refused(store: Store, workspace: Path, tmp_path: Path) -> None:
    (workspace / "big.txt").write_text("b" * 100_000)
    snap = take_snapshot(store).snapshot
    buf = io.BytesIO()
    write_bundle(store.odb, buf, {"refs/narrative/x": bytes.fromhex(snap.commit)})
    pack = buf.getvalue().split(b"\n\n", 1)[1]
    with pytest.raises(PackError, match="over the limit"):
        receive_pack(io.BytesIO(pack), _other_store(tmp_path).odb, max_object=50_000)
