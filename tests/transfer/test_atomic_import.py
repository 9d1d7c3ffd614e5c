"""A refused import leaves the whole store byte-identical (objects, refs, records, config).

Each hostile artifact is published with its sha256 sidecar and imported through the public
``import_`` entry point, as ``narrative import`` does; the store directory is hashed file by
file before and after.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from narrative.errors import NarrativeError
from narrative.objects import MODE_DIR, MODE_FILE, Commit, Signature, encode_commit, encode_tree
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import git
from tests.transfer.test_archive import GOOD_FILES, build_archive, build_manifest
from tests.transfer.test_fsck_import import store_listing
from transfer.bundle import write_bundle
from transfer.importer import import_, import_stream
from transfer.records import BUNDLE_META_REF


def _publish(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    (tmp_path / f"{name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    return str(path)


def _archive_bad_created_at(store: Store) -> tuple[str, bytes]:
    manifest = build_manifest(GOOD_FILES)
    manifest["snapshot"]["created_at"] = "yesterday"
    return "bad-time.tar.gz", build_archive(manifest=manifest)


def _archive_parent_is_a_blob(store: Store) -> tuple[str, bytes]:
    """The manifest's parent_commit names a blob the store holds: must not become a parent."""
    manifest = build_manifest(GOOD_FILES)
    blob = store.odb.write_loose("blob", b"not a commit\n")
    manifest["snapshot"]["parent_commit"] = blob.hex()
    manifest["snapshot"]["parent"] = None
    return "parent-blob.tar.gz", build_archive(manifest=manifest)


def _bundle_nested_record(store: Store) -> tuple[str, bytes]:
    """A valid snapshot whose thread record is JSON nested 100,000 deep."""
    snap = take_snapshot(store).snapshot
    blob = store.odb.write_loose("blob", b"[" * 100_000 + b"]" * 100_000)
    threads = store.odb.write_loose(
        "tree", encode_tree([(f"{snap.thread}.json".encode(), MODE_FILE, blob)])
    )
    root = store.odb.write_loose("tree", encode_tree([(b"threads", MODE_DIR, threads)]))
    sig = Signature("x", "x@example.com", 1_700_000_000)
    meta = store.odb.write_loose("commit", encode_commit(Commit(root, (), sig, sig, "records")))
    buf = io.BytesIO()
    write_bundle(
        store.odb,
        buf,
        {store.thread_ref(snap.thread): bytes.fromhex(snap.commit), BUNDLE_META_REF: meta},
    )
    return "nested.bundle", buf.getvalue()


HOSTILE: dict[str, tuple[Callable[[Store], tuple[str, bytes]], bool]] = {
    # case → (builder, whether the import must be refused; otherwise it must keep git valid)
    "archive-bad-created-at": (_archive_bad_created_at, True),
    "bundle-nested-record": (_bundle_nested_record, True),
    "archive-parent-is-a-blob": (_archive_parent_is_a_blob, False),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_refused_import_leaves_the_store_byte_identical(
    store: Store, tmp_path: Path, case: str
) -> None:
    build, refused = HOSTILE[case]
    target_ws = tmp_path / "target"
    target_ws.mkdir()
    target = Store.init(str(target_ws))
    name, data = build(target if case == "archive-parent-is-a-blob" else store)
    url = _publish(tmp_path, name, data)
    before = store_listing(target.git_dir)
    if refused:
        with pytest.raises(NarrativeError):
            import_(target, url)
        assert store_listing(target.git_dir) == before
    else:
        import_(target, url)
    git("--git-dir", target.git_dir, "fsck", "--strict", "--no-dangling")


def _header_parse_seconds(store: Store, line_bytes: int) -> float:
    """Time to refuse a bundle whose header holds one ``line_bytes`` long comment line."""
    import time

    data = b"# v2 git bundle\n-" + b"a" * 40 + b" " + b"x" * line_bytes + b"\n\n"
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        with pytest.raises(NarrativeError):
            import_stream(store, io.BytesIO(data), "long-header.bundle", "long")
        best = min(best, time.perf_counter() - started)
    return best


def test_bundle_header_parsing_is_linear(store: Store) -> None:
    """4x the header bytes may cost about 4x the time, not 16x (byte-by-byte line reads with
    re-joining were quadratic: 1 MB took seconds)."""
    small = _header_parse_seconds(store, 200_000)
    large = _header_parse_seconds(store, 800_000)
    assert large < 8 * max(small, 1e-3), (small, large)
