"""Received packs: stock git's deltas and thin packs are taken in, hostile packs refused."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from narrative.objects import hash_object
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import call_in_own_process, git
from transfer.bundle import write_bundle
from transfer.packin import PackError, receive_pack


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


def _zero_blob_pack(path: str, size: int) -> str:
    """A pack holding one blob of ``size`` zero bytes, written as a stream; returns its id."""
    from narrative.objects import object_header
    from narrative.packentry import pack_object_header

    blob_id = hashlib.sha1(object_header("blob", size))
    comp = zlib.compressobj(1)
    body = hashlib.sha1()
    with open(path, "wb") as f:

        def put(data: bytes) -> None:
            body.update(data)
            f.write(data)

        put(b"PACK" + (2).to_bytes(4, "big") + (1).to_bytes(4, "big"))
        put(pack_object_header("blob", size))
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            blob_id.update(zeros)
            put(comp.compress(zeros))
        put(comp.flush())
        f.write(body.digest())
    return blob_id.hexdigest()


def receive_zero_blob_peak_rss(tmp: str, size: int) -> dict[str, object]:
    """Run in a fresh interpreter: receive a pack with a ``size``-byte zero blob; peak RSS."""
    import resource

    from narrative.store import Store

    ws = os.path.join(tmp, "ws")
    os.makedirs(ws)
    store = Store.init(ws)
    pack_path = os.path.join(tmp, "zero.pack")
    expected = _zero_blob_pack(pack_path, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(pack_path, "rb") as f:
        got = receive_pack(f, store.odb)
    oids = [oid.hex() for oid in got.objects]
    got.publish()
    store.odb.invalidate()
    return {
        "oids": oids,
        "expected": expected,
        "stored": store.odb.exists(bytes.fromhex(expected)),
        "git_dir": store.git_dir,
        "before_kib": before,
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def test_a_1gib_zero_blob_is_received_in_bounded_memory(tmp_path: Path) -> None:
    result = call_in_own_process(
        "tests.transfer.test_packin:receive_zero_blob_peak_rss", str(tmp_path), 1 << 30
    )
    assert result["oids"] == [result["expected"]] and result["stored"]
    assert result["peak_kib"] - result["before_kib"] < 128 << 10, result  # < 128 MiB growth
    git("--git-dir", result["git_dir"], "cat-file", "-e", result["expected"])


def test_pack_expanding_past_the_limit_is_refused(store: Store, tmp_path: Path) -> None:
    path = str(tmp_path / "zero.pack")
    _zero_blob_pack(path, 64 << 20)
    before = sorted(os.listdir(store.odb.tmp_dir)) if os.path.isdir(store.odb.tmp_dir) else []
    with open(path, "rb") as f, pytest.raises(PackError, match="limit"):
        receive_pack(f, store.odb, max_expanded=32 << 20)
    assert (
        sorted(os.listdir(store.odb.tmp_dir)) if os.path.isdir(store.odb.tmp_dir) else []
    ) == before


def _one_entry_pack(declared: int, stream: bytes) -> bytes:
    from narrative.packentry import pack_object_header

    body = b"PACK" + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
    body += pack_object_header("blob", declared) + stream
    return body + hashlib.sha1(body).digest()


def test_a_padded_stream_longer_than_deflate_makes_is_taken_in(
    store: Store, tmp_path: Path
) -> None:
    """Empty stored blocks make a legal stream longer than the one-read bound of whole
    objects: it is read on, taken in verbatim, and stock git reads the result."""
    data = b"padded blob\n"
    n = len(data)
    stream = b"\x78\x01" + b"\x00\x00\x00\xff\xff" * 40  # 40 empty stored blocks
    stream += b"\x01" + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little") + data
    stream += zlib.adler32(data).to_bytes(4, "big")
    assert zlib.decompress(stream) == data
    assert len(stream) > len(data) + 5 + 64
    pack = _one_entry_pack(len(data), stream)
    oid = hash_object("blob", data)
    got = receive_pack(io.BytesIO(pack), store.odb)
    assert got.objects == {oid: "blob"} and got.small[oid] == data
    got.publish()
    store.odb.invalidate()
    assert store.odb.read(oid) == ("blob", data)
    git("--git-dir", store.git_dir, "fsck", "--strict", "--no-dangling")
    assert git("--git-dir", store.git_dir, "cat-file", "blob", oid.hex()) == data.decode()


@pytest.mark.parametrize("declared", [10, 2000])
def test_a_stream_not_matching_its_declared_size_is_refused(
    store: Store, tmp_path: Path, declared: int
) -> None:
    pack = _one_entry_pack(declared, zlib.compress(b"z" * 1000, 9))
    with pytest.raises(PackError, match="declared size"):
        receive_pack(io.BytesIO(pack), store.odb)
    assert os.listdir(store.odb.tmp_dir) == []


def test_published_packs_verify_with_git_whether_copied_whole_or_not(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """A received pack copied entry for entry keeps its verified trailer; one with objects the
    store already held (skipped) is hashed anew. Stock git checks both packs' checksums."""
    (workspace / "a.txt").write_text("a" * 3000)
    first = take_snapshot(store).snapshot
    (workspace / "b.txt").write_text("b" * 3000)
    second = take_snapshot(store).snapshot
    packs: list[bytes] = []
    for snap in (first, second):
        buf = io.BytesIO()
        write_bundle(store.odb, buf, {"refs/narrative/x": bytes.fromhex(snap.commit)})
        packs.append(buf.getvalue().split(b"\n\n", 1)[1])
    other = _other_store(tmp_path)
    copied = []
    for pack, tip in ((packs[0], first), (packs[1], second)):  # the second repeats the first
        got = receive_pack(io.BytesIO(pack), other.odb)
        copied.append(got.trailer == pack[-20:])
        got.publish()
        other.odb.invalidate()
        other.refs.update("refs/narrative/x", bytes.fromhex(tip.commit))
    assert copied == [True, False]
    names = sorted(n for n in _pack_files(other) if n.endswith(".pack"))
    assert len(names) == 2
    counts = set()
    for name in names:
        out = git("verify-pack", "-v", os.path.join(other.odb.pack_dir, name))
        counts.add(sum(1 for line in out.splitlines() if len(line.split()[0]) == 40))
    assert len(counts) == 2  # one pack holds every object, the other only the new ones
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")
