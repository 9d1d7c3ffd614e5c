"""The path rule (narrative.paths): git's verify_path, extended to the shadow store.

Stock git is the oracle: ``git update-index --add --cacheinfo`` with ``core.protectHFS`` and
``core.protectNTFS`` refuses a path exactly when our rule refuses it for a git reason; ours may
refuse more only for reasons git does not have (``.narrative`` at the top, backslashes, names
longer than the file system allows).
"""

from __future__ import annotations

import os
import subprocess
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narrative.errors import InvalidInput, UnsafePath
from narrative.paths import (
    HFS_IGNORABLES,
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    check_component,
    check_path,
    component_problem,
    is_dotgit,
    is_safe_path,
    is_store_name,
    path_problem,
)
from tests.properties import examples

REFUSED = [
    "",
    "/etc/passwd",
    "/",
    "a//b",
    "a/",
    "./a",
    "a/./b",
    ".",
    "..",
    "../x",
    "a/../../x",
    "a\x00b",
    "a\\b",
    "..\\x",
    ".git",
    ".git/config",
    ".git/hooks/post-checkout",
    ".GIT/config",
    ".Git/config",
    "a/b/.git/config",
    "a/.GiT",
    ".git./config",
    ".git /config",
    ".git. . ./x",
    "git~1/config",
    "GIT~1/config",
    "a/Git~1. /x",
    ".git::$INDEX_ALLOCATION/config",
    ".git:stream",
    ".g\u200cit/config",
    "\ufeff.git/config",
    ".git\u200e/config",
    ".\u202agi\u206ft/x",
    "a/.gi\u200dt",
    ".narrative",
    ".narrative/x",
    ".Narrative/x",
    ".NARRATIVE/hooks/post-checkout",
    ".narrative./x",
    ".narrative  /x",
    ".narrative. . /x",
    ".narrative::$INDEX_ALLOCATION/x",
    ".nar\u200crative/x",
    "narrat~1/x",
    "NARRAT~1 /x",
    "x" * (MAX_COMPONENT_BYTES + 1),
    "a/" + "é" * 128,  # 256 bytes in UTF-8
    "/".join(["d" * 200] * 21),  # over 4096 bytes
]

ACCEPTED = [
    "a",
    "README.md",
    "a/b/c.txt",
    "...",
    "..a",
    "a..",
    ".gitignore",
    ".gitattributes",
    ".gitmodules",
    ".github/workflows/ci.yml",
    ".gitx/y",
    "git",
    "git~2/x",
    "git~1x",
    "a/.narrative",  # only the top-level one is the store
    "a/b/.narrative/x",
    ".narratives/x",
    "narrative/x",
    ".narrativex",
    "x" * MAX_COMPONENT_BYTES,
    "é" * 127,
    "e\u0301",
    "日本語/ファイル.txt",
    ".git\u00e9",  # a non-ignorable code point after .git: git accepts it
]


@pytest.mark.parametrize("path", REFUSED)
def test_refused(path: str) -> None:
    reason = path_problem(path)
    assert reason is not None
    assert not is_safe_path(path)
    with pytest.raises(UnsafePath) as caught:
        check_path(path)
    assert caught.value.path == path and caught.value.reason == reason
    assert isinstance(caught.value, InvalidInput)
    assert repr(path)[1:-1][:40] in str(caught.value)
    # the bytes form of a path is judged the same way
    assert path_problem(os.fsencode(path)) == reason


@pytest.mark.parametrize("path", ACCEPTED)
def test_accepted(path: str) -> None:
    assert path_problem(path) is None
    assert check_path(path) == path
    assert check_path(os.fsencode(path)) == path
    assert os.path.normpath(path) == path and not os.path.isabs(path)


def test_reasons_name_the_problem() -> None:
    assert path_problem(".git/config") == "a '.git' component (git's own metadata)"
    assert "shadow store" in (path_problem(".Narrative/x") or "")
    assert path_problem("/x") == "absolute path"
    assert "'..'" in (path_problem("a/../b") or "")
    assert "NUL" in (path_problem("a\x00") or "")
    assert "255" in (path_problem("y" * 300) or "")
    assert "4096" in (path_problem("/".join(["z" * 100] * 50)) or "")
    assert "encodable" in (path_problem("a\ud800") or "")


def test_bytes_paths_and_invalid_utf8() -> None:
    # git stops reading a name at invalid UTF-8: right after ".git" that counts as ".git"
    assert path_problem(b".git\xff/x") is not None
    assert path_problem(b"a\xff/b") is None
    assert check_path(b"a\xff/b") == os.fsdecode(b"a\xff/b")
    assert path_problem(os.fsdecode(b".git\xff")) is not None


def test_components_for_tree_walkers() -> None:
    assert component_problem(".narrative", top_level=True) is not None
    assert component_problem(".narrative", top_level=False) is None
    assert component_problem(".GIT", top_level=False) is not None
    assert component_problem(b"git~1", top_level=False) is not None
    assert component_problem("a/b", top_level=False) is not None
    assert component_problem("ok", top_level=True) is None
    with pytest.raises(UnsafePath, match=r"sub/\.git"):
        check_component(".git", top_level=False, path="sub/.git")
    check_component("fine", top_level=True)


def test_lookalike_predicates() -> None:
    assert is_dotgit(".GIT") and is_dotgit("git~1 ..") and is_dotgit(".g\u200dit")
    assert not is_dotgit(".gitignore") and not is_dotgit("git")
    assert is_store_name(".NARRATIVE. ") and is_store_name("\ufeff.narrative")
    assert is_store_name(unicodedata.normalize("NFD", ".narrative"))
    assert not is_store_name(".narratives")


# ------------------------------------------------------------------ stock git as the oracle

ORACLE_CONFIG = ("-c", "core.protectHFS=true", "-c", "core.protectNTFS=true")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A scratch repository and the id of an empty blob to stage under generated names."""
    repo = tmp_path_factory.mktemp("oracle")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    blob = (
        subprocess.run(
            ["git", "hash-object", "-w", "--stdin"],
            cwd=repo,
            input=b"",
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    return repo, blob


def git_accepts(repo: Path, blob: str, path: str) -> bool:
    index = repo / ".git" / "index"
    index.unlink(missing_ok=True)
    done = subprocess.run(
        ["git", *ORACLE_CONFIG, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"],
        cwd=repo,
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def encodable(path: str) -> bool:
    """Whether ``path`` has a file system encoding (a lone surrogate such as ``\ud800`` has
    none, not even through surrogateescape)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def refused_for_our_reasons_only(path: str) -> bool:
    """Whether ``path`` has something only our rule refuses (git has no such check)."""
    raw = os.fsencode(path)
    parts = raw.split(b"/")
    return (
        b"\\" in raw
        or len(raw) > MAX_PATH_BYTES
        or any(len(p) > MAX_COMPONENT_BYTES for p in parts)
        or is_store_name(parts[0])
    )


def _lookalike(draw: st.DrawFn, base: str) -> str:
    """``base`` in random case, with HFS+ ignorables sprinkled in, trailing dots and spaces,
    an NTFS stream suffix, in NFC or NFD."""
    out = []
    for char in base:
        out.append(char.upper() if draw(st.booleans()) else char)
        if draw(st.integers(0, 5)) == 0:
            out.append(draw(st.sampled_from(sorted(HFS_IGNORABLES))))
    name = "".join(out) + draw(st.text(alphabet=". ", max_size=3))
    if draw(st.integers(0, 6)) == 0:
        name += draw(st.sampled_from(["::$INDEX_ALLOCATION", ":x", ":"]))
    return unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), name)


BASES = [".git", "git~1", ".narrative", "narrat~1", ".gitmodules", ".", "..", "...", "é", "ä"]


@st.composite
def components(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return _lookalike(draw, draw(st.sampled_from(BASES)))
    if kind == 1:
        return draw(st.text(alphabet="./\\~ gitGITnarv1:\u200c\ufeff", max_size=8))
    if kind == 2:
        return "x" * draw(st.integers(250, 260))
    return draw(st.text(st.characters(exclude_characters="/"), max_size=12))


@st.composite
def paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(components(), min_size=1, max_size=5))
    prefix = "/" if draw(st.integers(0, 9)) == 0 else ""
    return prefix + "/".join(parts)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths())
def test_rule_agrees_with_stock_git(oracle: tuple[Path, str], path: str) -> None:
    ours = path_problem(path)
    if "\x00" in path or not encodable(path):  # cannot reach git through argv: refused
        assert ours is not None
        return
    theirs = git_accepts(*oracle, path)
    if not theirs:
        assert ours is not None, f"git refuses {path!r}, we accept it"
    elif ours is not None:
        assert refused_for_our_reasons_only(path), f"we refuse {path!r} ({ours}), git does not"
    # an accepted path stays below any root it is joined to
    if ours is None:
        assert os.path.normpath(path) == path and not path.startswith("/")
        assert ".." not in path.split("/")
    # bytes and str agree, and the raising form raises exactly when the predicate says so
    assert path_problem(os.fsencode(path)) == ours
    if ours is None:
        check_path(path)
    else:
        with pytest.raises(UnsafePath):
            check_path(path)
