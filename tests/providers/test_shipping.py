"""Hostile tars coming back from an environment: refused, nothing written outside, store as
it was; both when the snapshot is built from the stream and when the tar is extracted first
(``extract``; :mod:`tests.providers.test_tar_snapshot` compares the two on random tars)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from narrative.errors import InvalidInput
from narrative.hierarchy import create_thread
from narrative.objects import parse_tree
from narrative.store import Store
from providers.shipping import scratch_dir, snapshot_from_tar


def _tar(*members: tuple[str, str, bytes | str]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
                tar.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
                tar.addfile(info)
            elif kind == "dev":
                info.type = tarfile.CHRTYPE
                tar.addfile(info)
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out.seek(0)
    return out


def _state(store: Store) -> tuple[dict[str, bytes], list[str]]:
    packs = sorted(p.name for p in (Path(store.git_dir) / "objects" / "pack").iterdir())
    return store.refs.list("refs/"), packs


@pytest.mark.parametrize(
    "members",
    [
        [("../evil", "file", b"x")],
        [("/abs/evil", "file", b"x")],
        [("out", "link", "{outside}"), ("out/planted", "file", b"x")],
        [("d/../../evil", "link", "x")],
        [("dev", "dev", b"")],
        [("hard", "hard", "/etc/passwd")],
        [("small", "file", b"x" * 1000), ("big", "file", b"x" * 1000)],
    ],
    ids=[
        "dotdot",
        "absolute",
        "through-symlink",
        "symlink-dotdot-name",
        "device",
        "hardlink-out",
        "over-the-limit",
    ],
)
@pytest.mark.parametrize("extract", [False, True], ids=["stream", "extract"])
def test_hostile_members_are_refused(
    store: Store, tmp_path: Path, members: list[tuple[str, str, bytes | str]], extract: bool
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    resolved = [
        (n, k, p.format(outside=outside) if isinstance(p, str) else p) for n, k, p in members
    ]
    thread = create_thread(store, store.config.default_objective, "hostile").id
    before = _state(store)
    scratch = scratch_dir(store, "env-test")
    with pytest.raises(InvalidInput):
        snapshot_from_tar(
            store,
            _tar(*resolved),
            scratch,
            thread,
            None,
            "hostile",
            max_bytes=1500,
            extract=extract,
        )
    assert list(outside.iterdir()) == []
    assert _state(store) == before
    assert not Path(scratch).exists()


@pytest.mark.parametrize("extract", [False, True], ids=["stream", "extract"])
def test_links_are_data_and_the_tree_is_exact(store: Store, extract: bool) -> None:
    thread = create_thread(store, store.config.default_objective, "ok").id
    tar = _tar(
        ("work/abs", "link", "/usr/bin/python3"),
        ("work/sub/up", "link", "../../.."),
        ("work/sub/file.txt", "file", b"hello\n"),
    )
    snap = snapshot_from_tar(
        store, tar, scratch_dir(store, "env-test"), thread, None, "m", "work/", extract=extract
    )
    tree = entries(store, bytes.fromhex(snap.tree))
    assert tree["abs"] == (0o120000, b"/usr/bin/python3")
    sub = entries(store, tree["sub"][1])
    assert sub["up"] == (0o120000, b"../../..") and sub["file.txt"] == (0o100644, b"hello\n")


def entries(store: Store, tree: bytes) -> dict[str, tuple[int, bytes]]:
    """name → (mode, blob content, or the subtree id for directories)."""
    out = {}
    for name, mode, oid in parse_tree(store.odb.read(tree)[1]):
        out[name.decode()] = (mode, oid if mode == 0o040000 else store.odb.read(oid)[1])
    return out


def test_snapshot_tar_chunks_streams_the_same_tar_and_stops_when_left(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from narrative.snapshot import take_snapshot
    from providers import shipping

    for i in range(40):
        (Path(store.workspace) / f"f{i}.bin").write_bytes(bytes([i]) * 70_000)
    snapshot = take_snapshot(store, message="input").snapshot
    whole = io.BytesIO()
    shipping.write_snapshot_tar(store, snapshot, whole)
    with shipping.snapshot_tar_chunks(store, snapshot) as chunks:
        assert b"".join(chunks) == whole.getvalue()
    # a reader that stops after one chunk does not leave the writer blocked
    monkeypatch.setattr(shipping, "_QUEUED_CHUNKS", 1)
    monkeypatch.setattr(shipping, "_CHUNK", 4096)
    with shipping.snapshot_tar_chunks(store, snapshot) as chunks:
        assert len(next(chunks)) >= 4096
    # an error writing the tar is raised by the reader
    monkeypatch.setattr(store.odb, "read", lambda oid: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(OSError, match="gone"), shipping.snapshot_tar_chunks(store, snapshot) as c:
        b"".join(c)
