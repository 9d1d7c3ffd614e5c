"""Bundles written without the git CLI, read by stock git."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

from narrative.hierarchy import create_thread
from narrative.meta import META_REF
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git
from transfer.bundle import write_bundle


def _bundle(
    store: Store, path: Path, refs: dict[str, bytes], prerequisites: dict[bytes, str] | None = None
) -> int:
    buf = io.BytesIO()
    stats = write_bundle(store.odb, buf, refs, prerequisites)
    path.write_bytes(buf.getvalue())
    assert stats.size == len(buf.getvalue())
    return stats.objects


def _all_refs(store: Store) -> dict[str, bytes]:
    return store.refs.list("refs/narrative/")


def test_full_bundle_verifies_and_fetches(store: Store, workspace: Path, tmp_path: Path) -> None:
    (workspace / "run.sh").write_text("#!/bin/sh\n")
    (workspace / "run.sh").chmod(0o755)
    (workspace / "link").symlink_to("README.md")
    first = take_snapshot(store).snapshot
    fork = create_thread(store, store.config.default_objective, "fork", first.id)
    (workspace / "fork.txt").write_text("fork\n")
    forked = take_snapshot(store, fork.id).snapshot
    bundle = tmp_path / "all.bundle"
    _bundle(store, bundle, _all_refs(store))
    clone = tmp_path / "clone.git"
    git("init", "-q", "--bare", str(clone))
    git("--git-dir", str(clone), "bundle", "verify", str(bundle))
    heads = git("bundle", "list-heads", str(bundle), cwd=tmp_path)
    assert f"{forked.commit} refs/narrative/threads/{fork.id}" in heads
    assert META_REF in heads
    git("--git-dir", str(clone), "fetch", "-q", str(bundle), "refs/narrative/*:refs/narrative/*")
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    tree = git("--git-dir", str(clone), "rev-parse", f"refs/narrative/threads/{fork.id}^{{tree}}")
    assert tree.strip() == forked.tree


def test_incremental_bundle_is_small(store: Store, workspace: Path, tmp_path: Path) -> None:
    for i in range(40):
        sub = workspace / f"dir{i}"
        sub.mkdir()
        (sub / "data.bin").write_bytes(bytes([i]) * 20_000)
    base = take_snapshot(store).snapshot
    full = tmp_path / "full.bundle"
    ref = store.thread_ref(store.config.default_thread)
    _bundle(store, full, {ref: bytes.fromhex(base.commit)})
    (workspace / "dir7" / "data.bin").write_bytes(b"changed")
    after = take_snapshot(store).snapshot
    inc = tmp_path / "inc.bundle"
    count = _bundle(
        store, inc, {ref: bytes.fromhex(after.commit)}, {bytes.fromhex(base.commit): "base"}
    )
    assert count == 4  # commit, root tree, dir7 tree, blob
    assert inc.stat().st_size < 16 * 1024
    clone = tmp_path / "clone.git"
    git("init", "-q", "--bare", str(clone))
    # stock git refuses the incremental bundle until the prerequisite is present ...
    proc = subprocess.run(
        ["git", "--git-dir", str(clone), "bundle", "verify", str(inc)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and base.commit in proc.stderr
    git("--git-dir", str(clone), "fetch", "-q", str(full), f"{ref}:{ref}")
    git("--git-dir", str(clone), "bundle", "verify", str(inc))
    git("--git-dir", str(clone), "fetch", "-q", str(inc), f"{ref}:{ref}")
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    assert git("--git-dir", str(clone), "rev-parse", ref).strip() == after.commit


def test_header_round_trip_and_hostile_headers(store: Store, workspace: Path) -> None:
    import pytest

    from transfer.bundle import BundleFormatError, read_bundle_header

    snap = take_snapshot(store).snapshot
    buf = io.BytesIO()
    ref = store.thread_ref(store.config.default_thread)
    write_bundle(store.odb, buf, {ref: bytes.fromhex(snap.commit)}, {b"\x01" * 20: "base"})
    buf.seek(0)
    header = read_bundle_header(buf)
    assert header.refs == {ref: bytes.fromhex(snap.commit)}
    assert header.prerequisites == {b"\x01" * 20: "base"}
    assert buf.read(4) == b"PACK"
    oid = snap.commit
    hostile = [
        b"# v3 git bundle\n",
        b"not a bundle at all",
        b"# v2 git bundle\n" + f"{oid} refs/heads/main\n\n".encode(),
        b"# v2 git bundle\n" + f"{oid} refs/narrative/../../HEAD\n\n".encode(),
        b"# v2 git bundle\n" + f"{oid} refs/narrative/a\n{oid} refs/narrative/a\n\n".encode(),
        b"# v2 git bundle\n" + b"xyz refs/narrative/a\n\n",
        b"# v2 git bundle\n" + f"{oid} refs/narrative/a\n".encode(),  # no blank line
        b"# v2 git bundle\n\n",
    ]
    for raw in hostile:
        with pytest.raises(BundleFormatError):
            read_bundle_header(io.BytesIO(raw))


def test_incremental_bundle_deltas_a_small_edit_of_a_big_file(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    import os

    big = os.urandom(1 << 20)
    (workspace / "big.bin").write_bytes(big)
    base = take_snapshot(store).snapshot
    (workspace / "big.bin").write_bytes(big[:5000] + b"XY" + big[5002:])
    after = take_snapshot(store).snapshot
    ref = store.thread_ref(store.config.default_thread)
    inc = tmp_path / "inc.bundle"
    _bundle(store, inc, {ref: bytes.fromhex(after.commit)}, {bytes.fromhex(base.commit): "b"})
    assert inc.stat().st_size < 4096
    full = tmp_path / "full.bundle"
    _bundle(store, full, {ref: bytes.fromhex(base.commit)})
    # stock git applies the delta against the prerequisite's blob
    clone = tmp_path / "clone.git"
    git("init", "-q", "--bare", str(clone))
    git("--git-dir", str(clone), "fetch", "-q", str(full), f"{ref}:{ref}")
    git("--git-dir", str(clone), "fetch", "-q", str(inc), f"{ref}:{ref}")
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    # and so does our own intake, into a store holding only the base

    assert _through_our_intake(store, tmp_path, base, after, ref) < 8192


def _fetch_on_top_of(store: Store, tmp_path: Path, base: str, inc: Path, ref: str) -> Path:
    """A bare git repository holding ``base`` (from a full bundle), then ``inc`` fetched on top
    and checked with ``git fsck --strict``."""
    full = tmp_path / "base.bundle"
    _bundle(store, full, {ref: bytes.fromhex(base)})
    clone = tmp_path / "onto.git"
    git("init", "-q", "--bare", str(clone))
    git("--git-dir", str(clone), "fetch", "-q", str(full), f"{ref}:{ref}")
    git("--git-dir", str(clone), "bundle", "verify", str(inc))
    git("--git-dir", str(clone), "fetch", "-q", str(inc), f"{ref}:{ref}")
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    return clone


def _through_our_intake(store: Store, tmp_path: Path, base: Any, after: Any, ref: str) -> int:
    """Export ``base`` whole and ``after`` incrementally, import both into a fresh store with
    our own code (which must resolve the deltas) and check it with ``git fsck --strict``;
    the incremental export's size."""
    from transfer.exporter import export
    from transfer.importer import import_

    export(store, str(tmp_path / "e-full.bundle"), snapshot=base.id)
    small = export(store, str(tmp_path / "e-inc.bundle"), since=base.id)
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    other = Store.init(str(other_ws))
    import_(other, str(tmp_path / "e-full.bundle"))
    import_(other, str(tmp_path / "e-inc.bundle"))
    assert other.refs.read(ref) == bytes.fromhex(after.commit)
    git("--git-dir", other.git_dir, "fsck", "--strict", "--no-dangling")
    return int(small.size)


def _incremental(store: Store, tmp_path: Path, base: Any, after: Any) -> tuple[int, str]:
    """The size of the incremental bundle from snapshot ``base`` to ``after`` on the default
    thread, which stock git fetches on top of ``base`` to exactly ``after``; and the ref."""
    ref = store.thread_ref(store.config.default_thread)
    inc = tmp_path / "inc.bundle"
    _bundle(store, inc, {ref: bytes.fromhex(after.commit)}, {bytes.fromhex(base.commit): "b"})
    clone = _fetch_on_top_of(store, tmp_path, base.commit, inc, ref)
    assert git("--git-dir", str(clone), "rev-parse", ref).strip() == after.commit
    return inc.stat().st_size, ref


def test_incremental_bundle_deltas_an_overwrite_in_the_middle_plus_an_append(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """The edit the transfer bench makes (a marker written mid-file, another appended): a
    prefix/suffix delta had to send everything after the marker as a literal."""
    import random

    rng = random.Random(7)
    content = bytearray(rng.randbytes(200_000))
    (workspace / "data.bin").write_bytes(content)
    base = take_snapshot(store).snapshot
    content[61_234 : 61_234 + 40] = b"<<touch marker 0123456789abcdef>>\n".ljust(40, b"-")
    content += b"<<appended marker>>\n" * 3
    (workspace / "data.bin").write_bytes(content)
    after = take_snapshot(store).snapshot
    size, _ref = _incremental(store, tmp_path, base, after)
    assert size < 2048


class _CountingStore:
    """The store's object database, counting the trees it is asked for."""

    def __init__(self, odb: object) -> None:
        self._odb = odb
        self.trees = 0

    def read(self, oid: bytes) -> tuple[str, bytes]:
        kind, data = self._odb.read(oid)  # type: ignore[attr-defined]
        self.trees += kind == "tree"
        return kind, data

    def __getattr__(self, name: str) -> object:
        return getattr(self._odb, name)


def test_incremental_bundle_reads_only_the_changed_paths_of_the_prerequisite(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    for i in range(60):
        for j in range(5):
            sub = workspace / f"top{i}" / f"mid{j}"
            sub.mkdir(parents=True)
            (sub / "f.txt").write_text(f"{i} {j}\n")
    base = take_snapshot(store).snapshot
    (workspace / "top3" / "mid2" / "f.txt").write_text("changed\n")
    after = take_snapshot(store).snapshot
    ref = store.thread_ref(store.config.default_thread)
    counting = _CountingStore(store.odb)
    buf = io.BytesIO()
    stats = write_bundle(
        counting,  # type: ignore[arg-type]
        buf,
        {ref: bytes.fromhex(after.commit)},
        {bytes.fromhex(base.commit): "b"},
    )
    assert stats.objects == 5  # commit, root, top3, mid2, blob
    # both sides of the changed path (for selection, then for deltas), not the
    # prerequisite's 361 trees
    assert counting.trees <= 24
    inc = tmp_path / "inc.bundle"
    inc.write_bytes(buf.getvalue())
    _fetch_on_top_of(store, tmp_path, base.commit, inc, ref)


def test_incremental_bundle_deltas_the_trees_on_a_deep_changed_path(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """A small file changed deep in wide directories: the trees on its path, not the file,
    were most of the bundle until they were sent as deltas against the prerequisite's."""
    path = workspace
    for depth in range(5):
        for i in range(60):
            (path / f"sibling-{depth}-{i}.txt").write_text(f"{depth} {i}\n")
        path = path / f"level{depth}"
        path.mkdir()
    (path / "small.txt").write_text("before\n")
    base = take_snapshot(store).snapshot
    (path / "small.txt").write_text("after\n")
    after = take_snapshot(store).snapshot
    size, ref = _incremental(store, tmp_path, base, after)
    assert size < 1200  # six trees of ~2.6 KiB each: 10 KiB when sent whole
    # our own intake resolves the tree deltas against its store

    _through_our_intake(store, tmp_path, base, after, ref)


def test_raw_runs_match_raw_entry_and_skip_deltas(store: Store, workspace: Path) -> None:
    """The bulk pack reader the full export uses gives runs that are the stored entries byte
    for byte as the one-by-one reader gives them, back to back, and leaves deltified entries
    (from a git repack) out."""
    text = "".join(f"line {i}\n" for i in range(3000))
    for i in range(30):
        (workspace / f"f{i}.txt").write_text(text + f"variant {i}\n")
    snap = take_snapshot(store).snapshot
    git("--git-dir", store.git_dir, "repack", "-a", "-d", "-f", "-q", "--depth=10")
    store.odb.invalidate()
    oids = [
        bytes.fromhex(line.split()[0])
        for line in git(
            "--git-dir", store.git_dir, "rev-list", "--objects", snap.commit
        ).splitlines()
    ]
    one_by_one = {oid: store.odb.raw_entry(oid) for oid in oids}
    runs = list(store.odb.raw_runs(oids))
    for run_oids, data in runs:
        assert data == b"".join(one_by_one[oid] or b"" for oid in run_oids)
    bulk = [oid for run_oids, _data in runs for oid in run_oids]
    assert sorted(bulk) == sorted(oid for oid, entry in one_by_one.items() if entry is not None)
    assert len(bulk) < len(oids)  # the repack made deltas, which are left out
    assert len(runs) > 1  # and split the runs around them


def _mebibytes_of_snapshots(store: Store, workspace: Path) -> list[str]:
    """Two snapshots of incompressible files, several MiB of pack: the export's writer thread
    and whole-run copies are used (small bundles take neither)."""
    import random

    rng = random.Random(7)
    for i in range(24):
        (workspace / f"big{i}.bin").write_bytes(rng.randbytes(200_000 + i))
    first = take_snapshot(store).snapshot
    (workspace / "big3.bin").write_bytes(rng.randbytes(150_000))
    (workspace / "sub").mkdir()
    (workspace / "sub" / "small.txt").write_text("x\n")
    second = take_snapshot(store).snapshot
    return [first.commit, second.commit]


def test_a_bundle_of_several_mebibytes_clones_with_stock_git(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    commits = _mebibytes_of_snapshots(store, workspace)
    bundle = tmp_path / "big.bundle"
    with bundle.open("wb") as f:
        stats = write_bundle(store.odb, f, _all_refs(store))
    assert stats.size == bundle.stat().st_size > 4 << 20
    empty = tmp_path / "empty.git"
    git("init", "-q", "--bare", str(empty))
    git("--git-dir", str(empty), "bundle", "verify", "-q", str(bundle))
    clone = tmp_path / "clone.git"
    git("clone", "-q", "--mirror", str(bundle), str(clone))
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    ref = store.thread_ref(store.config.default_thread)
    assert git("--git-dir", str(clone), "rev-parse", ref).strip() == commits[-1]
    assert git("--git-dir", str(clone), "rev-parse", f"{ref}~1").strip() == commits[0]


def test_a_sink_failing_mid_pack_fails_the_export(store: Store, workspace: Path) -> None:
    """An error of the sink (written to on the writer thread) surfaces on the caller's thread,
    and the export neither hangs nor writes the trailer after it."""
    import pytest

    _mebibytes_of_snapshots(store, workspace)

    class Failing:
        def __init__(self) -> None:
            self.written = 0

        def write(self, data: bytes) -> None:
            if self.written > 1 << 20:
                raise OSError(28, "No space left on device")
            self.written += len(data)

    sink = Failing()
    with pytest.raises(OSError, match="No space left"):
        write_bundle(store.odb, sink, _all_refs(store))
    assert sink.written < 4 << 20
