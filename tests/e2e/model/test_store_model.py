"""Model-based test of the promise "your work is never lost" (issue 12).

Two workspaces, each a real git repository with its own store, and two shared remotes: a
directory (``file://``, which killed subprocesses share) and ``memory://``. Hypothesis drives
random sequences of what users do — edit files (create, modify, delete, rename, revert to an
earlier content, chmod, symlink, in nested directories), snapshot, restore, create threads,
export and import bundles and archives (full and incremental), push, fetch, pull (with its
merge), merge, gc — and SIGKILLs real ``narrative`` processes mid-write (the statistics,
``--hypothesis-show-statistics``, count the kills that landed mid-run). The model is a plain
dict: snapshot id → the files that snapshot must hold. After every step, stock git and the
model decide:

* every store passes ``git fsck --strict``;
* every snapshot ever reported (and not dropped by gc on purpose) still restores
  byte-identically to the model (a sample each step, all of them at the end);
* every bundle ever written is cloned by stock ``git clone --mirror`` and names the same trees;
* no thread head ever stops being a descendant of its previous value (gc, which may rewrite
  history nobody else holds, is the one exception, and only for the threads it rewrote);
* the user's own ``.git`` is byte-identical.

Profiles (``NARRATIVE_HYPOTHESIS_PROFILE``): ``ci`` (bounded, the default) and ``soak``
(``make soak``). ``NARRATIVE_MODEL_WATCHER=1`` runs a ``narrative watch`` on each workspace, so
snapshots list only what its journal names (issue 18; ``make soak`` runs both ways).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from narrative.commits import all_snapshots
from narrative.errors import NarrativeError
from narrative.gc import RetentionPolicy, collect_garbage
from narrative.hierarchy import create_thread, get_thread
from narrative.history import resolve_snapshot
from narrative.restore import materialize, restore_workspace
from narrative.snapshot import take_snapshot
from narrative.store import THREAD_REF_PREFIX, Store
from narrative.workspace_merge import abort_merge, merge_state, merge_workspace
from tests.conftest import NARRATIVE, git, start_watcher
from tests.properties import SOAK
from transfer.exporter import export
from transfer.importer import import_
from transfer.remotes import add_remote, fetch, pull, push

settings.register_profile(
    "store-model-ci",
    # no shrinking in CI: it can take longer than the whole suite; the failing steps are
    # printed as generated, and `make soak` shrinks
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "store-model-soak",
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

WATCHER = os.environ.get("NARRATIVE_MODEL_WATCHER") == "1"

Files = dict[str, tuple[str, bytes]]
"""path → (kind, content): kind ``f`` file, ``x`` executable, ``l`` symlink (target)."""

PATHS = ("d/x.txt", "d/y.txt", "a.txt", "d/x.txt", "d/e/z.txt")
CONTENTS = (b"one\n", b"two\n" * 40)
STORES = st.integers(min_value=0, max_value=1)
#: ``origin`` is a file:// directory (the kill rule's subprocesses share it); ``mem`` a
#: memory:// one, visible to this process only
EDITS = ("write", "write", "write", "remove", "rename", "chmod", "symlink")
REMOTES = st.sampled_from(("origin", "mem"))
#: picks among what exists at run time: drawn independently of that state (a draw whose bounds
#: depend on it would make hypothesis' replays inconsistent), then reduced modulo its size
PICK = st.integers(min_value=0, max_value=1 << 16)


def _choose(items: list[str], pick: int) -> str:
    return items[pick % len(items)]


def read_files(root: Path) -> Files:
    """What a directory holds, as snapshots see it (no .git, no store marker, no temp files)."""
    out: Files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [
            d
            for d in dirnames
            if d != ".git"
            and not (rel_dir == "." and d == ".narrative")
            and not os.path.islink(os.path.join(dirpath, d))
        ]
        links = [d for d in os.listdir(dirpath) if os.path.islink(os.path.join(dirpath, d))]
        for name in set(filenames) | set(links):
            if name.startswith(".narrative-tmp-"):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            if os.path.islink(full):
                out[rel] = ("l", os.readlink(full).encode())
            else:
                kind = "x" if os.stat(full).st_mode & 0o100 else "f"
                out[rel] = (kind, Path(full).read_bytes())
    return out


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, root).encode() + b"\0")
            digest.update(Path(full).read_bytes() if not os.path.islink(full) else b"link")
    return digest.hexdigest()


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="narrative-model-"))
        self.remote = self.root / "remote"
        self.remote.mkdir()
        self.memory_remote = f"memory://narrative-model-{uuid.uuid4().hex}"
        self.model: dict[str, Files] = {}
        self.workspaces: list[Path] = []
        self.stores: list[Store] = []
        self.reported: list[dict[str, None]] = []  # in the order they became known
        self.heads: list[dict[str, bytes]] = []
        self.git_digest: list[str] = []
        self.bundles = 0
        self.rng = random.Random(0)
        self.watchers: list[subprocess.Popen[bytes]] = []
        for name in ("alice", "bob"):
            ws = self.root / name
            ws.mkdir()
            (ws / "README").write_text(f"{name}'s project\n")
            git("init", "-q", cwd=ws)
            git("add", "README", cwd=ws)
            git("commit", "-q", "-m", "start", cwd=ws)
            store = Store.init(str(ws))
            add_remote(store, "origin", self.remote.as_uri())
            add_remote(store, "mem", self.memory_remote)
            self.workspaces.append(ws)
            self.stores.append(store)
            self.reported.append({})
            self.heads.append(store.thread_heads())
            self.git_digest.append(tree_digest(ws / ".git"))
            if WATCHER:
                self.watchers.append(start_watcher(store.git_dir, str(ws)))

    def teardown(self) -> None:
        try:
            for i in range(len(self.stores)):
                for snap_id in list(self.reported[i]):
                    self._check_restores(i, snap_id)
        finally:
            for watcher in self.watchers:
                watcher.kill()
                watcher.communicate()
            shutil.rmtree(self.root, ignore_errors=True)
            import fsspec

            fs = fsspec.filesystem("memory")
            with contextlib.suppress(FileNotFoundError):
                fs.rm(self.memory_remote, recursive=True)

    # -- helpers ----------------------------------------------------------------------------

    def _store(self, i: int) -> Store:
        # reopen each time: another process (a killed CLI) may have changed it
        self.stores[i] = Store.open(workspace=str(self.workspaces[i]))
        return self.stores[i]

    def _check_restores(self, i: int, snap_id: str) -> None:
        store = self._store(i)
        out = self.root / f"check-{os.urandom(4).hex()}"
        try:
            materialize(store, resolve_snapshot(store, snap_id), str(out))
            assert read_files(out) == self.model[snap_id], f"{snap_id} does not restore as taken"
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _learn(self, i: int) -> None:
        """Every modelled snapshot that is now in store ``i`` is reported there."""
        for snap in all_snapshots(self._store(i)):
            if snap.id in self.model:
                self.reported[i][snap.id] = None

    # -- editing the workspace ------------------------------------------------------------

    @initialize(contents=st.lists(st.sampled_from(CONTENTS), min_size=3, max_size=3))
    def a_project_with_files(self, contents: list[bytes]) -> None:
        """Both projects start with files in nested directories, snapshotted."""
        for i in range(len(self.workspaces)):
            files = list(zip(PATHS[:3], contents, strict=True))
            self.edit(i, [("write", path, data) for path, data in files])
            self.snapshot(i)

    @rule(
        i=STORES,
        edits=st.lists(
            st.tuples(
                st.sampled_from(EDITS),
                st.sampled_from(PATHS),
                st.sampled_from(CONTENTS),
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def edit(self, i: int, edits: list[tuple[str, str, bytes]]) -> None:
        """Create, modify, delete, rename, chmod files and point a symlink, in nested
        directories (a rename moves the file to the next path of :data:`PATHS`)."""
        for action, path, content in edits:
            target = self.workspaces[i] / path
            if action == "write":
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink():
                    target.unlink()
                target.write_bytes(content)
            elif action == "remove" and (target.is_file() or target.is_symlink()):
                target.unlink()
            elif action == "rename" and target.is_file() and not target.is_symlink():
                to = self.workspaces[i] / PATHS[(PATHS.index(path) + 1) % len(PATHS)]
                if to != target and not to.is_symlink():
                    to.parent.mkdir(parents=True, exist_ok=True)
                    target.rename(to)
            elif action == "chmod" and target.is_file() and not target.is_symlink():
                target.chmod(target.stat().st_mode ^ 0o111)
            elif action == "symlink":
                link = self.workspaces[i] / "link"
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(path.split("/")[0])

    @rule(i=STORES, pick=PICK)
    def revert(self, i: int, pick: int) -> None:
        """Put one directory back exactly as an earlier snapshot had it (files of it only)."""
        if not self.reported[i]:
            return
        known = list(self.reported[i])
        # half the time the oldest state: a directory returning to where it began is the
        # history shape that once made bundles incomplete (issue 12, bug 1)
        earlier = self.model[known[0] if pick % 2 else _choose(known, pick // 2)]
        directory = ("d", "d", "d/e", "")[pick % 4]
        ws = self.workspaces[i]
        for path in [p for p in read_files(ws) if os.path.dirname(p) == directory]:
            (ws / path).unlink()
        for path, (kind, data) in earlier.items():
            if os.path.dirname(path) != directory or kind == "l":
                continue
            (ws / path).parent.mkdir(parents=True, exist_ok=True)
            (ws / path).write_bytes(data)
            (ws / path).chmod(0o755 if kind == "x" else 0o644)

    # -- the store -------------------------------------------------------------------------

    @rule(i=STORES)
    def snapshot(self, i: int) -> None:
        state = read_files(self.workspaces[i])
        result = take_snapshot(self._store(i), message="model")
        snap = result.snapshot
        if snap.id in self.model:
            assert self.model[snap.id] == state, "an unchanged workspace reused another state"
        self.model[snap.id] = state
        self.reported[i][snap.id] = None

    @rule(i=STORES, pick=PICK)
    def thread_create(self, i: int, pick: int) -> None:
        """A new thread forked from a known snapshot; the workspace snapshots onto it."""
        store = self._store(i)
        if not self.reported[i] or merge_state(store) is not None:
            return
        base = _choose(list(self.reported[i]), pick)
        objective = get_thread(store, store.config.default_thread).objective_id
        thread = create_thread(store, objective, f"t{len(self.model)}-{pick % 97}", base)
        state = read_files(self.workspaces[i])
        snap = take_snapshot(store, thread_id=thread.id, message="model", allow_empty=True)
        self.model[snap.snapshot.id] = state
        self.reported[i][snap.snapshot.id] = None

    @rule(i=STORES, pick=PICK)
    def restore(self, i: int, pick: int) -> None:
        if not self.reported[i] or merge_state(self._store(i)) is not None:
            return
        snap_id = _choose(list(self.reported[i]), pick)
        store = self._store(i)
        restore_workspace(store, resolve_snapshot(store, snap_id))
        assert read_files(self.workspaces[i]) == self.model[snap_id]

    @rule(
        src=STORES,
        fmt=st.sampled_from(("bundle", "bundle-since", "tar.gz", "tar.zst")),
    )
    def export_import(self, src: int, fmt: str) -> None:
        dst = 1 - src
        store = self._store(src)
        if not store.thread_heads():
            return
        self.bundles += 1
        url = str(self.root / f"artifact-{self.bundles}.{fmt}")
        since = None
        if fmt == "bundle-since":
            # the receiver must hold the very commit (an archive import may give the same
            # snapshot another commit when its parent was missing there)
            receiver = self._store(dst)
            common = [
                s
                for s in self.reported[src]
                if s in self.reported[dst]
                and receiver.odb.exists(bytes.fromhex(resolve_snapshot(store, s).commit))
            ]
            if not common:
                return
            since = common[-1]
        kind = "bundle" if fmt.startswith("bundle") else fmt
        try:
            result = export(store, url, fmt=kind, since=since)
        except NarrativeError:
            return  # e.g. the default thread has no snapshot to archive
        if result.nothing_new:
            return
        if kind == "bundle":
            self._check_bundle(store, url, since is not None)
        import_(self._store(dst), url)
        self._learn(dst)

    def _check_bundle(self, store: Store, url: str, incremental: bool) -> None:
        """Stock git clones the bundle (after its prerequisites, for an incremental one), and
        each thread in it names the tree it names in the store."""
        clone = self.root / f"clone-{os.urandom(4).hex()}.git"
        try:
            if incremental:
                git("init", "-q", "--bare", str(clone))
                # the receiver's side: everything the store has, then the bundle on top
                git("--git-dir", str(clone), "fetch", "-q", store.git_dir, "refs/*:refs/*")
                git("--git-dir", str(clone), "bundle", "verify", url)
                git("--git-dir", str(clone), "fetch", "-q", url, "refs/*:refs/bundled/*")
                prefix = "refs/bundled/"
            else:
                git("clone", "-q", "--mirror", url, str(clone))
                prefix = "refs/"
            git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
            heads = [
                line.split()
                for line in git("bundle", "list-heads", url).splitlines()
                if line.split()[1].startswith(THREAD_REF_PREFIX)
            ]
            if not heads:
                return
            cloned = [f"{prefix}{ref[len('refs/') :]}^{{tree}}" for _oid, ref in heads]
            theirs = git("--git-dir", str(clone), "rev-parse", *cloned).split()
            ours = git(
                "--git-dir", store.git_dir, "rev-parse", *[f"{o}^{{tree}}" for o, _ in heads]
            )
            assert theirs == ours.split(), "a bundle names other trees than the store"
        finally:
            shutil.rmtree(clone, ignore_errors=True)

    @rule(i=STORES, remote=REMOTES)
    def push(self, i: int, remote: str) -> None:
        # refused when diverged: that must change nothing that matters (the invariants)
        with contextlib.suppress(NarrativeError):
            push(self._store(i), remote)

    @rule(i=STORES, remote=REMOTES)
    def fetch(self, i: int, remote: str) -> None:
        if merge_state(self._store(i)) is not None:
            return
        with contextlib.suppress(NarrativeError):
            fetch(self._store(i), remote, move_threads=True)
        self._learn(i)

    @rule(i=STORES, remote=REMOTES)
    def pull(self, i: int, remote: str) -> None:
        """``narrative pull``: fast-forwards (bringing the workspace), merges the workspace's
        thread when it moved on both sides; a conflict is aborted (nothing may be lost)."""
        store = self._store(i)
        if merge_state(store) is not None:
            return
        try:
            result = pull(store, remote, strategy=None)
        except NarrativeError:
            return
        finally:
            self._learn(i)
        if merge_state(self._store(i)) is not None:
            abort_merge(self._store(i))
        elif result.merge is not None and result.merge.snapshot:
            # the merge snapshot holds what it wrote into the workspace
            self.model[result.merge.snapshot] = read_files(self.workspaces[i])
            self.reported[i][result.merge.snapshot] = None

    @rule(i=STORES, pick=PICK)
    def merge(self, i: int, pick: int) -> None:
        store = self._store(i)
        if not self.reported[i] or merge_state(store) is not None:
            return
        source = _choose(list(self.reported[i]), pick)
        try:
            result = merge_workspace(store, source, strategy="theirs")
        except NarrativeError:
            return
        if merge_state(store) is not None:
            abort_merge(store)
        elif not result.up_to_date:
            self.snapshot(i)  # the merge's snapshot must hold exactly what was written

    @rule(i=STORES)
    def gc(self, i: int) -> None:
        store = self._store(i)
        if merge_state(store) is not None:
            return
        report = collect_garbage(store, RetentionPolicy(keep_last=2))
        for dropped in report.dropped:
            self.reported[i].pop(dropped, None)
        # gc may rewrite what no other machine holds: those threads start a new ancestry
        for thread_id in report.rewritten_threads:
            self.heads[i].pop(thread_id, None)

    @rule(
        i=STORES,
        command=st.sampled_from(("snapshot", "restore", "push", "pull", "merge")),
        delay=st.floats(min_value=0.0, max_value=0.4),
    )
    def kill(self, i: int, command: str, delay: float) -> None:
        args = {"snapshot": ["snapshot"], "push": ["push", "origin"]}.get(command)
        if args is None:
            if not self.reported[i] or merge_state(self._store(i)) is not None:
                return
            if command == "pull":
                args = ["pull", "origin"]
            else:
                args = [command, next(iter(self.reported[i]))]
        proc = subprocess.Popen(
            [NARRATIVE, "-C", str(self.workspaces[i]), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        # how many kills interrupted a running process: --hypothesis-show-statistics
        event("kill landed mid-run" if proc.wait() == -signal.SIGKILL else "kill after exit")
        store = self._store(i)
        if merge_state(store) is not None:
            # a merge (or pull) killed half-way, or stopped on a conflict: what a user does
            abort_merge(store)
        self._learn(i)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def stores_pass_git_fsck(self) -> None:
        for i in range(len(self.workspaces)):
            git("--git-dir", self._store(i).git_dir, "fsck", "--strict", "--no-dangling")

    @invariant()
    def thread_heads_only_move_forward(self) -> None:
        for i in range(len(self.workspaces)):
            store = self._store(i)
            now = store.thread_heads()
            for thread_id, before in self.heads[i].items():
                after = now.get(thread_id)
                assert after is not None, f"thread {thread_id} disappeared"
                if after != before:
                    proc = subprocess.run(
                        ["git", "--git-dir", store.git_dir, "merge-base", "--is-ancestor",
                         before.hex(), after.hex()],
                        check=False,
                    )  # fmt: skip
                    assert proc.returncode == 0, f"thread {thread_id} moved backwards"
            self.heads[i] = now

    @invariant()
    def full_bundles_are_complete(self) -> None:
        """What ``narrative export`` would write now is a bundle stock git clones."""
        for i in range(len(self.workspaces)):
            store = self._store(i)
            if store.thread_heads():
                url = str(self.root / f"full-{i}.bundle")
                export(store, url)
                self._check_bundle(store, url, incremental=False)

    @invariant()
    def users_git_is_untouched(self) -> None:
        for i, ws in enumerate(self.workspaces):
            assert tree_digest(ws / ".git") == self.git_digest[i]

    @invariant()
    def a_sample_of_snapshots_restores(self) -> None:
        for i in range(len(self.workspaces)):
            if self.reported[i]:
                self._check_restores(i, self.rng.choice(list(self.reported[i])))


StoreModel.TestCase.settings = settings.get_profile(f"store-model-{'soak' if SOAK else 'ci'}")
TestStoreModel = pytest.mark.long(StoreModel.TestCase)
