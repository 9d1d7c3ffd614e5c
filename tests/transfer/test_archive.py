"""Snapshot archives (tar.gz / tar.zst): round trips into a fresh store, stock tar as an oracle,
determinism, flat memory, and a hostile corpus that must be refused without touching the store."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

import transfer.archive_codec as archive_codec
import transfer.archive_write as archive_write
from narrative.errors import InvalidInput, StoreCorrupted
from narrative.hierarchy import get_objective, get_thread, start_run
from narrative.ids import new_id
from narrative.models import Snapshot
from narrative.objects import MODE_DIR, encode_tree, hash_object
from narrative.packentry import pack_entry_header
from narrative.packindex import encode_index
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import call_in_own_process, git, tree_bytes
from transfer.archive import ARCHIVE_FORMATS, CHUNK, MANIFEST_NAME, ArchiveError
from transfer.archive_blobs import BlobSource, PackFiles
from transfer.archive_manifest import ArchiveManifest
from transfer.archive_read import read_archive
from transfer.archive_write import write_archive
from transfer.errors import InvalidArtifact

FORMATS = pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)


def _noise(size: int) -> bytes:
    """Incompressible bytes, the same on every run: corruption tests must not depend on luck
    (a flipped bit must hit the same place in the same data every time)."""
    return random.Random(size).randbytes(size)


# ----------------------------------------------------------------------------- helpers


def _unzstd(data: bytes) -> bytes:
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
        return reader.read()


def _other_store(tmp_path: Path, name: str = "other") -> Store:
    ws = tmp_path / name
    ws.mkdir()
    return Store.init(str(ws))


def _listing(store: Store) -> dict[str, tuple[int, bytes]]:
    """Every file below the store's git dir with its size and content hash."""
    out: dict[str, tuple[int, bytes]] = {}
    for root, _dirs, files in os.walk(store.git_dir):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                data = f.read()
            out[os.path.relpath(full, store.git_dir)] = (len(data), hashlib.sha1(data).digest())
    return out


def _records(store: Store, snap: Snapshot) -> dict[str, Any]:
    thread = get_thread(store, snap.thread)
    return {
        "objective": get_objective(store, thread.objective_id).to_dict(),
        "thread": thread.to_dict(),
        "run": None,
    }


def _export(store: Store, snap: Snapshot, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    stats = write_archive(store, snap, buf, fmt, **kwargs)
    assert stats.bytes_out == len(buf.getvalue())
    return buf.getvalue()


def _ls_tree(git_dir: str, tree: str) -> str:
    return git("--git-dir", git_dir, "ls-tree", "-r", "--full-tree", tree)


@pytest.fixture
def rich_workspace(workspace: Path) -> Path:
    """Nested dirs, an executable, symlinks, an empty file, unicode, and a 9 MiB random file."""
    deep = workspace / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("deep\n" * 100)
    (workspace / "a" / "b" / "sibling.md").write_text("# sibling\n")
    (workspace / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (workspace / "run.sh").chmod(0o755)
    (workspace / "link").symlink_to("a/b/c/deep.txt")
    (workspace / "a" / "up").symlink_to("../README.md")
    (workspace / "empty").write_bytes(b"")
    (workspace / "ünïcödé ✓.txt").write_text("unicode\n")
    (workspace / "big.bin").write_bytes(_noise(9 << 20))
    text = "".join(f"line {i} of a compressible text file\n" for i in range(40_000))
    (workspace / "a" / "text.log").write_text(text)
    return workspace


# ----------------------------------------------------------------------------- round trips


@FORMATS
@pytest.mark.parametrize("spool", [True, False], ids=["spool", "two-pass"])
def test_round_trip_into_fresh_store(
    store: Store, rich_workspace: Path, tmp_path: Path, fmt: str, spool: bool
) -> None:
    snap = take_snapshot(store).snapshot
    data = _export(store, snap, fmt, records=_records(store, snap), spool=spool)
    assert data[:4] == (b"\x28\xb5\x2f\xfd" if fmt == "tar.zst" else b"\x1f\x8b\x08\x00")
    other = _other_store(tmp_path)
    result = read_archive(io.BytesIO(data), other)
    assert result.tree.hex() == snap.tree
    assert result.objects > 0
    assert _ls_tree(other.git_dir, snap.tree) == _ls_tree(store.git_dir, snap.tree)
    git("--git-dir", other.git_dir, "fsck", "--no-dangling")
    manifest = result.manifest
    assert manifest.snapshot == snap.to_dict()
    assert manifest.thread is not None and manifest.thread["id"] == snap.thread
    assert manifest.objective is not None
    assert manifest.run is None
    paths = [f["path"] for f in manifest.files]
    assert "ünïcödé ✓.txt" in paths and "empty" in paths
    modes = {f["path"]: f["mode"] for f in manifest.files}
    assert modes["run.sh"] == "100755" and modes["link"] == "120000"
    big = next(f for f in manifest.files if f["path"] == "big.bin")
    digest = hashlib.sha256((rich_workspace / "big.bin").read_bytes()).hexdigest()
    assert big["size"] == 9 << 20 and big["sha256"] == digest
    # importing again adds nothing and still verifies
    again = read_archive(io.BytesIO(data), other)
    assert again.tree == result.tree and again.objects == 0


@FORMATS
def test_stock_tar_extracts_the_workspace(
    store: Store, rich_workspace: Path, tmp_path: Path, fmt: str
) -> None:
    snap = take_snapshot(store).snapshot
    path = tmp_path / f"snap.{fmt}"
    path.write_bytes(_export(store, snap, fmt))
    if fmt == "tar.zst" and shutil.which("zstd") is None:
        pytest.skip("the zstd CLI is not installed (apt-get install -y zstd)")
    out = tmp_path / "extracted"
    out.mkdir()
    flags = ["-xzf"] if fmt == "tar.gz" else ["--zstd", "-xf"]
    subprocess.run(["tar", *flags, str(path), "-C", str(out)], check=True)
    assert json.loads((out / MANIFEST_NAME).read_text())["tree"] == snap.tree
    expected = {k: v for k, v in tree_bytes(rich_workspace).items() if ".narrative" not in k}
    assert tree_bytes(out / "files") == expected
    listing = subprocess.run(
        ["tar", "-tf", str(path), *(["--zstd"] if fmt == "tar.zst" else ["-z"])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert listing[0] == MANIFEST_NAME
    assert all(name.startswith("files/") for name in listing[1:])


def test_non_utf8_file_name_round_trips(store: Store, workspace: Path, tmp_path: Path) -> None:
    name = os.fsdecode(b"latin1-\xe9t\xe9.txt")
    (workspace / name).write_bytes(b"bytes name\n")
    snap = take_snapshot(store).snapshot
    for fmt in ARCHIVE_FORMATS:
        other = _other_store(tmp_path, f"other-{fmt}")
        result = read_archive(io.BytesIO(_export(store, snap, fmt)), other)
        assert result.tree.hex() == snap.tree


def test_empty_snapshot_round_trips(store: Store, workspace: Path, tmp_path: Path) -> None:
    for child in ("README.md", "src/app.py"):
        (workspace / child).unlink()
    (workspace / "src").rmdir()
    snap = take_snapshot(store).snapshot
    other = _other_store(tmp_path)
    result = read_archive(io.BytesIO(_export(store, snap, "tar.gz")), other)
    assert result.tree.hex() == snap.tree and result.manifest.files == []


def test_run_record_travels(store: Store, workspace: Path, tmp_path: Path) -> None:
    run = start_run(store, store.config.default_thread)
    snap = take_snapshot(store, run_id=run.id).snapshot
    records = {**_records(store, snap), "run": run.to_dict()}
    data = _export(store, snap, "tar.zst", records=records)
    result = read_archive(io.BytesIO(data), _other_store(tmp_path))
    assert result.manifest.run is not None and result.manifest.run["id"] == run.id
    assert result.manifest.snapshot["run"] == run.id


@FORMATS
def test_export_is_deterministic(
    store: Store, rich_workspace: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = take_snapshot(store).snapshot
    first = _export(store, snap, fmt)
    assert _export(store, snap, fmt) == first
    assert _export(store, snap, fmt, spool=False) == first  # both strategies, same bytes
    # the thread count never changes the output
    monkeypatch.setattr(archive_write, "default_workers", lambda: 3)
    assert _export(store, snap, fmt) == first
    if fmt == "tar.gz":
        assert first[4:8] == b"\x00\x00\x00\x00"  # no timestamp in the gzip header
        assert _export(store, snap, fmt, level=6) != first


def test_incompressible_pieces_are_stored(store: Store, workspace: Path) -> None:
    (workspace / "noise.bin").write_bytes(_noise(6 << 20))
    snap = take_snapshot(store).snapshot
    data = _export(store, snap, "tar.gz")
    assert len(data) < (6 << 20) * 1.01  # stored blocks, not a deflate that grows the data
    assert gzip.decompress(data)[:512].startswith(MANIFEST_NAME.encode())


def test_tar_headers_match_tarfile() -> None:
    cases = [
        ("files/a.txt", 0o644, 123, 1_700_000_000, tarfile.REGTYPE, ""),
        ("files/run", 0o755, 8**11 - 1, 0, tarfile.REGTYPE, ""),
        ("files/l", 0o777, 0, 5, tarfile.SYMTYPE, "../x"),
        ("files/" + "x" * 94, 0o644, 1, 1, tarfile.REGTYPE, ""),
        ("files/" + "y" * 200, 0o644, 1, 1, tarfile.REGTYPE, ""),  # pax path
        ("files/ü", 0o644, 8**11, 1, tarfile.REGTYPE, ""),  # pax path and size
        ("files/l2", 0o777, 0, 1, tarfile.SYMTYPE, "é/" * 80),
        # the largest checksum a directly encoded header can have (every byte 0x7f)
        ("\x7f" * 100, 0o7777, 8**11 - 1, 8**11 - 1, tarfile.SYMTYPE, "\x7f" * 100),
    ]
    for name, mode, size, mtime, kind, link in cases:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.type, info.linkname = size, mtime, mode, kind, link
        info.uname = info.gname = ""
        expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert archive_write.tar_header(name, mode, size, mtime, kind, link) == expected


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_resident_peak() -> int:
    """Start the process's peak resident size (VmHWM) again from now; its resident KiB now.
    tracemalloc does not see mapped files: a pack read through a map counts only here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _resident_peak() -> int:
    return _status_kib("VmHWM")


def _archive_peaks(root: str, fmt: str) -> dict[str, Any]:
    """Peak traced memory of exporting a 40 MiB file (spooled and not) and importing it back."""
    workspace, path = Path(root) / "ws", Path(root) / f"huge.{fmt}"
    workspace.mkdir()
    (workspace / "huge.bin").write_bytes(_noise(40 << 20))
    store = Store.init(str(workspace))
    snap = take_snapshot(store).snapshot
    peaks: dict[str, Any] = {}
    for spool in (True, False):
        resident = _reset_resident_peak()
        tracemalloc.start()
        try:
            with path.open("wb") as out:
                write_archive(store, snap, out, fmt, spool=spool)
            peaks[f"export spool={spool}"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        peaks[f"resident growth spool={spool}"] = _resident_peak() - resident
    other = _other_store(Path(root))
    tracemalloc.start()
    try:
        with path.open("rb") as src:
            result = read_archive(src, other)
        peaks["import"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"peaks": peaks, "tree": result.tree.hex(), "expected": snap.tree}


@FORMATS
def test_memory_stays_flat(tmp_path: Path, fmt: str) -> None:
    out = call_in_own_process("tests.transfer.test_archive:_archive_peaks", str(tmp_path), fmt)
    assert out["tree"] == out["expected"]
    peaks = out["peaks"]
    for spool in (True, False):
        peak = peaks[f"export spool={spool}"]
        assert peak < 16 << 20, f"export (spool={spool}) peaked at {peak} bytes"
        # KiB resident: the 40 MiB pack is read through a map, let go every 8 MiB (mapped
        # whole, gz grew by ~44 MiB); zstd's own buffers at level 3 take ~75 MiB of the rest
        grown = peaks[f"resident growth spool={spool}"]
        assert grown < (24 << 10 if fmt == "tar.gz" else 112 << 10), f"resident +{grown} KiB"
    assert peaks["import"] < 24 << 20, f"import peaked at {peaks['import']} bytes"


def test_bad_arguments(store: Store, workspace: Path) -> None:
    snap = take_snapshot(store).snapshot
    with pytest.raises(InvalidInput, match="unknown archive format"):
        write_archive(store, snap, io.BytesIO(), "zip")
    with pytest.raises(InvalidInput, match="level"):
        write_archive(store, snap, io.BytesIO(), "tar.gz", level=12)
    with pytest.raises(InvalidInput, match="unknown archive record"):
        write_archive(store, snap, io.BytesIO(), "tar.gz", records={"bogus": {}})
    wrong = {"thread": get_thread(store, snap.thread).to_dict() | {"id": new_id("thread")}}
    with pytest.raises(InvalidInput, match="not the snapshot's thread"):
        write_archive(store, snap, io.BytesIO(), "tar.gz", records=wrong)


@FORMATS
def test_a_damaged_blob_fails_the_export_as_store_corruption(
    store: Store, workspace: Path, fmt: str
) -> None:
    """A blob whose compressed bytes are damaged in its pack stops the export with one clear
    error (StoreCorrupted), not the decompressor's own exception, and nothing is written."""
    data = _noise(64 << 10)
    (workspace / "data.bin").write_bytes(data)
    snap = take_snapshot(store).snapshot
    found = store.odb.locate_packed(hash_object("blob", data))
    assert found is not None
    pack_path, start = found
    with open(pack_path, "r+b") as pack:
        pack.seek(start + (32 << 10))
        byte = pack.read(1)
        pack.seek(start + (32 << 10))
        pack.write(bytes([byte[0] ^ 0xFF]))
    out = io.BytesIO()
    with pytest.raises(StoreCorrupted, match="corrupt"):
        write_archive(store, snap, out, fmt)
    assert out.getvalue() == b""


@FORMATS
def test_sizes_at_every_read_and_batch_boundary_extract_with_stock_tar(
    store: Store, workspace: Path, tmp_path: Path, fmt: str
) -> None:
    """Blobs read whole in one call (up to CHUNK) and streamed (past it), members queued whole
    into the compressor's batch and those that overflow it: stock tar extracts every byte, and
    both export strategies write the same archive."""
    chunk, batch, block = CHUNK, 128 << 10, 512  # batch: what the member writer queues at once
    sizes = [0, 1, block - 1, block, block + 1, batch - 2 * block, batch - block, batch - 1]
    sizes += [batch, batch + 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3]
    for i, size in enumerate(sizes):
        (workspace / f"f{i:02d}.bin").write_bytes(_noise(size))
    for i in range(300):  # many small members: the batch fills and flushes mid-member
        (workspace / "many" / f"{i:03d}").parent.mkdir(exist_ok=True)
        (workspace / "many" / f"{i:03d}").write_bytes(_noise(i * 37))
    snap = take_snapshot(store).snapshot
    data = _export(store, snap, fmt, spool=True)
    assert _export(store, snap, fmt, spool=False) == data
    raw = gzip.decompress(data) if fmt == "tar.gz" else _unzstd(data)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert len(members) >= 1 + len(sizes) + 300
    for member in members:  # what stock tar ignores: each member is padded with zeros
        end = member.offset_data + member.size
        assert raw[end : end + (-member.size % block)].count(0) == -member.size % block
    if fmt == "tar.zst" and shutil.which("zstd") is None:
        pytest.skip("the zstd CLI is not installed (apt-get install -y zstd)")
    path = tmp_path / f"snap.{fmt}"
    path.write_bytes(data)
    out = tmp_path / "extracted"
    out.mkdir()
    flags = ["-xzf"] if fmt == "tar.gz" else ["--zstd", "-xf"]
    subprocess.run(["tar", *flags, str(path), "-C", str(out)], check=True)
    expected = {k: v for k, v in tree_bytes(workspace).items() if ".narrative" not in k}
    assert tree_bytes(out / "files") == expected


@pytest.mark.parametrize("size", [600, 64 << 10, 3 << 20], ids=["tiny", "small", "multi-chunk"])
@pytest.mark.parametrize(
    ("said", "cut", "error"),
    [
        (0, 0.5, "truncated|corrupt"),  # what follows in the pack is read as deflate data
        (-7, None, "longer than its header says"),
        (7, None, "shorter than its header says"),
        (0, -4, "corrupt|truncated"),  # no adler32 trailer: the stream never ends
    ],
    ids=["cut", "longer", "shorter", "no-trailer"],
)
def test_a_packed_blob_that_does_not_inflate_to_its_size_is_store_corruption(
    store: Store, tmp_path: Path, size: int, said: int, cut: float | None, error: str
) -> None:
    """A blob's stream in its pack that ends early, runs past its header's size or stops short
    of it is refused as StoreCorrupted naming the blob, whether it inflates in one read or
    several."""
    data = _noise(size)
    stream = zlib.compress(data)
    if cut is not None:
        stream = stream[: int(len(stream) * cut)] if cut > 0 else stream[: int(cut)]
    oid = hash_object("blob", data)
    source = _crafted_blob(store, tmp_path, oid, pack_entry_header(3, size + said) + stream)
    assert source.size == size + said
    with pytest.raises(StoreCorrupted, match=f"{oid.hex()}.*({error})"):
        b"".join(source.chunks())


def _crafted_blob(store: Store, tmp_path: Path, oid: bytes, entry: bytes) -> BlobSource:
    """A BlobSource of ``oid``, found by the store in a pack whose one entry is ``entry``
    (pack and index written as git lays them out; the entry's stream as crafted)."""
    body = b"PACK" + struct.pack(">II", 2, 1) + entry
    pack_sha = hashlib.sha1(body).digest()
    pack_dir = Path(store.odb.pack_dir)
    pack_dir.mkdir(parents=True, exist_ok=True)
    (pack_dir / f"pack-{pack_sha.hex()}.pack").write_bytes(body + pack_sha)
    index = encode_index({oid: (12, zlib.crc32(entry))}, pack_sha)
    (pack_dir / f"pack-{pack_sha.hex()}.idx").write_bytes(index)
    store.odb.invalidate()
    return BlobSource(store.odb, oid, PackFiles())


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside"])
def test_export_refuses_escaping_symlinks(store: Store, workspace: Path, target: str) -> None:
    (workspace / "evil").symlink_to(target)
    snap = take_snapshot(store).snapshot
    out = io.BytesIO()
    with pytest.raises(ArchiveError, match="points outside the tree"):
        write_archive(store, snap, out, "tar.gz")
    assert out.getvalue() == b""  # nothing written when the export is refused


def test_error_tree() -> None:
    assert issubclass(ArchiveError, InvalidArtifact) and issubclass(ArchiveError, ValueError)


# ----------------------------------------------------------------------------- hostile corpus


def _blob_id(data: bytes) -> str:
    return hash_object("blob", data).hex()


def _tree_of(files: dict[str, tuple[str, bytes]]) -> str:
    root: dict[str, Any] = {}
    for path, entry in files.items():
        node = root
        *dirs, leaf = path.split("/")
        for part in dirs:
            node = node.setdefault(part, {})
        node[leaf] = entry

    def build(node: dict[str, Any]) -> bytes:
        entries = []
        for name, value in node.items():
            if isinstance(value, dict):
                entries.append((name.encode(), MODE_DIR, build(value)))
            else:
                mode, data = value
                entries.append((name.encode(), int(mode, 8), hash_object("blob", data)))
        return hash_object("tree", encode_tree(entries))

    return build(root).hex()


GOOD_FILES: dict[str, tuple[str, bytes]] = {
    "a.txt": ("100644", b"hello\n"),
    "dir/b.txt": ("100644", b"world\n" * 100),
    "dir/sub/run.sh": ("100755", b"#!/bin/sh\n"),
    "link": ("120000", b"dir/b.txt"),
    "dir/up": ("120000", b"../a.txt"),
}


def build_manifest(files: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    tree = _tree_of(files)
    snapshot = {
        "id": new_id("snapshot"),
        "commit": "c" * 40,
        "tree": tree,
        "thread": new_id("thread"),
        "run": None,
        "parent": None,
        "message": "corpus",
        "created_at": "2024-01-01T00:00:00Z",
        "stats": {"files": len(files)},
        "skipped": [],
        "parent_commit": None,
    }
    entries = [
        {
            "path": path,
            "mode": mode,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "blob": _blob_id(data),
        }
        for path, (mode, data) in files.items()
    ]
    return {
        "version": 1,
        "snapshot": snapshot,
        "objective": None,
        "thread": None,
        "run": None,
        "tree": tree,
        "files": entries,
    }


Member = tuple[tarfile.TarInfo, bytes | None]


def _member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **attrs: Any
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, (data if info.size else None)


def _manifest_member(manifest: dict[str, Any] | bytes) -> Member:
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return _member(MANIFEST_NAME, raw)


def _file_members(files: dict[str, tuple[str, bytes]]) -> list[Member]:
    members = []
    for path, (mode, data) in files.items():
        name = "files/" + path
        if mode == "120000":
            members.append(_member(name, kind=tarfile.SYMTYPE, mode=0o777, linkname=data.decode()))
        else:
            members.append(_member(name, data, mode=0o755 if mode == "100755" else 0o644))
    return members


def _tar(members: list[Member], trailing: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue() + trailing


def _compress(raw: bytes, fmt: str) -> bytes:
    if fmt == "tar.gz":
        return gzip.compress(raw, compresslevel=9, mtime=0)
    return zstandard.ZstdCompressor(level=19, write_checksum=True).compress(raw)


def build_archive(
    files: dict[str, tuple[str, bytes]] | None = None,
    manifest: dict[str, Any] | bytes | None = None,
    members: list[Member] | None = None,
    fmt: str = "tar.gz",
    trailing: bytes = b"",
) -> bytes:
    files = GOOD_FILES if files is None else files
    manifest = build_manifest(files) if manifest is None else manifest
    if members is None:
        members = [_manifest_member(manifest), *_file_members(files)]
    return _compress(_tar(members, trailing), fmt)


@pytest.fixture
def target(tmp_path: Path) -> Store:
    return _other_store(tmp_path, "target")


def _refused(
    store: Store, data: bytes, match: str | None, **limits: int
) -> tuple[ArchiveError, dict[str, int]]:
    """Import must raise ArchiveError matching ``match`` and leave the store as it was."""
    before = _listing(store)
    stream = _CountingStream(data)
    with pytest.raises(ArchiveError, match=match) as info:
        read_archive(stream, store, **limits)
    assert _listing(store) == before
    assert os.listdir(store.odb.tmp_dir) == []
    return info.value, {"raw": stream.count}


class _CountingStream(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.count += len(data)
        return data


@FORMATS
def test_corpus_builder_makes_valid_archives(target: Store, fmt: str) -> None:
    result = read_archive(io.BytesIO(build_archive(fmt=fmt)), target)
    assert result.tree.hex() == _tree_of(GOOD_FILES)
    git("--git-dir", target.git_dir, "fsck", "--no-dangling")


def _with(*extra: Member, drop: str | None = None) -> list[Member]:
    members = [_manifest_member(build_manifest(GOOD_FILES)), *_file_members(GOOD_FILES)]
    members = [m for m in members if m[0].name != drop]
    return [*members, *extra]


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "traversal": (
        lambda: build_archive(members=_with(_member("files/../../etc/x", b"x"))),
        r"archive member files/\.\./\.\./etc/x escapes the tree",
    ),
    "absolute": (
        lambda: build_archive(members=_with(_member("/etc/passwd", b"root"))),
        "has an absolute name",
    ),
    "outside files/": (
        lambda: build_archive(members=_with(_member("other/x", b"x"))),
        r"is outside files/",
    ),
    "not in manifest": (
        lambda: build_archive(members=_with(_member("files/extra.txt", b"x"))),
        "is not listed in the manifest",
    ),
    "missing member": (
        lambda: build_archive(members=_with(drop="files/dir/b.txt")),
        "missing member files/dir/b.txt",
    ),
    "hard link": (
        lambda: build_archive(
            members=_with(_member("files/hl", kind=tarfile.LNKTYPE, linkname="/etc/passwd"))
        ),
        "is a hard link",
    ),
    "char device": (
        lambda: build_archive(members=_with(_member("files/dev", kind=tarfile.CHRTYPE))),
        "is a device file",
    ),
    "block device": (
        lambda: build_archive(members=_with(_member("files/blk", kind=tarfile.BLKTYPE))),
        "is a device file",
    ),
    "fifo": (
        lambda: build_archive(members=_with(_member("files/fifo", kind=tarfile.FIFOTYPE))),
        "is a fifo",
    ),
    "directory as file": (
        lambda: build_archive(
            members=[
                _manifest_member(build_manifest(GOOD_FILES)),
                _member("files/a.txt", kind=tarfile.DIRTYPE, mode=0o755),
            ]
        ),
        "is a directory",
    ),
    "symlink where manifest says file": (
        lambda: build_archive(
            members=[
                _manifest_member(build_manifest(GOOD_FILES)),
                _member("files/a.txt", kind=tarfile.SYMTYPE, linkname="hello\n"),
            ]
        ),
        "is a symlink but the manifest says mode 100644",
    ),
    "file where manifest says symlink": (
        lambda: build_archive(
            members=[
                _manifest_member(build_manifest(GOOD_FILES)),
                _member("files/link", b"dir/b.txt"),
            ]
        ),
        "is a regular file but the manifest says mode 120000",
    ),
    "duplicate member": (
        lambda: build_archive(members=_with(_member("files/a.txt", b"hello\n"))),
        "appears twice",
    ),
    "sha256 lie": (
        lambda: build_archive(
            manifest=build_manifest(GOOD_FILES)
            | {
                "files": [
                    e | {"sha256": "0" * 64} if e["path"] == "a.txt" else e
                    for e in build_manifest(GOOD_FILES)["files"]
                ]
            }
        ),
        "files/a.txt: content does not match its sha256",
    ),
    "blob id lie": (
        lambda: build_archive(
            manifest=build_manifest(GOOD_FILES)
            | {
                "files": [
                    e | {"blob": "1" * 40} if e["path"] == "dir/b.txt" else e
                    for e in build_manifest(GOOD_FILES)["files"]
                ]
            }
        ),
        "files/dir/b.txt: content does not match its blob id",
    ),
    "size lie": (
        lambda: build_archive(
            manifest=build_manifest(GOOD_FILES)
            | {
                "files": [
                    e | {"size": 3} if e["path"] == "a.txt" else e
                    for e in build_manifest(GOOD_FILES)["files"]
                ]
            }
        ),
        "files/a.txt is 6 bytes, the manifest says 3",
    ),
    "tree lie": (
        lambda: build_archive(manifest=_lying_tree(build_manifest(GOOD_FILES))),
        "archive content builds tree",
    ),
    "manifest not first": (
        lambda: build_archive(
            members=[*_file_members(GOOD_FILES), _manifest_member(build_manifest(GOOD_FILES))]
        ),
        "does not start with narrative.json",
    ),
    "manifest is a symlink": (
        lambda: build_archive(members=[_member(MANIFEST_NAME, kind=tarfile.SYMTYPE, linkname="x")]),
        "narrative.json is not a regular file",
    ),
    "manifest not json": (
        lambda: build_archive(manifest=b"{not json"),
        "manifest is not valid JSON",
    ),
    "manifest unknown field": (
        lambda: build_archive(manifest=build_manifest(GOOD_FILES) | {"extra": 1}),
        "unknown field 'extra'",
    ),
    "manifest duplicate key": (
        lambda: build_archive(manifest=b'{"version": 1, "version": 1}'),
        "repeats a key",
    ),
    "manifest NaN": (
        lambda: build_archive(manifest=b'{"version": NaN}'),
        "holds NaN",
    ),
    "manifest bad version": (
        lambda: build_archive(manifest=build_manifest(GOOD_FILES) | {"version": 2}),
        "unsupported archive manifest version 2",
    ),
    "manifest bad mode": (
        lambda: build_archive(manifest=_patched_entry("a.txt", mode="100664")),
        "invalid mode '100664'",
    ),
    "manifest .git path": (
        lambda: build_archive(files={".git/config": ("100644", b"[core]\n")}),
        "a ..git. component",
    ),
    "manifest dot-dot path": (
        lambda: build_archive(manifest=_patched_entry("a.txt", path="dir/../a.txt")),
        "escapes the tree",
    ),
    "manifest absolute path": (
        lambda: build_archive(manifest=_patched_entry("a.txt", path="/a.txt")),
        "is absolute",
    ),
    "manifest unnormalised path": (
        lambda: build_archive(manifest=_patched_entry("a.txt", path="dir//a.txt")),
        "empty path component",
    ),
    "manifest duplicate path": (
        lambda: build_archive(manifest=_patched_entry("a.txt", path="dir/b.txt")),
        "lists 'dir/b.txt' twice",
    ),
    "manifest file and directory": (
        lambda: build_archive(manifest=_patched_entry("a.txt", path="dir/b.txt/x")),
        "'dir/b.txt' is both a file and a directory",
    ),
    "manifest bad hex": (
        lambda: build_archive(manifest=_patched_entry("a.txt", blob="XYZ")),
        "invalid blob id",
    ),
    "manifest bad snapshot": (
        lambda: build_archive(
            manifest=build_manifest(GOOD_FILES)
            | {"snapshot": build_manifest(GOOD_FILES)["snapshot"] | {"id": "../../x"}}
        ),
        "snapshot has an invalid 'id'",
    ),
    "manifest bad thread record": (
        lambda: build_archive(manifest=build_manifest(GOOD_FILES) | {"thread": {"id": "nope"}}),
        "invalid thread record",
    ),
    "symlink escaping": (
        lambda: build_archive(files=GOOD_FILES | {"a": ("120000", b"../../outside")}),
        "symlink a -> ../../outside points outside the tree",
    ),
    "symlink absolute": (
        lambda: build_archive(files=GOOD_FILES | {"abs": ("120000", b"/etc/passwd")}),
        "symlink abs -> /etc/passwd points outside the tree",
    ),
    "symlink escaping through another link": (
        # dir/up2 -> .. is harmless alone; x -> dir/up2/.. climbs above the root through it
        lambda: build_archive(
            files=GOOD_FILES | {"dir/up2": ("120000", b".."), "x": ("120000", b"dir/up2/..")}
        ),
        "symlink x -> dir/up2/.. points outside the tree",
    ),
    "sparse member": (
        lambda: build_archive(
            members=_with(
                _member(
                    "files/sparse",
                    b"abcde",
                    pax_headers={"GNU.sparse.map": "0,5", "GNU.sparse.size": "5"},
                )
            )
        ),
        "unsupported member type|is not listed",
    ),
    "trailing garbage after the end": (
        lambda: build_archive(trailing=b"\x00" * 4096 + b"garbage"),
        "data after its end",
    ),
    "plain text": (lambda: b"hello, I am not an archive at all", "not a narrative archive"),
    "empty input": (lambda: b"", "not a narrative archive"),
    "uncompressed tar": (
        lambda: _tar([_manifest_member(build_manifest(GOOD_FILES)), *_file_members(GOOD_FILES)]),
        "not a narrative archive",
    ),
    "gzip of non-tar": (
        lambda: gzip.compress(b"just some text, no tar here" * 100),
        "corrupt or truncated|does not start",
    ),
    "empty tar": (lambda: _compress(b"\x00" * 10240, "tar.gz"), "empty|corrupt"),
}


def _patched_entry(which: str, **changes: Any) -> dict[str, Any]:
    manifest = build_manifest(GOOD_FILES)
    manifest["files"] = [e | changes if e["path"] == which else e for e in manifest["files"]]
    return manifest


def _lying_tree(manifest: dict[str, Any]) -> dict[str, Any]:
    fake = "ab" * 20
    return manifest | {"tree": fake, "snapshot": manifest["snapshot"] | {"tree": fake}}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(target: Store, case: str) -> None:
    build, match = HOSTILE[case]
    _refused(target, build(), match)


@FORMATS
def test_hostile_zstd_variants(target: Store, fmt: str) -> None:
    """A few cases again in both formats: refusal does not depend on the compression."""
    for members, match in [
        (_with(_member("files/../../etc/x", b"x")), "escapes the tree"),
        (_with(drop="files/a.txt"), "missing member"),
        (_with(_member("files/dev", kind=tarfile.CHRTYPE)), "device"),
    ]:
        _refused(target, build_archive(members=members, fmt=fmt), match)


@FORMATS
def test_corrupted_data_is_refused(target: Store, fmt: str) -> None:
    files = GOOD_FILES | {"noise.bin": ("100644", _noise(200_000))}
    data = build_archive(files=files, fmt=fmt)
    read_archive(io.BytesIO(data), _other_store(Path(target.workspace).parent, "sanity"))
    for pos in (20, len(data) // 4, len(data) // 2, (3 * len(data)) // 4, len(data) - 12):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        _refused(target, bytes(flipped), None)


@FORMATS
def test_truncated_stream_is_refused(target: Store, fmt: str) -> None:
    data = build_archive(fmt=fmt)
    for cut in (5, len(data) // 3, len(data) // 2, len(data) - 40, len(data) - 4, len(data) - 1):
        _refused(target, data[:cut], "truncated|corrupt|missing|not a narrative")


def test_own_archive_truncated_or_flipped(store: Store, workspace: Path, tmp_path: Path) -> None:
    (workspace / "noise.bin").write_bytes(_noise(3 << 20))
    snap = take_snapshot(store).snapshot
    other = _other_store(tmp_path)
    for fmt in ARCHIVE_FORMATS:
        data = _export(store, snap, fmt)
        for cut in (len(data) // 2, len(data) - 8, len(data) - 1):
            _refused(other, data[:cut], None)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        _refused(other, bytes(flipped), None)


def _bomb_tally(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the decompressed bytes the reader actually pulls."""
    tally = [0]
    original = archive_codec.Limited.read

    def counting(self: Any, n: int = -1) -> bytes:
        data = original(self, n)
        tally[0] += len(data)
        return data

    monkeypatch.setattr(archive_codec.Limited, "read", counting)
    return tally


@FORMATS
def test_decompression_bombs_stop_early(
    target: Store, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tally = _bomb_tally(monkeypatch)
    limits = {"max_total": 10 << 20}
    zeros = b"\x00" * (100 << 20)
    # honest manifest declaring a 100 MB member: refused before reading any member data
    files = {"bomb.bin": ("100644", zeros)}
    _refused(target, build_archive(files=files, fmt=fmt), "over the limit of 10485760", **limits)
    assert tally[0] < 1 << 20
    # lying manifest (10 bytes) in front of a 100 MB member: refused at the member's header
    tally[0] = 0
    lie = build_manifest({"bomb.bin": ("100644", b"\x00" * 10)})
    members = [_manifest_member(lie), _member("files/bomb.bin", zeros)]
    _refused(target, build_archive(manifest=lie, members=members, fmt=fmt), "the manifest says 10")
    assert tally[0] < 1 << 20
    # 100 MB of zeros after the end-of-archive blocks
    tally[0] = 0
    _refused(target, build_archive(fmt=fmt, trailing=zeros), "decompresses to more", **limits)
    assert tally[0] < 4 << 20
    # a 100 MB pax header in front of a member
    tally[0] = 0
    raw = _member_bytes(_manifest_member(build_manifest(GOOD_FILES)))
    raw += _pax_block(b"comment=" + b"A" * (100 << 20))
    raw += _member_bytes(_member("files/a.txt", b"hello\n")) + b"\x00" * 1024
    _refused(target, _compress(raw, fmt), "decompresses to more", **limits)
    assert tally[0] < 4 << 20


def _member_bytes(member: Member) -> bytes:
    info, data = member
    body = data or b""
    return info.tobuf(tarfile.PAX_FORMAT) + body + b"\x00" * (-len(body) % tarfile.BLOCKSIZE)


def _pax_block(record: bytes) -> bytes:
    """A pax extended header holding one record (tarfile builds huge ones quadratically)."""
    length = len(record) + 3
    while len(b"%d %s\n" % (length, record)) != length:
        length = len(b"%d %s\n" % (length, record))
    payload = b"%d %s\n" % (length, record)
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(payload)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return header + payload + b"\x00" * (-len(payload) % tarfile.BLOCKSIZE)


def test_limits(target: Store) -> None:
    data = build_archive()
    _refused(target, data, "5 files, over the limit of 4", max_files=4)
    _refused(target, data, "over the limit of 100", max_manifest=100)
    _refused(target, data, "bytes of files, over the limit", max_total=100)


def test_manifest_dict_round_trip() -> None:
    raw = build_manifest(GOOD_FILES)
    manifest = ArchiveManifest.from_dict(raw)
    assert manifest.to_dict() == raw
    assert ArchiveManifest.from_dict(json.loads(manifest.encode())) == manifest
    for bad in (None, [], {"version": 1}, raw | {"files": {}}, raw | {"tree": "A" * 40}):
        with pytest.raises(ArchiveError):
            ArchiveManifest.from_dict(bad)


@pytest.mark.parametrize(
    "path", ["n" * 256, "/".join(["d" * 200] * 21) + "/f"], ids=["name", "path"]
)
def test_paths_longer_than_file_systems_allow_are_refused(target: Store, path: str) -> None:
    archive = build_archive(files={path: ("100644", b"x\n")})
    _refused(target, archive, "longer than file systems allow")


def test_symlink_target_longer_than_file_systems_allow_is_refused(target: Store) -> None:
    """Its length also sets how many header bytes each member may take (parsing cost)."""
    files = GOOD_FILES | {"long-link": ("120000", b"t" * 5000)}
    _refused(target, build_archive(files=files), "longer than file systems allow")
