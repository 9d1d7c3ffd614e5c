"""The file watcher (``narrative watch``): snapshots that list only journaled directories must
capture exactly what a full scan and stock git capture, and fall back to the full scan whenever
the journal may be incomplete (no watcher, killed, restarted, queue overflow)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from narrative.snapshot import scan_tree, take_snapshot
from narrative.statcache import StatCache, cache_path
from narrative.store import Store
from narrative.watch import watch_dir
from tests.conftest import Cli, git, git_tree_of, start_watcher
from tests.properties import SOAK

# a watcher process per test and a hypothesis model (about 30 s): make test-long, which CI runs
pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/proc/sys/fs/inotify"), reason="no inotify"),
    pytest.mark.long,
]

settings.register_profile(
    "watch-ci",
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    max_examples=6,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "watch-soak",
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


class Watcher:
    """A real ``narrative watch`` process for one workspace."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_watcher(self.store.git_dir, self.store.workspace)

    def generation(self) -> str:
        state = Path(watch_dir(self.store.git_dir, self.store.workspace), "state")
        return str(json.loads(state.read_text())["generation"])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
            self.proc.stderr.close()  # type: ignore[union-attr]
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None


def _age(root: Path) -> None:
    """Move every mtime a minute back, so no entry is racy (racy directories are re-listed
    whatever the journal says, which would hide what the journal saves)."""
    past = time.time() - 60
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(base, name), (past, past), follow_symlinks=False)


def _cache_records(store: Store) -> dict[str, tuple[object, ...]]:
    """What the stat cache holds for each directory: tree id, counts and skipped entries (not
    its signatures and racy marks, which depend on the moment of the scan)."""
    path = cache_path(store.git_dir, store.workspace)
    cache = StatCache.load(path, store.config.max_file_size)
    return {rel: (r[1], r[2], r[3], r[4]) for rel, r in cache.dirs.items()}


def _rebuilt_cache_records(store: Store) -> dict[str, tuple[object, ...]]:
    """The records a snapshot writes when it starts from no stat cache at all."""
    path = cache_path(store.git_dir, store.workspace)
    for stale in (path, path + ".delta"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    take_snapshot(store, message="from no cache")
    return _cache_records(store)


def _tree(store: Store, use_watcher: bool) -> tuple[str, int, tuple[str, int] | None]:
    result, root, _cache = scan_tree(store, use_watcher=use_watcher)
    return (root.hex() if root else EMPTY_TREE), result.listed, result.journal


ALL_DIRS = 62
"""Directories of the ``watched`` workspace: the root, src, 30 d<i> and their sub."""


@pytest.fixture
def watched(workspace: Path) -> tuple[Store, Watcher]:
    for i in range(30):
        (workspace / f"d{i}" / "sub").mkdir(parents=True)
        (workspace / f"d{i}" / "sub" / "f").write_text(f"file {i}\n")
    _age(workspace)
    store = Store.init(str(workspace))
    watcher = Watcher(store)
    watcher.start()
    yield store, watcher
    watcher.stop()


def test_journal_lists_only_changed_directories(watched: tuple[Store, Watcher]) -> None:
    store, _watcher = watched
    ws = Path(store.workspace)
    take_snapshot(store, message="with the watcher: full scan, records the journal mark")
    tree, listed, mark = _tree(store, use_watcher=True)
    assert mark is not None and listed == 1  # only the root: nothing changed
    (ws / "d7" / "sub" / "f").write_text("file 7 edited in place\n")  # no directory mtime moves
    tree, listed, _mark = _tree(store, use_watcher=True)
    assert listed == 3  # the root, d7, d7/sub
    assert tree == _tree(store, use_watcher=False)[0] == git_tree_of(ws, ws.parent)
    (ws / "d8" / "sub" / "new").write_text("a new file\n")
    tree, listed, _mark = _tree(store, use_watcher=True)
    assert listed == 5  # and d8, d8/sub
    assert tree == git_tree_of(ws, ws.parent)


def test_a_journaled_change_that_changed_nothing_keeps_the_records_below(
    watched: tuple[Store, Watcher],
) -> None:
    """d3 is listed (the journal saw a file come and go) and found as cached, while its sub
    is not listed at all: what lies below sub must stay in the stat cache."""
    store, _watcher = watched
    ws = Path(store.workspace)
    (ws / "d3" / "sub" / "deeper").mkdir()
    (ws / "d3" / "sub" / "deeper" / "g").write_text("deep\n")
    _age(ws)
    take_snapshot(store, message="full scan, records the journal mark")
    before = _cache_records(store)
    assert "d3/sub/deeper" in before
    (ws / "d3" / "passing").write_text("here and gone\n")
    os.unlink(ws / "d3" / "passing")
    result = take_snapshot(store, message="nothing changed")
    assert not result.created
    assert _cache_records(store) == before
    _tree_now, listed, _mark = _tree(store, use_watcher=True)
    assert listed == 2  # the root and d3 (the no-op kept the cache and its journal mark)
    assert before == _rebuilt_cache_records(store)


def test_edit_immediately_before_the_snapshot_is_seen(watched: tuple[Store, Watcher]) -> None:
    store, _watcher = watched
    ws = Path(store.workspace)
    take_snapshot(store, message="base")
    for i in range(20):
        target = ws / f"d{i}" / "sub" / "f"
        with open(target, "r+b") as f:  # same size, in place, mtime put back: only inotify sees it
            before = os.stat(target)
            f.write(b"FILE")
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        result = take_snapshot(store, message=f"edit {i}")
        assert result.created
        assert result.snapshot.tree == git_tree_of(ws, ws.parent)


def test_killed_watcher_means_full_scan(watched: tuple[Store, Watcher]) -> None:
    store, watcher = watched
    ws = Path(store.workspace)
    take_snapshot(store, message="base")
    watcher.stop(signal.SIGKILL)
    (ws / "d3" / "sub" / "f").write_text("edited while the watcher is dead\n")
    tree, listed, mark = _tree(store, use_watcher=True)
    assert mark is None and listed == ALL_DIRS  # every directory
    assert tree == git_tree_of(ws, ws.parent)
    take_snapshot(store, message="no watcher")
    watcher.start()  # a new generation: the cache's mark does not cover the gap
    (ws / "d4" / "sub" / "f").write_text("edited after the restart\n")
    tree, listed, mark = _tree(store, use_watcher=True)
    assert mark is not None and listed == ALL_DIRS
    assert tree == git_tree_of(ws, ws.parent)


def test_queue_overflow_means_full_scan(watched: tuple[Store, Watcher]) -> None:
    store, watcher = watched
    ws = Path(store.workspace)
    take_snapshot(store, message="base")
    generation = watcher.generation()
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    assert watcher.proc is not None
    watcher.proc.send_signal(signal.SIGSTOP)  # events pile up in the kernel queue
    try:
        watched_dir = ws / "d0" / "sub"  # (files in a new directory would cost no events)
        for i in range(limit // 2 + 100):  # a create and a close-write each
            (watched_dir / f"n{i}").write_bytes(b"")
        (ws / "d5" / "sub" / "f").write_text("edited during the overflow\n")
    finally:
        watcher.proc.send_signal(signal.SIGCONT)
    tree, listed, _mark = _tree(store, use_watcher=True)
    assert listed == ALL_DIRS  # full scan
    assert tree == git_tree_of(ws, ws.parent)
    assert watcher.generation() != generation


def test_quiet_journal_no_op_lists_nothing_and_writes_nothing(
    watched: tuple[Store, Watcher],
) -> None:
    """A snapshot for which the journal shows no change takes the stat cache's tree as is (no
    directory listed, no file of the store written); the next edit is still captured, and a
    racy record still makes the directory listed again."""
    store, _watcher = watched
    ws = Path(store.workspace)
    base = take_snapshot(store, message="base").snapshot
    cache_dir = Path(cache_path(store.git_dir, os.path.realpath(ws))).parent
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    result, root, _cache = scan_tree(store, unchanged_ok=True)
    assert result.unchanged and result.listed == 0 and root is not None
    assert root.hex() == base.tree == git_tree_of(ws, ws.parent)
    again = take_snapshot(store, message="nothing changed")
    assert not again.created and again.snapshot.id == base.id
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == before
    target = ws / "d3" / "sub" / "f"
    with open(target, "r+b") as f:  # same size, in place, mtime put back: only inotify sees it
        stat = os.stat(target)
        f.write(b"FILE")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = take_snapshot(store, message="edited")
    assert edited.created and edited.snapshot.tree == git_tree_of(ws, ws.parent)
    (ws / "d4" / "sub" / "new").write_text("racy: written just now\n")
    take_snapshot(store, message="racy")
    result, _root, _cache = scan_tree(store, unchanged_ok=True)
    assert not result.unchanged and result.listed == 3  # the root, d4, d4/sub


def test_quiet_journal_against_another_head_scans(watched: tuple[Store, Watcher]) -> None:
    """The journal shows no change since the cache, but the state to compare with is another
    tree (a restore's safety snapshot): the snapshot is taken from a scan, with its figures."""
    store, _watcher = watched
    ws = Path(store.workspace)
    first = take_snapshot(store, message="first").snapshot
    (ws / "d5" / "sub" / "f").write_text("second state\n")
    _age(ws)
    take_snapshot(store, message="second")
    assert scan_tree(store, unchanged_ok=True)[0].unchanged
    result = take_snapshot(store, message="safety", unchanged_if=bytes.fromhex(first.commit))
    assert result.created
    assert result.snapshot.tree == git_tree_of(ws, ws.parent) != first.tree
    assert result.snapshot.stats["files"] == first.stats["files"] > 0


def test_journal_snapshot_keeps_what_unlisted_subtrees_hold(
    watched: tuple[Store, Watcher],
) -> None:
    """Directories the journal leaves alone are carried over from the cache whole: their files
    count in the figures and their too-large files are still reported as skipped."""
    store, _watcher = watched
    ws = Path(store.workspace)
    store.config.max_file_size = 1000
    (ws / "d1" / "sub" / "deeper").mkdir()
    (ws / "d1" / "sub" / "deeper" / "big.bin").write_bytes(b"x" * 1001)
    _age(ws)
    full = take_snapshot(store, message="full scan").snapshot
    assert full.skipped == [{"path": "d1/sub/deeper/big.bin", "size": 1001, "reason": "too-large"}]
    (ws / "d2" / "sub" / "f").write_text("edited\n")
    result, _root, _cache = scan_tree(store)
    assert result.listed == 3  # the root, d2, d2/sub: d1 and below come from the cache
    journal = take_snapshot(store, message="journal").snapshot
    assert journal.skipped == full.skipped
    assert journal.stats["files"] == full.stats["files"]
    assert journal.stats["bytes"] == full.stats["bytes"] + len("edited\n") - len("file 2\n")
    assert journal.tree == _tree(store, use_watcher=False)[0]  # (git would take big.bin)


def test_new_directory_filled_before_its_watch_is_walked(watched: tuple[Store, Watcher]) -> None:
    store, _watcher = watched
    ws = Path(store.workspace)
    take_snapshot(store, message="base")
    staging = ws.parent / "staging"
    (staging / "a" / "b" / "c").mkdir(parents=True)
    (staging / "a" / "b" / "c" / "deep").write_text("moved in whole\n")
    os.rename(staging, ws / "d1" / "moved")  # one event for a whole tree
    (ws / "d2" / "fresh" / "x").mkdir(parents=True)
    (ws / "d2" / "fresh" / "x" / "y").write_text("created in a burst\n")
    result = take_snapshot(store, message="new trees")
    assert result.snapshot.tree == git_tree_of(ws, ws.parent)
    os.rename(ws / "d1" / "moved", ws / "d2" / "moved")  # and moved again, then edited
    (ws / "d2" / "moved" / "a" / "b" / "c" / "deep").write_text("edited after the move\n")
    result = take_snapshot(store, message="moved tree")
    assert result.snapshot.tree == git_tree_of(ws, ws.parent)
    away = ws.parent / "away"
    os.rename(ws / "d9", away)  # out of the watched tree, edited there, and back
    (away / "sub" / "f").write_text("edited while outside\n")
    os.rename(away, ws / "d9")
    result = take_snapshot(store, message="round trip")
    assert result.created
    assert result.snapshot.tree == git_tree_of(ws, ws.parent)


# --- the model: random edits with the watcher running, stopped, killed or restarted ----------

NAMES = ["a", "b", "c.txt"]
DIRS = ["", "p", "p/q", "r"]
paths = st.builds(
    lambda d, n: f"{d}/{n}" if d else n, st.sampled_from(DIRS), st.sampled_from(NAMES)
)
dirs = st.sampled_from([*DIRS[1:], "p/s", "r/t/u"])
contents = st.binary(min_size=0, max_size=12)


class WatchedWorkspace(RuleBasedStateMachine):
    """Every step's snapshot (watcher or not) equals a full scan and stock git."""

    @initialize()
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="watch-model-"))
        self.ws = self.tmp / "ws"
        self.ws.mkdir()
        (self.ws / "seed").write_text("seed\n")
        self.store = Store.init(str(self.ws))
        self.watcher = Watcher(self.store)
        self.watcher.start()

    def teardown(self) -> None:
        if hasattr(self, "watcher"):
            self.watcher.stop(signal.SIGKILL)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _path(self, rel: str) -> Path:
        return self.ws / rel

    def _files(self) -> list[str]:
        found = []
        for base, dnames, fnames in os.walk(self.ws):
            dnames[:] = [d for d in dnames if d != ".narrative"]
            for name in fnames:
                found.append(os.path.relpath(os.path.join(base, name), self.ws))
        return sorted(found)

    def _clear_for_file(self, rel: str) -> Path:
        target = self._path(rel)
        for ancestor in reversed(target.relative_to(self.ws).parents):
            p = self.ws / ancestor
            if p.is_symlink() or p.is_file():
                p.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        return target

    @rule(rel=paths, data=contents)
    def write(self, rel: str, data: bytes) -> None:
        target = self._clear_for_file(rel)
        if target.is_symlink():
            target.unlink()
        target.write_bytes(data)

    @rule(pick=st.integers(0, 50), data=contents, keep_mtime=st.booleans())
    def rewrite_in_place(self, pick: int, data: bytes, keep_mtime: bool) -> None:
        files = [f for f in self._files() if not self._path(f).is_symlink()]
        if not files:
            return
        target = self._path(files[pick % len(files)])
        before = os.stat(target)
        size = before.st_size
        with open(target, "r+b") as f:
            f.write((data * (size + 1))[:size] if data else b"\0" * size)
        if keep_mtime:
            os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))

    @rule(pick=st.integers(0, 50))
    def chmod(self, pick: int) -> None:
        files = [f for f in self._files() if not self._path(f).is_symlink()]
        if files:
            target = self._path(files[pick % len(files)])
            os.chmod(target, os.stat(target).st_mode ^ 0o111)

    @rule(pick=st.integers(0, 50), dest=paths)
    def rename_file(self, pick: int, dest: str) -> None:
        files = self._files()
        if files:
            source = self._path(files[pick % len(files)])
            content = source.read_bytes() if not source.is_symlink() else None
            target = self._clear_for_file(dest)
            if source.exists() or source.is_symlink():
                os.replace(source, target)
            elif content is not None:
                target.write_bytes(content)

    @rule(pick=st.integers(0, 50))
    def delete_file(self, pick: int) -> None:
        files = self._files()
        if files:
            self._path(files[pick % len(files)]).unlink()

    @rule(rel=dirs)
    def delete_dir(self, rel: str) -> None:
        target = self._path(rel)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)

    @rule(source=dirs, dest=dirs)
    def rename_dir(self, source: str, dest: str) -> None:
        src, dst = self._path(source), self._path(dest)
        if not src.is_dir() or src.is_symlink() or dst.exists() or dst.is_symlink():
            return
        if dst.is_relative_to(src):
            return
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
        except OSError:
            return  # a file or symlink where a parent directory would go

    @rule(rel=dirs, pick=st.integers(0, 50), data=contents)
    def edit_outside(self, rel: str, pick: int, data: bytes) -> None:
        """Move a directory out of the workspace, edit a file in it there, move it back."""
        source = self._path(rel)
        if not source.is_dir() or source.is_symlink():
            return
        away = self.tmp / "away"
        os.rename(source, away)
        files = sorted(str(p) for p in away.rglob("*") if p.is_file() and not p.is_symlink())
        if files:
            Path(files[pick % len(files)]).write_bytes(data + b"!")
        os.rename(away, source)

    @rule(rel=paths, pointing_to=st.sampled_from(["a", "../x", "p/q"]))
    def symlink(self, rel: str, pointing_to: str) -> None:
        link = self._clear_for_file(rel)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(pointing_to, link)

    @rule(pattern=st.sampled_from(["", "a\n", "*.txt\n", "q/\n"]))
    def gitignore(self, pattern: str) -> None:
        (self.ws / ".gitignore").write_text(pattern)

    @rule(kill=st.booleans())
    def stop_or_start_watcher(self, kill: bool) -> None:
        """Stop the watcher (SIGTERM, or SIGKILL leaving its state behind), or start one."""
        if self.watcher.running:
            self.watcher.stop(signal.SIGKILL if kill else signal.SIGTERM)
        else:
            self.watcher.start()

    @invariant()
    def snapshot_equals_full_scan_and_git(self) -> None:
        if not hasattr(self, "store"):
            return
        watched, listed, mark = _tree(self.store, use_watcher=True)
        event("journal" if mark is not None and listed < _dir_count(self.ws) else "full scan")
        snap = take_snapshot(self.store, message="step").snapshot
        full, _listed, _mark = _tree(self.store, use_watcher=False)
        oracle = git_tree_of(self.ws, self.tmp)
        assert watched == snap.tree == full == oracle
        # the stat cache the snapshots left (nodes only for what changed, the records of
        # unchanged subtrees carried over) holds what one built from nothing holds: no record
        # lost, none kept for a directory that is gone
        assert _cache_records(self.store) == _rebuilt_cache_records(self.store)
        # Age every entry and let a snapshot absorb it, so the next step's cache has no racy
        # directory: those are re-listed whatever the journal says, which would hide a miss.
        _age(self.ws)
        take_snapshot(self.store, message="aged")


def _dir_count(ws: Path) -> int:
    return sum(1 for _ in os.walk(ws)) - sum(1 for _ in os.walk(ws / ".narrative"))


WatchedWorkspace.TestCase.settings = settings.get_profile("watch-soak" if SOAK else "watch-ci")
test_watched_workspace_model = WatchedWorkspace.TestCase


def test_watcher_stops_when_the_workspace_goes(watched: tuple[Store, Watcher]) -> None:
    store, watcher = watched
    ws = Path(store.workspace)
    take_snapshot(store, message="base")
    os.rename(ws, ws.parent / "elsewhere")
    assert watcher.proc is not None
    assert watcher.proc.wait(timeout=30) == 1
    last = watcher.proc.communicate()[1].decode().strip().splitlines()[-1]  # after "watching …"
    assert last.startswith("narrative: error: cannot watch"), last
    watcher.proc = None
    os.rename(ws.parent / "elsewhere", ws)
    (ws / "d6" / "sub" / "f").write_text("edited with no watcher\n")
    tree, listed, mark = _tree(store, use_watcher=True)
    assert mark is None and listed == ALL_DIRS
    assert tree == git_tree_of(ws, ws.parent)


def test_ignore_rule_changes_mean_full_scan(watched: tuple[Store, Watcher]) -> None:
    store, _watcher = watched
    ws = Path(store.workspace)
    git("init", "-q", cwd=ws)  # a .git appears: its info/exclude now holds rules
    take_snapshot(store, message="base")
    (ws / ".git" / "info" / "exclude").write_text("d3/\n")
    tree, listed, mark = _tree(store, use_watcher=True)
    assert mark is not None and listed == ALL_DIRS - 2  # full scan; d3 and d3/sub left out
    assert tree == _tree(store, use_watcher=False)[0]
    take_snapshot(store, message="d3 excluded")
    (ws / "d4" / ".gitignore").write_text("sub/\n")  # (d3 is untouched: no event there)
    tree, listed, _mark = _tree(store, use_watcher=True)
    assert listed == ALL_DIRS - 3  # full scan; d4/sub left out too
    assert tree == _tree(store, use_watcher=False)[0]


def test_cli_background_and_stop(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    pid = int(cli.run("watch", "--background").stdout)
    again = cli.run("watch", "--background", check=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already running" in again.stderr
    (workspace / "src" / "app.py").write_text("print('edited')\n")
    snap = cli.json("snapshot", "-m", "watched")
    assert snap["tree"] == git_tree_of(workspace, workspace.parent)
    cli.run("watch", "--stop")
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    gone = cli.run("watch", "--stop", check=False)
    assert gone.returncode == 1 and "no watcher" in gone.stderr
