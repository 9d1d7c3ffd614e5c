"""The stat cache on disk: a small change writes a delta, never a wrong record; old formats and
stale deltas are read safely (stock git's tree ids are the oracle)."""

from __future__ import annotations

import hashlib
import marshal
import os
from pathlib import Path

from narrative.gc import RetentionPolicy, collect_garbage
from narrative.snapshot import take_snapshot
from narrative.statcache import StatCache, cache_path
from narrative.store import Store
from tests.conftest import git_tree_of

_OLD = 1_000_000_000


def _wide_workspace(ws: Path, dirs: int = 40, files: int = 10) -> None:
    for d in range(dirs):
        (ws / f"d{d}").mkdir()
        for f in range(files):
            (ws / f"d{d}" / f"f{f}.txt").write_text(f"{d} {f}\n" * 20)


def _age(ws: Path) -> None:
    """Move every mtime out of the racy window, so the cache trusts every record."""
    for root, _dirs, files in os.walk(ws):
        for name in files:
            os.utime(os.path.join(root, name), (_OLD, _OLD), follow_symlinks=False)


def _edit(path: Path, text: str) -> None:
    """Change one file, its mtime out of the racy window (ageing every file would change every
    ctime, hence every directory's signature)."""
    path.write_text(text)
    os.utime(path, (_OLD, _OLD))


def _paths(store: Store, ws: Path) -> tuple[Path, Path]:
    base = Path(cache_path(store.git_dir, os.path.realpath(ws)))
    return base, base.with_name(base.name + ".delta")


def _settled(store: Store, ws: Path) -> None:
    """A first snapshot, then one more so the cache holds no racy record."""
    take_snapshot(store)
    _age(ws)
    take_snapshot(store, allow_empty=True)


def test_cache_path_is_the_sha1_of_the_workspace_path(tmp_path: Path) -> None:
    """(computed without hashlib's OpenSSL, the name must not change)"""
    ws = str(tmp_path / "wörkspace")
    digest = hashlib.sha1(os.path.abspath(ws).encode("utf-8")).hexdigest()
    assert cache_path("/store", ws) == f"/store/narrative/cache/stat-{digest[:16]}"


def test_small_change_writes_a_delta_and_leaves_the_base(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    _wide_workspace(workspace)
    _settled(store, workspace)
    base, delta = _paths(store, workspace)
    before = base.read_bytes()
    _edit(workspace / "d7" / "f3.txt", "changed\n")
    result = take_snapshot(store)
    assert result.created
    assert base.read_bytes() == before
    assert delta.exists() and delta.stat().st_size < len(before) // 8
    loaded = StatCache.load(str(base), store.config.max_file_size)
    assert loaded.dirs == result.cache.dirs
    assert loaded.head == result.cache.head
    # the next snapshot, from base + delta, hashes nothing and finds git's tree
    again = take_snapshot(store, allow_empty=True).snapshot
    assert again.stats["hashed"] == 0
    assert again.tree == git_tree_of(workspace, tmp_path)


def test_large_change_rewrites_the_base_and_drops_the_delta(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    _wide_workspace(workspace)
    _settled(store, workspace)
    base, delta = _paths(store, workspace)
    _edit(workspace / "d1" / "f1.txt", "one\n")
    take_snapshot(store)
    assert delta.exists()
    before = base.read_bytes()
    for d in range(0, 40, 2):  # half the directories
        _edit(workspace / f"d{d}" / "f0.txt", "many\n")
    snap = take_snapshot(store).snapshot
    assert base.read_bytes() != before and not delta.exists()
    assert snap.tree == git_tree_of(workspace, tmp_path)
    assert take_snapshot(store, allow_empty=True).snapshot.stats["hashed"] == 0


def test_delta_of_another_base_is_ignored(store: Store, workspace: Path, tmp_path: Path) -> None:
    """A delta left beside a base a concurrent writer replaced is never applied to it."""
    _wide_workspace(workspace)
    _settled(store, workspace)
    base, delta = _paths(store, workspace)
    _edit(workspace / "d2" / "f2.txt", "two\n")
    take_snapshot(store)
    stale = delta.read_bytes()
    # another writer rewrites the whole base, for a later state of d2
    StatCache.remove(str(base))
    _edit(workspace / "d2" / "f2.txt", "two again, different\n")
    take_snapshot(store)
    assert base.exists() and not delta.exists()
    delta.write_bytes(stale)  # the stale delta comes back (written late by the first writer)
    _version, token, changed, _removed, _head, _journal, _unvouched = marshal.loads(stale)
    loaded = StatCache.load(str(base), store.config.max_file_size)
    assert loaded.base is not None and loaded.base.token != token
    assert changed["d2"] != loaded.dirs["d2"]  # applying it would change the records
    assert loaded.dirs == loaded.base.dirs
    snap = take_snapshot(store, allow_empty=True).snapshot
    assert snap.stats["hashed"] == 0
    assert snap.tree == git_tree_of(workspace, tmp_path)


def test_format_4_cache_is_read(store: Store, workspace: Path, tmp_path: Path) -> None:
    _wide_workspace(workspace, dirs=5)
    _settled(store, workspace)
    base, _delta = _paths(store, workspace)
    cache = StatCache.load(str(base), store.config.max_file_size)
    dirs = cache.dirs  # (decoded on first use: before the file goes)
    StatCache.remove(str(base))
    base.write_bytes(marshal.dumps((4, cache.max_file_size, dirs, cache.head, cache.journal)))
    snap = take_snapshot(store, allow_empty=True).snapshot
    assert snap.stats["hashed"] == 0  # the old records were used
    assert snap.tree == git_tree_of(workspace, tmp_path)
    assert base.read_bytes()[:4] == b"NSC\x06"  # and rewritten in the new format


def test_gc_removes_a_delta_with_its_base(store: Store, workspace: Path) -> None:
    _wide_workspace(workspace)
    _settled(store, workspace)
    base, delta = _paths(store, workspace)
    _edit(workspace / "d1" / "f1.txt", "one\n")
    take_snapshot(store)
    assert delta.exists()
    # records naming an object gc will not keep: the whole cache must go, delta included
    cache = StatCache.load(str(base), store.config.max_file_size)
    rel, record = next((r, rec) for r, rec in cache.dirs.items() if r == "d1")
    cache.dirs[rel] = (record[0], b"\x01" * 20, *record[2:])
    cache.save(str(base))
    assert delta.exists()
    collect_garbage(store, RetentionPolicy())
    assert not base.exists() and not delta.exists()
