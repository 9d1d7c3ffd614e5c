"""Merging run results into the workspace: git (merge-file, merge-tree) is the oracle."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narrative.commits import read_commit
from narrative.errors import MergeInProgress, RestoreError, StoreCorrupted
from narrative.hierarchy import create_thread, finish_run, start_run
from narrative.history import resolve_snapshot
from narrative.merge import tree_changes
from narrative.merge3 import merge_text
from narrative.restore import materialize
from narrative.snapshot import take_snapshot
from narrative.store import Store
from narrative.workspace_merge import abort_merge, merge_state, merge_workspace
from tests.conftest import Cli, git, kill_after, tree_bytes
from tests.properties import examples

LINES = "".join(f"line {i}\n" for i in range(1, 21))


def _user_files(ws: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(ws).items() if not k.startswith(".narrative")}


def _run(store: Store, tmp_path: Path, change: Callable[[Path], None], name: str = "agent") -> str:
    """An agent run forked from the workspace's current snapshot, whose result is ``change``
    applied to a copy of it (what an isolated environment would send back)."""
    base = take_snapshot(store, message="base").snapshot
    thread = create_thread(store, store.config.default_objective, name, forked_from=base.id)
    run = start_run(store, thread.id, base_snapshot=base.id)
    agent_ws = tmp_path / name
    materialize(store, base, str(agent_ws))
    change(agent_ws)
    result = take_snapshot(store, thread.id, run.id, "result", workspace=str(agent_ws))
    finish_run(store, run.id, "succeeded", 0, result.snapshot.id)
    return run.id


def _git_merge_tree(store: Store, ours: str, theirs: str) -> tuple[str, int]:
    """Stock git's merged tree id for two snapshots of the store (merge base from history)."""
    out = git(
        "--git-dir",
        store.git_dir,
        "merge-tree",
        "--write-tree",
        "--no-messages",
        resolve_snapshot(store, ours).commit,
        resolve_snapshot(store, theirs).commit,
        check=False,
    )
    lines = out.splitlines()
    return lines[0], len({line.split("\t")[1] for line in lines[1:] if "\t" in line})


def _merge_file(tmp_path: Path, base: bytes, ours: bytes, theirs: bytes, *flags: str) -> bytes:
    for name, data in (("b", base), ("o", ours), ("t", theirs)):
        (tmp_path / name).write_bytes(data)
    out = git(
        "merge-file", "-p", *flags, "-L", "ours", "-L", "base", "-L", "theirs",
        str(tmp_path / "o"), str(tmp_path / "b"), str(tmp_path / "t"), check=False,
    )  # fmt: skip
    return out.encode()


def _edit(text: str, line: int, new: str) -> str:
    rows = text.splitlines(keepends=True)
    rows[line - 1] = new + "\n"
    return "".join(rows)


# -- the text merge against git merge-file -------------------------------------------------------

TEXT_CASES = {
    "disjoint": (LINES, _edit(LINES, 2, "ours"), _edit(LINES, 15, "theirs")),
    "same-change": (LINES, _edit(LINES, 5, "both"), _edit(LINES, 5, "both")),
    "overlap": (LINES, _edit(LINES, 5, "ours"), _edit(LINES, 5, "theirs")),
    "adjacent": (LINES, _edit(LINES, 5, "ours"), _edit(LINES, 6, "theirs")),
    "insert-vs-delete": (LINES, LINES.replace("line 9\n", ""), LINES + "tail\n"),
    "no-final-newline": ("a\nb\nc", "a\nB\nc", "a\nb\nC"),
    "add-add": ("", "x\ncommon\ny\n", "x\ncommon\nz\n"),
    "common-ends": (
        LINES,
        _edit(_edit(LINES, 4, "s"), 5, "o"),
        _edit(_edit(LINES, 4, "s"), 5, "t"),
    ),
    # the merge bench's clean merges: theirs inserts at the top, ours appends
    "top-and-tail": (LINES, LINES + "ours tail\n", "theirs head\n" + LINES),
    "head-dropped": (LINES, LINES[LINES.index("line 4") :], LINES + "t\n"),
    "tail-without-newline": (LINES + "end", "o\n" + LINES + "end", LINES + "end2"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_merge_matches_git_merge_file(case: str, tmp_path: Path) -> None:
    base, ours, theirs = (s.encode() for s in TEXT_CASES[case])
    merged = merge_text(base, ours, theirs)
    assert merged.data == _merge_file(tmp_path, base, ours, theirs)
    for side in ("ours", "theirs"):
        favoured = merge_text(base, ours, theirs, favour=side)  # type: ignore[arg-type]
        assert favoured.data == _merge_file(tmp_path, base, ours, theirs, f"--{side}")
        assert b"<<<<<<<" not in favoured.data


@settings(max_examples=examples(300), deadline=None)
@given(
    base=st.lists(st.sampled_from(["a\n", "b\n", "\n", "x\n", "ab\n", "a"]), max_size=12),
    edits=st.lists(
        st.tuples(st.booleans(), st.integers(0, 12), st.sampled_from(["", "a\n", "n\n", "b"])),
        max_size=8,
    ),
)
def test_text_merge_without_cr_matches_the_line_by_line_path(
    base: list[str], edits: list[tuple[bool, int, str]]
) -> None:
    """Contents without ``\\r`` are merged on byte offsets (most lines never split); with one
    they go through line lists. Both must agree: the same texts with CRLF line ends take the
    line path, and with CRLF turned back into LF the results are identical."""
    sides: dict[bool, list[str]] = {True: list(base), False: list(base)}
    for ours_side, at, line in edits:
        lines = sides[ours_side]
        if line:
            lines.insert(min(at, len(lines)), line)
        elif lines:
            del lines[min(at, len(lines) - 1)]
    texts = ["".join(base).encode(), "".join(sides[True]).encode(), "".join(sides[False]).encode()]
    crlf = [t.replace(b"\n", b"\r\n") for t in texts]
    for favour in (None, "ours", "theirs"):
        lf_merge = merge_text(*texts, favour=favour)  # type: ignore[arg-type]
        crlf_merge = merge_text(*crlf, favour=favour)  # type: ignore[arg-type]
        assert lf_merge.conflicts == crlf_merge.conflicts
        assert lf_merge.data == crlf_merge.data.replace(b"\r\n", b"\n")


# -- workspace merges ----------------------------------------------------------------------------


def _populate(ws: Path) -> None:
    (ws / "src" / "mod.py").write_text(LINES)
    (ws / "src" / "old_name.py").write_text("def moved():\n    return 1\n" * 5)
    (ws / "doc.txt").write_text(LINES)
    (ws / "gone.txt").write_text("delete me\n")
    (ws / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (ws / "link").symlink_to("doc.txt")
    (ws / "blob.bin").write_bytes(b"\x00\x01binary" * 50)


def test_clean_merge_matches_git_merge_tree(
    store: Store, workspace: Path, tmp_path: Path, cli: Cli
) -> None:
    _populate(workspace)

    def agent(ws: Path) -> None:
        (ws / "src" / "mod.py").write_text(_edit(LINES, 18, "theirs"))
        (ws / "src" / "old_name.py").rename(ws / "src" / "new_name.py")  # rename ...
        (ws / "gone.txt").unlink()
        (ws / "added.txt").write_text("from the agent\n")
        (ws / "tool.sh").chmod(0o755)
        (ws / "link").unlink()
        (ws / "link").symlink_to("src/mod.py")
        (ws / "deep" / "er").mkdir(parents=True)
        (ws / "deep" / "er" / "x.txt").write_text("x\n")

    run_id = _run(store, tmp_path, agent)
    (workspace / "src" / "mod.py").write_text(_edit(LINES, 2, "ours"))
    (workspace / "src" / "old_name.py").write_text("def moved():\n    return 2\n" * 5)  # ... + edit
    (workspace / "doc.txt").write_text(LINES + "ours\n")

    out = cli.json("merge", run_id[:10])
    assert out["clean"] and out["snapshot"] and not out["conflicts"]
    assert {"side": "theirs", "from": "src/old_name.py", "to": "src/new_name.py"} in out["renames"]
    merged = resolve_snapshot(store, out["snapshot"])
    git_tree, git_conflicts = _git_merge_tree(store, out["pre_merge"], out["theirs"])
    assert git_conflicts == 0 and merged.tree == out["tree"] == git_tree
    files = _user_files(workspace)
    assert files["src/mod.py"].startswith(_edit(_edit(LINES, 2, "ours"), 18, "theirs").encode())
    assert b"return 2" in files["src/new_name.py"] and "src/old_name.py" not in files
    assert "gone.txt" not in files and files["link"] == b"link:src/mod.py"
    assert os.access(workspace / "tool.sh", os.X_OK)
    assert (workspace / "deep" / "er" / "x.txt").read_text() == "x\n"
    assert merge_state(store) is None
    log = cli.run("log").stdout
    assert log.splitlines()[0].split()[0] == merged.id
    message = git("--git-dir", store.git_dir, "log", "-1", "--format=%B", merged.commit)
    assert f"Narrative-Merged-From: {out['theirs']}" in message


def test_rename_on_our_side_edit_on_theirs(store: Store, workspace: Path, tmp_path: Path) -> None:
    _populate(workspace)
    run_id = _run(
        store, tmp_path, lambda ws: (ws / "src" / "old_name.py").write_text("changed\n" * 10)
    )
    (workspace / "src" / "old_name.py").rename(workspace / "renamed.py")
    result = merge_workspace(store, run_id)
    assert result.clean and result.snapshot
    assert (workspace / "renamed.py").read_text() == "changed\n" * 10
    assert not (workspace / "src" / "old_name.py").exists()
    assert result.tree == _git_merge_tree(store, result.pre_merge, result.theirs)[0]


def test_conflicts_markers_binary_delete_and_exact_abort(
    store: Store, workspace: Path, tmp_path: Path, cli: Cli
) -> None:
    _populate(workspace)

    def agent(ws: Path) -> None:
        (ws / "src" / "mod.py").write_text(_edit(_edit(LINES, 5, "theirs"), 15, "clean"))
        (ws / "blob.bin").write_bytes(b"\x00theirs" * 50)
        (ws / "doc.txt").write_text(_edit(LINES, 1, "theirs edit"))
        (ws / "gone.txt").write_text("theirs modified\n")
        (ws / "both.txt").write_text("theirs\n")

    run_id = _run(store, tmp_path, agent)
    (workspace / "src" / "mod.py").write_text(_edit(LINES, 5, "ours"))
    (workspace / "blob.bin").write_bytes(b"\x00ours" * 50)
    (workspace / "doc.txt").unlink()
    (workspace / "gone.txt").unlink()
    (workspace / "both.txt").write_text("ours\n")
    (workspace / "untouched.txt").write_text("only in the workspace\n")
    os.chmod(workspace / "tool.sh", 0o755)
    before = _user_files(workspace)

    proc = cli.run("merge", run_id, "--json", check=False)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["in_progress"] and out["snapshot"] is None
    kinds = {c["path"]: c["kind"] for c in out["conflicts"]}
    assert kinds == {
        "src/mod.py": "content",
        "blob.bin": "binary",
        "doc.txt": "delete/modify",
        "gone.txt": "delete/modify",
        "both.txt": "add/add",
    }
    # conflicted paths: the same set as stock git on the same commits
    assert _git_merge_tree(store, out["pre_merge"], out["theirs"])[1] == len(kinds)
    expected = _merge_file(
        tmp_path,
        LINES.encode(),
        _edit(LINES, 5, "ours").encode(),
        _edit(_edit(LINES, 5, "theirs"), 15, "clean").encode(),
    )
    assert (workspace / "src" / "mod.py").read_bytes() == expected
    assert b"clean" in expected and b"<<<<<<< ours" in expected
    assert (workspace / "blob.bin").read_bytes() == b"\x00ours" * 50  # ours kept ...
    theirs_blob = bytes.fromhex(
        next(c for c in out["conflicts"] if c["kind"] == "binary")["theirs"]["oid"]
    )
    assert store.odb.read(theirs_blob)[1] == b"\x00theirs" * 50  # ... theirs stored
    assert (workspace / "doc.txt").read_text() == _edit(LINES, 1, "theirs edit")
    human = cli.run("merge").stdout
    assert "in progress" not in human and "merging" in human

    # a second merge is refused, and changes nothing
    snapshot_count = len(cli.items("log"))
    second = cli.run("merge", run_id, check=False)
    assert second.returncode == 1 and "in progress" in second.stderr
    assert len(cli.items("log")) == snapshot_count
    refused = cli.run("merge", "--continue", check=False)
    assert refused.returncode == 1 and "conflict markers" in refused.stderr

    cli.run("merge", "--abort")
    assert _user_files(workspace) == before  # bytes, modes and symlinks
    assert os.readlink(workspace / "link") == "doc.txt"
    assert merge_state(store) is None
    assert cli.run("merge", "--abort", check=False).returncode == 1


@pytest.mark.parametrize("side", ["ours", "theirs"])
def test_strategy_settles_every_conflict(
    side: str, store: Store, workspace: Path, tmp_path: Path
) -> None:
    _populate(workspace)

    def agent(ws: Path) -> None:
        (ws / "src" / "mod.py").write_text(_edit(_edit(LINES, 5, "theirs"), 15, "clean"))
        (ws / "blob.bin").write_bytes(b"\x00theirs")
        (ws / "gone.txt").unlink()

    run_id = _run(store, tmp_path, agent)
    (workspace / "src" / "mod.py").write_text(_edit(LINES, 5, "ours"))
    (workspace / "blob.bin").write_bytes(b"\x00ours")
    (workspace / "gone.txt").write_text("ours modified\n")
    result = merge_workspace(store, run_id, strategy=side)  # type: ignore[arg-type]
    assert result.clean and result.snapshot and len(result.resolved) == 3
    expected = _merge_file(
        tmp_path,
        LINES.encode(),
        _edit(LINES, 5, "ours").encode(),
        _edit(_edit(LINES, 5, "theirs"), 15, "clean").encode(),
        f"--{side}",
    )
    assert (workspace / "src" / "mod.py").read_bytes() == expected
    assert (workspace / "blob.bin").read_bytes() == (b"\x00" + side.encode())
    assert (workspace / "gone.txt").exists() == (side == "ours")


def test_no_commit_then_continue(store: Store, workspace: Path, tmp_path: Path, cli: Cli) -> None:
    run_id = _run(store, tmp_path, lambda ws: (ws / "new.txt").write_text("new\n"))
    out = cli.json("merge", run_id, "--no-commit")
    assert out["clean"] and out["in_progress"] and out["snapshot"] is None
    assert (workspace / "new.txt").read_text() == "new\n"
    done = cli.json("merge", "--continue")
    snap = resolve_snapshot(store, done["snapshot"])
    assert snap.tree == out["tree"] and merge_state(store) is None
    again = cli.json("merge", run_id)
    assert again["up_to_date"] and again["in_progress"] is False


def test_merge_of_a_plain_snapshot_uses_the_merge_base(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    _populate(workspace)
    run_id = _run(store, tmp_path, lambda ws: (ws / "doc.txt").write_text(_edit(LINES, 20, "t")))
    from narrative.hierarchy import get_run

    theirs = get_run(store, run_id).result_snapshot
    assert theirs is not None
    (workspace / "doc.txt").write_text(_edit(LINES, 1, "o"))
    result = merge_workspace(store, theirs)
    assert result.clean and result.base == get_run(store, run_id).base_snapshot
    assert (workspace / "doc.txt").read_text() == _edit(_edit(LINES, 1, "o"), 20, "t")
    # merging it again: the merge snapshot names it (Merged-From), so nothing is left to do
    assert merge_workspace(store, theirs).up_to_date


def test_refuses_to_overwrite_an_unsnapshotted_file(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    run_id = _run(store, tmp_path, lambda ws: (ws / "debug.log").write_text("theirs\n"))
    (workspace / ".gitignore").write_text("*.log\n")
    (workspace / "debug.log").write_text("ignored, precious\n")
    with pytest.raises(RestoreError, match="never snapshotted"):
        merge_workspace(store, run_id)
    assert (workspace / "debug.log").read_text() == "ignored, precious\n"
    assert merge_state(store) is None  # refused before it started
    os.rename(workspace / "debug.log", tmp_path / "moved.log")
    assert merge_workspace(store, run_id, commit=False).clean
    with pytest.raises(MergeInProgress):
        merge_workspace(store, run_id)
    abort_merge(store)
    assert not (workspace / "debug.log").exists()


_OID = bytes(range(20))
_ENTRY = b"100644 a.txt\x00" + _OID
DAMAGED_TREES = {
    "truncated": _ENTRY + b"100644 b\x00" + _OID[:5],
    "garbage-first": b"junk" + _ENTRY,
    "no-mode": b" a\x00" + _OID,
    "dot-dot": _ENTRY + b"40000 ..\x00" + _OID,
    "slash": b"100644 a/b\x00" + _OID,
    "dot": _ENTRY + b"40000 .\x00" + _OID,
    "dot-git": b"40000 .git\x00" + _OID + _ENTRY,
    "empty-name": b"100644 \x00" + _OID,
}


@pytest.mark.parametrize("case", sorted(DAMAGED_TREES))
def test_damaged_trees_are_refused(store: Store, case: str) -> None:
    """Trees are parsed with one scan; whatever is not a whole run of entries with safe names
    is StoreCorrupted, never a merge through it."""
    good = store.odb.write_loose("tree", _ENTRY)
    assert tree_changes(store.odb, None, good) == {"a.txt": (None, (0o100644, _OID))}
    bad = store.odb.write_loose("tree", DAMAGED_TREES[case])
    with pytest.raises(StoreCorrupted):
        tree_changes(store.odb, good, bad)


def test_bad_input_changes_nothing(store: Store, workspace: Path, tmp_path: Path, cli: Cli) -> None:
    _run(store, tmp_path, lambda ws: None, "a1")
    _run(store, tmp_path, lambda ws: None, "a2")
    thread = create_thread(store, store.config.default_objective, "pending")
    pending = start_run(store, thread.id).id
    (workspace / "dirty.txt").write_text("not snapshotted yet\n")
    before = (_user_files(workspace), cli.run("log", "--all").stdout)
    for ref, message in (
        ("snap-nope", "unknown snapshot"),
        ("run-zzzz", "unknown run"),
        ("run-", "ambiguous id"),
        (pending, "no result snapshot yet"),
    ):
        proc = cli.run("merge", ref, check=False)
        assert proc.returncode == 1, ref
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        diff = cli.run("diff", ref, "--stat", check=False)
        assert diff.returncode == 1 and message in diff.stderr
    assert (_user_files(workspace), cli.run("log", "--all").stdout) == before
    assert merge_state(store) is None
    assert cli.run("merge", "x", "--abort", check=False).returncode == 2


def test_diff_run_shows_what_it_changed(
    store: Store, workspace: Path, tmp_path: Path, cli: Cli
) -> None:
    _populate(workspace)

    def agent(ws: Path) -> None:
        (ws / "doc.txt").write_text(_edit(LINES, 3, "changed"))
        (ws / "gone.txt").unlink()
        (ws / "new.txt").write_text("new\n")

    run_id = _run(store, tmp_path, agent)
    (workspace / "doc.txt").write_text("workspace edits are not part of the run\n")
    assert cli.run("diff", run_id, "--name-status").stdout.splitlines() == [
        "M\tdoc.txt",
        "D\tgone.txt",
        "A\tnew.txt",
    ]
    data = cli.json("diff", run_id[:12])
    assert data["totals"] == {"files": 3, "insertions": 2, "deletions": 2}
    patch = cli.run("diff", run_id).stdout
    assert "-line 3\n+changed\n" in patch
    assert "3 files changed" in cli.run("diff", run_id, "--stat").stdout


def test_killed_merge_leaves_store_consistent_and_work_recoverable(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    for i in range(800):
        (workspace / "src" / f"f{i:04d}.txt").write_text(LINES + f"file {i}\n")

    def agent(ws: Path) -> None:
        for i in range(800):
            (ws / "src" / f"f{i:04d}.txt").write_text(_edit(LINES, 20, "theirs") + f"file {i}\n")

    run_id = _run(store, tmp_path, agent)
    for i in range(0, 800, 2):
        (workspace / "src" / f"f{i:04d}.txt").write_text(_edit(LINES, 1, "ours") + f"file {i}\n")
    before = _user_files(workspace)
    pristine = tmp_path / "pristine"
    shutil.copytree(workspace, pristine, symlinks=True)
    outcomes = set()
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9):
        status = kill_after(["merge", run_id], workspace, delay)
        outcomes.add(status)
        git("--git-dir", store.git_dir, "fsck", "--no-dangling")
        opened = Store.open(store.git_dir)
        if merge_state(opened) is not None:
            abort_merge(opened)  # the work before the merge comes back exactly
        elif status == 0 or _user_files(workspace) != before:
            # finished (the kill came after the merge snapshot and the state file's removal):
            # the merged result is recorded, so nothing is left to recover
            head = opened.refs.read(opened.thread_ref(opened.config.default_thread))
            assert head is not None
            assert "Narrative-Merged-From" in read_commit(opened, head).message, delay
            break
        assert _user_files(workspace) == before, delay
        assert not [p for p in tree_bytes(workspace) if ".narrative-" in p]
    assert -9 in outcomes  # at least one kill landed mid-merge
    shutil.rmtree(pristine)


def test_directory_file_conflicts(store: Store) -> None:
    """A file where the other side keeps a directory, both ways round, is a directory/file
    conflict; the edits around it still merge."""
    from narrative.merge import edit_tree, merge_trees
    from narrative.odb import EMPTY_TREE_OID, PackWriter

    def blob(text: str) -> tuple[int, bytes]:
        return 0o100644, store.odb.write_loose("blob", text.encode())

    def tree(files: dict[str, str]) -> bytes:
        writer = PackWriter(store.odb)
        edits: dict[str, tuple[int, bytes] | None] = {p: blob(t) for p, t in files.items()}
        oid = edit_tree(store.odb, writer, EMPTY_TREE_OID, edits)
        writer.publish()
        return oid

    base = tree({"a/f": "1\n", "p/q": "1\n", "k": "1\n", "s/t": "1\n"})
    ours = tree({"a": "file\n", "p/q": "2\n", "k": "2\n", "s/t": "1\n", "d/x": "new\n"})
    theirs = tree({"a/f": "3\n", "p": "file\n", "k": "1\n", "s/t": "3\n", "d": "file\n"})
    writer = PackWriter(store.odb)
    result = merge_trees(store.odb, base, ours, theirs, writer)
    writer.publish()
    kinds = {(c.path, c.kind, c.other) for c in result.conflicts}
    assert ("d", "directory/file", "d/x") in kinds  # theirs' file, ours' new directory
    assert ("p", "directory/file", "p/q") in kinds  # theirs' file, ours' edited directory
    assert ("a/f", "directory/file", "a") in kinds  # theirs' edit below ours' file
    assert ("p/q", "modify/delete", None) in kinds and ("a/f", "delete/modify", None) in kinds
    assert result.edits == {"s/t": blob("3\n")}
    git("--git-dir", store.git_dir, "fsck", "--no-dangling")


def test_edit_tree_writes_git_order_and_canonical_modes(store: Store) -> None:
    """A rebuilt tree is in git's order (a directory sorts as if its name ended with "/") and
    spells modes as git writes them, whatever the tree it started from spelled."""
    from narrative.merge import edit_tree
    from narrative.objects import encode_tree, parse_tree
    from narrative.odb import PackWriter

    sub = store.odb.write_loose("tree", b"100644 x\x00" + _OID)
    odd = store.odb.write_loose("tree", b"100664 a\x00" + _OID + b"040000 b\x00" + sub)
    writer = PackWriter(store.odb)
    edited = edit_tree(store.odb, writer, odd, {"b.txt": (0o100644, _OID), "b-c": None})
    writer.publish()
    want = [(b"a", 0o100664, _OID), (b"b", 0o40000, sub), (b"b.txt", 0o100644, _OID)]
    assert store.odb.read(edited) == ("tree", encode_tree(want))
    assert [e[0] for e in parse_tree(store.odb.read(edited)[1])] == [b"a", b"b.txt", b"b"]
