"""Every bundle we write is complete: stock git clones it, whatever the history's shape.

Regression for issue 12 bug 1: a subdirectory changed and then changed back to an earlier state
made the exporter skip a tree it had only walked partially, and the bundle lacked objects while
the export exited 0.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import Cli, git
from transfer.bundle import write_bundle
from transfer.errors import IncompleteExport


def _clone_tree(bundle: Path, tmp_path: Path, ref: str) -> str:
    """Clone ``bundle`` with stock git and return the tree id of ``ref`` (fsck'd first)."""
    clone = tmp_path / f"clone-{bundle.stem}.git"
    git("clone", "-q", "--mirror", str(bundle), str(clone))
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    return git("--git-dir", str(clone), "rev-parse", f"{ref}^{{tree}}").strip()


def test_subdirectory_changed_then_reverted_exports_a_complete_bundle(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    cli.run("init")
    sub = workspace / "src" / "pkg"
    sub.mkdir()
    (sub / "a.py").write_text("a = 1\n")
    (sub / "b.py").write_text("b = 1\n")
    cli.run("snapshot", "-m", "first")
    (sub / "a.py").write_text("a = 2\n")
    cli.run("snapshot", "-m", "changed")
    (sub / "a.py").write_text("a = 1\n")
    last = cli.json("snapshot", "-m", "back to first")
    bundle = tmp_path / "all.bundle"
    cli.run("export", str(bundle))
    thread_ref = f"refs/narrative/threads/{last['thread']}"
    assert _clone_tree(bundle, tmp_path, thread_ref) == last["tree"]
    # and a second store imports it into a usable thread
    other = tmp_path / "other"
    other.mkdir()
    second = Cli(other)
    second.run("init")
    second.run("import", str(bundle))
    restored = tmp_path / "restored"
    second.run("restore", last["id"], "--to", str(restored))
    assert (restored / "src" / "pkg" / "a.py").read_text() == "a = 1\n"


def test_incremental_bundle_after_a_revert_is_complete(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """Prerequisite = the middle snapshot; the tip's tree equals the first snapshot's, whose
    objects the receiver does not necessarily hold through the middle one."""
    sub = workspace / "d"
    sub.mkdir()
    (sub / "x").write_text("one\n")
    first = take_snapshot(store).snapshot
    (sub / "x").write_text("two\n")
    middle = take_snapshot(store).snapshot
    (sub / "x").write_text("one\n")
    last = take_snapshot(store).snapshot
    ref = store.thread_ref(store.config.default_thread)
    full = tmp_path / "full.bundle"
    inc = tmp_path / "inc.bundle"
    for path, tip, prereqs in (
        (full, middle, {}),
        (inc, last, {bytes.fromhex(middle.commit): "middle"}),
    ):
        buf = io.BytesIO()
        write_bundle(store.odb, buf, {ref: bytes.fromhex(tip.commit)}, prereqs)
        path.write_bytes(buf.getvalue())
    clone = tmp_path / "clone.git"
    git("init", "-q", "--bare", str(clone))
    git("--git-dir", str(clone), "fetch", "-q", str(full), f"{ref}:{ref}")
    git("--git-dir", str(clone), "fetch", "-q", str(inc), f"{ref}:{ref}")
    git("--git-dir", str(clone), "fsck", "--strict", "--no-dangling")
    assert git("--git-dir", str(clone), "rev-parse", f"{ref}^{{tree}}").strip() == last.tree
    assert first.tree == last.tree


def test_an_incomplete_bundle_fails_loudly_and_publishes_nothing(
    cli: Cli, workspace: Path, tmp_path: Path
) -> None:
    """The connectivity check before publishing: a thread whose tree names a blob the store
    does not hold (crafted with stock git) cannot be exported, and no artifact appears."""
    cli.run("init")
    snap = cli.json("snapshot", "-m", "base")
    store = Store.open(workspace=str(workspace))
    git_dir = ["--git-dir", store.git_dir]
    missing = "1" * 40
    tree = subprocess.run(
        ["git", *git_dir, "mktree", "--missing"],
        input=f"100644 blob {missing}\tghost\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    commit = git(*git_dir, "commit-tree", tree, "-p", snap["commit"], "-m", "x").strip()
    git(*git_dir, "update-ref", f"refs/narrative/threads/{snap['thread']}", commit)
    out = tmp_path / "x.bundle"
    proc = cli.run("export", str(out), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "missing" in proc.stderr and missing in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.glob("x.bundle*")) == []
    with pytest.raises(IncompleteExport):
        write_bundle(store.odb, io.BytesIO(), {"refs/narrative/t": bytes.fromhex(commit)})


def test_an_archive_missing_a_file_is_never_published(
    store: Store, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive's connectivity check: if the file list ever lost an entry (simulated here by
    a tree flattener that drops one), the archive would not rebuild its snapshot's tree, so the
    export fails before anything is published."""
    import transfer.archive_write
    from narrative.trees import flatten_tree
    from transfer.exporter import export

    (workspace / "src" / "more.py").write_text("x = 1\n")
    snap = take_snapshot(store).snapshot

    def lossy(*args: object) -> dict[str, tuple[int, bytes]]:
        flat = flatten_tree(*args)  # type: ignore[arg-type]
        flat.pop("src/more.py")
        return flat

    monkeypatch.setattr(transfer.archive_write, "flatten_tree", lossy)
    for fmt in ("tar.gz", "tar.zst"):
        out = tmp_path / f"x.{fmt}"
        with pytest.raises(IncompleteExport, match="would build tree"):
            export(store, str(out), fmt=fmt, snapshot=snap.id)
        assert list(tmp_path.glob("x.*")) == []


def test_a_missing_subtree_or_blob_among_many_refuses_the_export(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """The connectivity check's bulk lookups (a dict of the pack when most of it is sent) still
    find the one object that is not there: a missing directory and a missing file of a commit
    that shares everything else with a real snapshot."""
    from transfer.exporter import export

    for i in range(60):
        (workspace / f"f{i}.txt").write_text(f"file {i}\n")
    snap = take_snapshot(store).snapshot
    git_dir = ["--git-dir", store.git_dir]
    listing = git(*git_dir, "ls-tree", snap.tree)
    for ghost in ("040000 tree " + "2" * 40, "100644 blob " + "3" * 40):
        tree = subprocess.run(
            ["git", *git_dir, "mktree", "--missing"],
            input=listing + f"{ghost}\tghost\n",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit = git(*git_dir, "commit-tree", tree, "-p", snap.commit, "-m", "x").strip()
        git(*git_dir, "update-ref", store.thread_ref(snap.thread), commit)
        store.odb.invalidate()
        out = tmp_path / "x.bundle"
        with pytest.raises(IncompleteExport, match=ghost.split()[-1]):
            export(store, str(out))
        assert list(tmp_path.glob("x.bundle*")) == []
