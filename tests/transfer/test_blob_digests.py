"""The sizes and sha256s of blob contents that exports keep in the store
(:mod:`narrative.blobdigests`): a later export hashes only what is new and writes straight to
its output, byte for byte what a cold export writes; a damaged or unwritable file costs only
the hashing again, never a wrong digest in a manifest."""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import narrative.blobdigests as blobdigests
from narrative.blobdigests import BlobDigests
from narrative.errors import StoreCorrupted
from narrative.history import resolve_snapshot
from narrative.models import Snapshot
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git
from tests.properties import examples
from transfer.archive import ARCHIVE_FORMATS
from transfer.archive_read import read_archive
from transfer.archive_write import write_archive
from transfer.exporter import export

FORMATS = pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)


def _fill(workspace: Path, files: int = 40) -> None:
    rng = random.Random(files)
    for i in range(files):
        sub = workspace / f"d{i % 5}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_bytes(rng.randbytes(rng.randrange(0, 5000)) + b"x" * 3000)
    (workspace / "link").symlink_to("d0/f0.txt")


def _export(store: Store, fmt: str = "tar.zst") -> bytes:
    buf = io.BytesIO()
    snap = store_head(store)
    write_archive(store, snap, buf, fmt)
    return buf.getvalue()


def store_head(store: Store) -> Snapshot:
    return resolve_snapshot(store, store.config.default_thread)


def _digest_file(store: Store) -> Path:
    return Path(store.git_dir, "narrative", "cache", "blob-digests")


def _blob_contents(store: Store) -> dict[bytes, bytes]:
    """Every blob of the head snapshot's tree, by id, read by stock git."""
    tree = store_head(store).tree
    listing = git("--git-dir", store.git_dir, "ls-tree", "-r", "--full-tree", tree)
    blobs: dict[bytes, bytes] = {}
    for line in listing.splitlines():
        oid = line.split()[2]
        blobs[bytes.fromhex(oid)] = git_bytes(store.git_dir, oid)
    return blobs


def git_bytes(git_dir: str, oid: str) -> bytes:
    return subprocess.run(
        ["git", "--git-dir", git_dir, "cat-file", "blob", oid], check=True, capture_output=True
    ).stdout


@FORMATS
def test_an_export_keeps_every_digest_and_the_next_one_hashes_nothing_and_spools_nothing(
    store: Store, workspace: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(workspace)
    take_snapshot(store)
    cold = _export(store, fmt)
    kept = BlobDigests.load(store.git_dir)
    blobs = _blob_contents(store)
    assert len(kept) == len(blobs)
    for oid, content in blobs.items():  # as stock git reads them
        assert kept.get(oid) == (len(content), hashlib.sha256(content).digest())

    def no_spool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm export spooled its files")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_spool)
    hashed: list[bytes] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> object:
        hashed.append(bytes(data))
        return real(data)

    monkeypatch.setattr("transfer.archive_write.hashlib.sha256", counting)
    assert _export(store, fmt) == cold
    assert len(hashed) == 1  # the symlink, whose target is read anyway; no file content


def test_a_changed_file_is_the_only_content_hashed_again(store: Store, workspace: Path) -> None:
    _fill(workspace)
    take_snapshot(store)
    _export(store)
    (workspace / "d1" / "f1.txt").write_bytes(b"changed\n")
    take_snapshot(store)
    before = _digest_file(store).read_bytes()
    data = _export(store)
    kept = BlobDigests.load(store.git_dir)
    assert kept.get(bytes.fromhex(git("hash-object", str(workspace / "d1" / "f1.txt")))) == (
        8,
        hashlib.sha256(b"changed\n").digest(),
    )
    assert _digest_file(store).read_bytes() != before
    (workspace.parent / "other").mkdir()
    other = Store.init(str(workspace.parent / "other"))
    assert read_archive(io.BytesIO(data), other).tree.hex() == store_head(store).tree


@settings(
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(keep=st.lists(st.booleans(), min_size=42, max_size=42))
def test_any_part_of_the_digests_known_gives_the_bytes_of_a_cold_export(
    store: Store, workspace: Path, keep: list[bool]
) -> None:
    if not (workspace / "link").exists():
        _fill(workspace)
        take_snapshot(store)
    _digest_file(store).unlink(missing_ok=True)
    cold = _export(store)
    full = BlobDigests.load(store.git_dir)
    part = BlobDigests(str(_digest_file(store)), {})
    for i, oid in enumerate(sorted(_blob_contents(store))):
        known = full.get(oid)
        if keep[i % len(keep)] and known is not None:
            part.add(oid, *known)
    _digest_file(store).unlink()
    part.save()
    assert _export(store) == cold


def test_a_damaged_digest_file_is_never_believed(store: Store, workspace: Path) -> None:
    """Every truncation and many flipped bytes: the file loads whole or not at all, and the
    export is the cold one's bytes either way."""
    _fill(workspace, 12)
    take_snapshot(store)
    cold = _export(store)
    good = _digest_file(store).read_bytes()
    truth = BlobDigests.load(store.git_dir)
    rng = random.Random(7)
    damages = [good[:n] for n in range(0, len(good), max(1, len(good) // 60))]
    for _ in range(60):
        at = rng.randrange(len(good))
        damages.append(good[:at] + bytes([good[at] ^ (1 << rng.randrange(8))]) + good[at + 1 :])
    for damaged in damages:
        _digest_file(store).write_bytes(damaged)
        loaded = BlobDigests.load(store.git_dir)
        assert len(loaded) in (0, len(truth))
        assert all(loaded.get(oid) in (None, truth.get(oid)) for oid in _blob_contents(store))
    _digest_file(store).write_bytes(good[:-7])
    assert _export(store) == cold
    assert _digest_file(store).read_bytes() == good  # hashed again and kept whole


def test_a_digest_file_that_cannot_be_written_only_costs_the_hashing(
    store: Store, workspace: Path
) -> None:
    _fill(workspace, 8)
    take_snapshot(store)
    path = _digest_file(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # neither readable as a file nor replaceable
    first = _export(store)
    assert path.is_dir() and os.listdir(path) == []
    assert _export(store) == first


def test_past_the_cap_only_this_exports_digests_are_kept(
    store: Store, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digests = BlobDigests(str(_digest_file(store)), {})
    for i in range(10):
        digests.add(bytes([i]) * 20, i, bytes([i]) * 32)
    digests.save()
    monkeypatch.setattr(blobdigests, "MAX_ENTRIES", 12)
    again = BlobDigests.load(store.git_dir)
    assert len(again) == 10
    for i in range(10, 15):
        again.add(bytes([i]) * 20, i, bytes([i]) * 32)
    again.save()
    kept = BlobDigests.load(store.git_dir)
    assert len(kept) == 5
    assert kept.get(bytes([12]) * 20) == (12, bytes([12]) * 32)
    assert kept.get(bytes([3]) * 20) is None


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_failed_export_publishes_nothing_and_keeps_the_old_archive(
    store: Store, workspace: Path, tmp_path: Path, warm: bool, damage: str
) -> None:
    """A warm export writes straight to its output: when a damaged pack stops it midway, the
    publish is abandoned, the archive already there and its sidecar stay as they were, and the
    store's other files are untouched."""
    _fill(workspace, 8)
    big = random.Random(3).randbytes(256 << 10)
    (workspace / "z-big.bin").write_bytes(big)  # last in tree order: the output is started
    take_snapshot(store)
    (tmp_path / "exports").mkdir()
    target = tmp_path / "exports" / "out.tar.zst"
    export(store, str(target), fmt="tar.zst")
    old = target.read_bytes(), Path(f"{target}.sha256").read_bytes()
    if not warm:
        _digest_file(store).unlink()
    found = store.odb.locate_packed(bytes.fromhex(git("hash-object", str(workspace / "z-big.bin"))))
    assert found is not None
    pack_path, start = found
    with open(pack_path, "r+b") as pack:
        if damage == "truncated":
            pack.truncate(start + (100 << 10))
        else:
            pack.seek(start + (100 << 10))
            byte = pack.read(1)
            pack.seek(start + (100 << 10))
            pack.write(bytes([byte[0] ^ 0xFF]))
    digests = _digest_file(store).read_bytes() if warm else None
    with pytest.raises(StoreCorrupted):
        export(store, str(target), fmt="tar.zst")
    assert (target.read_bytes(), Path(f"{target}.sha256").read_bytes()) == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.tar.zst", "out.tar.zst.sha256"]
    if warm:
        assert _digest_file(store).read_bytes() == digests
    else:
        assert not _digest_file(store).exists()
