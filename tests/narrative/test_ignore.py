"""Tests for narrative.ignore: unit edge cases, and stock git as the oracle for real trees."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from narrative.ignore import IgnoreRules, read_ignore_file

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def rules_of(*sources: tuple[str, list[str]]) -> IgnoreRules:
    rules = IgnoreRules.empty()
    for base, lines in sources:
        rules = rules.extend(lines, base)
    return rules


def root_rules(*lines: str) -> IgnoreRules:
    return rules_of(("", list(lines)))


# --------------------------------------------------------------------------- unit: semantics


@pytest.mark.parametrize(
    ("lines", "path", "is_dir", "expected"),
    [
        # blank lines, comments and escapes
        (["", "   ", "# foo"], "# foo", False, False),
        (["#foo"], "#foo", False, False),
        (["\\#foo"], "#foo", False, True),
        ([" #foo"], " #foo", False, True),
        (["\\!foo"], "!foo", False, True),
        (["\\!foo"], "foo", False, False),
        (["foo", "!foo"], "foo", False, False),
        (["!foo", "foo"], "foo", False, True),
        (["!"], "!", False, False),
        # trailing spaces: unescaped stripped, escaped kept, tabs kept
        (["foo   "], "foo", False, True),
        (["foo\\ "], "foo ", False, True),
        (["foo\\ "], "foo", False, False),
        (["foo\\  "], "foo ", False, True),
        (["foo \\ "], "foo  ", False, True),
        (["foo\t"], "foo\t", False, True),
        (["foo\t"], "foo", False, False),
        # line endings handed over by callers
        (["foo\n"], "foo", False, True),
        (["foo\r\n"], "foo", False, True),
        (["foo\r"], "foo", False, True),
        # directory-only
        (["build/"], "build", True, True),
        (["build/"], "build", False, False),
        (["build/"], "src/build", True, True),
        (["a/build/"], "a/build", True, True),
        (["a/build/"], "a/build", False, False),
        (["build"], "build", True, True),
        # anchoring: a slash anywhere but at the end anchors
        (["/foo"], "foo", False, True),
        (["/foo"], "a/foo", False, False),
        (["foo"], "a/b/foo", False, True),
        (["a/foo"], "a/foo", False, True),
        (["a/foo"], "x/a/foo", False, False),
        (["a/*"], "a/b", False, True),
        (["a/*"], "a/b/c", False, False),
        (["foo/"], "a/foo", True, True),
        (["//foo"], "foo", False, False),
        # '*' and '?' do not cross '/'
        (["a*b"], "a/b", False, False),
        (["a?b"], "a/b", False, False),
        (["a?b"], "axb", False, True),
        (["x/a*b"], "x/a/b", False, False),
        (["x/a?b"], "x/a/b", False, False),
        (["*"], "anything", False, True),
        (["*.txt"], "d/.txt", False, True),
        (["*.txt"], "d/a.txt.bak", False, False),
        # '**'
        (["**/foo"], "foo", False, True),
        (["**/foo"], "a/b/foo", False, True),
        (["**/a/foo"], "x/a/foo", False, True),
        (["**/a/foo"], "a/foo", False, True),
        (["a/**"], "a/b", False, True),
        (["a/**"], "a/b/c", False, True),
        (["a/**"], "a", True, False),
        (["a/**/b"], "a/b", False, True),
        (["a/**/b"], "a/x/y/b", False, True),
        (["a/**/b"], "a/xb", False, False),
        (["a**b"], "axyb", False, True),
        (["x/a**b"], "x/a/b", False, False),
        (["x/**b"], "x/y/b", False, False),
        (["x/**b"], "x/yb", False, True),
        (["foo**/bar"], "foo/x/y/bar", False, True),  # git quirk: '**' right after the literal
        (["foo**/bar"], "foo/bar", False, True),
        (["a**/b*"], "ab", False, True),
        (["a**/b*"], "axx/y/bz", False, True),
        (["*", "!a**/b*"], "ab", False, False),
        (["a/**/"], "a/b", True, True),
        (["a/**/"], "a/b", False, False),
        (["a/***/b"], "a/x/y/b", False, True),
        (["a/**\\/b"], "a/x/b", False, True),
        (["a/**\\/b"], "a/b", False, False),
        (["**"], "a/b", False, True),
        (["/**"], "a", False, True),
        # bracket expressions
        (["[ab]"], "a", False, True),
        (["[ab]"], "c", False, False),
        (["[!ab]"], "c", False, True),
        (["[!ab]"], "a", False, False),
        (["[^ab]"], "c", False, True),
        (["[a-c]x"], "bx", False, True),
        (["[a-c]x"], "dx", False, False),
        (["[c-a]x"], "bx", False, False),
        (["[]]"], "]", False, True),
        (["[!]]"], "a", False, True),
        (["[!]]"], "]", False, False),
        (["[a-]"], "-", False, True),
        (["[\\]]"], "]", False, True),
        (["[a\\-c]"], "b", False, False),
        (["[[:digit:]]x"], "7x", False, True),
        (["[[:digit:]]x"], "ax", False, False),
        (["[[:alpha:][:digit:]]"], "Q", False, True),
        (["[[:space:]]"], " ", False, True),
        (["[[:space:]]"], "\v", False, False),
        (["[[:upper:]]"], "A", False, True),
        (["[[:upper:]]"], "a", False, False),
        (["[[:punct:]]"], "_", False, True),
        (["[[:xdigit:]]"], "F", False, True),
        (["[[:xdigit:]]"], "g", False, False),
        (["[[:foo:]]"], "f", False, False),  # unknown class: never matches
        (["[[:alpha]"], "[", False, True),  # no ":]": a plain set
        (["[[:alpha]"], "a", False, True),
        (["x[!a]y"], "x/y", False, False),
        (["a/x[!a]y"], "a/x/y", False, False),
        # invalid patterns never match and never raise
        (["[a"], "[a", False, False),
        (["[a", "*"], "[a", False, True),
        (["[!"], "[!", False, False),
        (["foo\\"], "foo\\", False, False),
        (["foo\\"], "foo", False, False),
        (["[[:alpha:]"], "a", False, False),
        # backslash escapes
        (["\\*"], "*", False, True),
        (["\\*"], "a", False, False),
        (["\\a"], "a", False, True),
        (["a\\?"], "a?", False, True),
        (["a\\?"], "ab", False, False),
        (["\\[a]"], "[a]", False, True),
        # bytes, not characters: 'é' is two bytes in UTF-8
        (["caf?"], "café", False, False),
        (["caf??"], "café", False, True),
        (["café"], "café", False, True),
        (["[é]"], "é", False, False),
        (["*é"], "d/xé", False, True),
        (["caf?"], "caf\udce9", False, True),  # a lone undecodable byte from os.fsdecode
    ],
)
def test_pattern_semantics(lines: list[str], path: str, is_dir: bool, expected: bool) -> None:
    assert root_rules(*lines).is_ignored(path, is_dir) is expected


def test_base_restricts_patterns_to_the_subtree() -> None:
    rules = rules_of(("sub", ["x", "/y", "a/z", "d/"]))
    assert rules.is_ignored("sub/x", False)
    assert rules.is_ignored("sub/deep/x", False)
    assert not rules.is_ignored("x", False)
    assert not rules.is_ignored("subx/x", False)
    assert not rules.is_ignored("other/sub/x", False)
    assert rules.is_ignored("sub/y", False)
    assert not rules.is_ignored("sub/deep/y", False)
    assert rules.is_ignored("sub/a/z", False)
    assert not rules.is_ignored("sub/deep/a/z", False)
    assert rules.is_ignored("sub/q/d", True)
    assert not rules.is_ignored("sub", True)


def test_later_sources_override_earlier_ones() -> None:
    rules = rules_of(("", ["*.log", "keep"]), ("sub", ["!*.log"]), ("sub/deeper", ["keep.log"]))
    assert rules.is_ignored("a.log", False)
    assert not rules.is_ignored("sub/a.log", False)
    assert not rules.is_ignored("sub/deeper/a.log", False)
    assert rules.is_ignored("sub/deeper/keep.log", False)
    assert rules.is_ignored("sub/keep", False)
    # a sibling's file never applies
    assert rules.is_ignored("other/a.log", False)


def test_last_matching_pattern_wins_within_a_file() -> None:
    rules = root_rules("*.log", "!important.log", "important.log", "!very/important.log")
    assert rules.is_ignored("important.log", False)
    assert not rules.is_ignored("very/important.log", False)
    assert rules.is_ignored("x/very/important.log", False)
    dirs = root_rules("out/", "!out")
    assert not dirs.is_ignored("out", True)
    assert not dirs.is_ignored("out", False)


def test_truthiness_and_immutability() -> None:
    empty = IgnoreRules.empty()
    assert not empty
    assert not empty.is_ignored("a", False)
    assert empty.extend(["", "# only comments", "   "], "") is empty
    assert empty.extend(["[unterminated"], "") is empty
    negations = empty.extend(["!a"], "")
    assert not negations
    assert not negations.is_ignored("a", False)
    rules = negations.extend(["a"], "sub")
    assert rules
    assert not negations.is_ignored("sub/a", False)
    assert rules.is_ignored("sub/a", False)
    assert empty.extend(iter(["a"]), "").is_ignored("a", False)


def test_files_and_dirs_are_cached_separately() -> None:
    rules = root_rules("d/", "f")
    for _ in range(2):
        assert rules.is_ignored("x/d", True)
        assert not rules.is_ignored("x/d", False)
        assert rules.is_ignored("f", False)
        assert rules.is_ignored("f", True)


def test_star_patterns_keep_precedence() -> None:
    # '[^/]*'-led branches share one scan; polarity runs must stay in order
    rules = root_rules("npm-debug.log*", "!npm-debug.log.keep*", "npm-debug.log.keep.x*", ".cov*")
    assert rules.is_ignored("npm-debug.log", False)
    assert rules.is_ignored("d/npm-debug.log.1", False)
    assert not rules.is_ignored("npm-debug.log.keep", False)
    assert rules.is_ignored("npm-debug.log.keep.xy", False)
    assert rules.is_ignored(".coverage", False)
    assert not rules.is_ignored("x.cov", False)
    assert not rules.is_ignored("pm-debug.log", False)


def test_many_patterns_last_one_wins() -> None:
    rng = random.Random(7)
    lines = [rng.choice(["", "!"]) + f"f{rng.randrange(50)}" for _ in range(500)]
    rules = root_rules("f*", *lines)
    for i in range(60):
        decisive = [line for line in ["f*", *lines] if line.lstrip("!") in (f"f{i}", "f*")]
        assert rules.is_ignored(f"f{i}", False) is not decisive[-1].startswith("!")


# --------------------------------------------------------------------------- read_ignore_file


def test_read_ignore_file(tmp_path: Path) -> None:
    path = tmp_path / ".gitignore"
    path.write_bytes(b"\xef\xbb\xbfa\r\nb\\\x0bc\n\n#x\nd\xff\ne")
    lines = read_ignore_file(str(path))
    assert lines == ["a\r", "b\\\x0bc", "", "#x", "d\udcff", "e"]
    rules = IgnoreRules.empty().extend(lines, "")
    assert rules.is_ignored("a", False)
    assert rules.is_ignored("d\udcff", False)
    assert not rules.is_ignored("\ufeffa", False)


def test_read_ignore_file_unreadable(tmp_path: Path) -> None:
    assert read_ignore_file(str(tmp_path / "missing")) == []
    assert read_ignore_file(str(tmp_path)) == []
    assert read_ignore_file("bad\0path") == []
    (tmp_path / "empty").write_bytes(b"")
    assert read_ignore_file(str(tmp_path / "empty")) == []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_ignore_file(str(fifo)) == []  # must not block


def test_read_ignore_file_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("x\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_ignore_file(str(link)) == ["x"]
    assert read_ignore_file(str(link), follow_symlinks=False) == []
    assert read_ignore_file(str(target), follow_symlinks=False) == ["x"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_read_ignore_file_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("x\n")
    path.chmod(0)
    try:
        assert read_ignore_file(str(path)) == []
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


# --------------------------------------------------------------------------- git as the oracle


@pytest.fixture
def git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        LC_ALL="C",
    )
    return env


def build_tree(root: Path, entries: list[str], ignore_files: dict[str, list[str]]) -> None:
    """Create ``entries`` (dirs end in '/') and ``.gitignore`` files under ``root``."""
    root.mkdir()
    for entry in entries:
        path = root / entry
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    for base, lines in ignore_files.items():
        content = "".join(line + "\n" for line in lines)
        (root / base / ".gitignore").write_bytes(content.encode("utf-8", "surrogateescape"))


def scan(root: Path) -> list[tuple[str, bool, bool]]:
    """Walk like the workspace scanner: (relpath, is_dir, ignored) of every visited entry."""
    out: list[tuple[str, bool, bool]] = []

    def walk(rel_dir: str, rules: IgnoreRules) -> None:
        abs_dir = os.path.join(root, rel_dir)
        names = sorted(os.listdir(abs_dir))
        if ".gitignore" in names:
            lines = read_ignore_file(os.path.join(abs_dir, ".gitignore"), follow_symlinks=False)
            rules = rules.extend(lines, rel_dir)
        for name in names:
            if name == ".git":
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            is_dir = os.path.isdir(os.path.join(abs_dir, name))
            ignored = bool(rules) and rules.is_ignored(rel, is_dir)
            out.append((rel, is_dir, ignored))
            if is_dir and not ignored:
                walk(rel, rules)

    walk("", IgnoreRules.empty())
    return out


def git_ignored(root: Path, paths: list[str], env: dict[str, str]) -> dict[str, bool]:
    """Ask ``git check-ignore`` about each path; negated matches count as not ignored."""
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q", "--template=", str(root)], check=True, env=env)
    data = b"".join(os.fsencode(p) + b"\0" for p in paths)
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "-v", "-n", "-z", "--stdin"],
        cwd=root,
        input=data,
        capture_output=True,
        env=env,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr.decode(errors="replace")
    fields = proc.stdout.split(b"\0")[:-1]
    assert len(fields) == 4 * len(paths)
    result: dict[str, bool] = {}
    for i in range(0, len(fields), 4):
        _source, _line, pattern, path = fields[i : i + 4]
        result[os.fsdecode(path)] = bool(pattern) and not pattern.startswith(b"!")
    return result


def assert_same_as_git(root: Path, env: dict[str, str]) -> list[tuple[str, bool, bool]]:
    visited = scan(root)
    expected = git_ignored(root, [rel for rel, _, _ in visited], env)
    mismatches = [
        (rel, "dir" if is_dir else "file", f"ours={ours}", f"git={expected[rel]}")
        for rel, is_dir, ours in visited
        if ours != expected[rel]
    ]
    assert not mismatches
    return visited


ROOT_PATTERNS = [
    "# comment",
    "",
    "*.log",
    "!keep.log",
    "/build",
    "dist/",
    "docs/_build/",
    "**/cache",
    "logs/**",
    "!logs/important/",
    "a/**/z",
    "*.py[cod]",
    "[Tt]emp*",
    "[!a-m]*.bak",
    "[^n-z]*.old",
    "[[:digit:]][[:digit:]].dat",
    "\\#hash",
    "\\!bang",
    "trail   ",
    "esc\\ ",
    "q?.txt",
    "node_modules/",
    "*.min.*",
    "foo**/bar",
    "**/deep/**/leaf",
    "x[ab]/y",
    "/root-only/",
    "nested/*.tmp",
    "!nested/keep.tmp",
    "[unterminated",
    "ends\\",
    "*.c\\*",
    "café",
    "ca?é.txt",
]

SUB_PATTERNS = {
    "src": ["*.o", "!main.o", "/gen/", "tmp", "!*.log", "lib/*.a", "crlf\r", "cr\r\r"],
    "src/lib": ["\ufeffbom", "!tmp", "*.a", "!keep.a", "sub/", "\ufeffbom2"],
    "docs": ["*", "!*.md", "!*/"],
}

ENTRIES = [
    "a.log", "keep.log", "sub/keep.log", "sub/x.log",
    "build/", "build/out.txt", "src/build/", "src/build/x", "build2",
    "dist/", "dist.txt", "src/dist/", "lib/dist",
    "docs/_build/", "docs/readme.md", "docs/notes.txt", "docs/guide/", "docs/guide/a.md",
    "docs/guide/b.txt", "x/docs/_build/",
    "cache/", "a/cache", "a/b/cache/", "a/b/cache/f",
    "logs/", "logs/a.txt", "logs/important/", "logs/important/b.txt", "logs/x/y",
    "a/z", "a/b/z", "a/b/c/z", "a/zz", "b/a/z",
    "m.pyc", "m.pyo", "m.pyx", "pkg/m.pyd",
    "Temp1", "temp/", "temp/x", "tEmp",
    "z.bak", "a.bak", "n.old", "a.old",
    "12.dat", "1a.dat", "123.dat",
    "#hash", "\\#hash", "!bang", "bang",
    "trail", "trail ", "esc ", "esc",
    "q1.txt", "q12.txt", "q/.txt",
    "node_modules/", "node_modules/p/index.js", "web/node_modules/", "node_modules.txt",
    "app.min.js", "app.js", "min.js",
    "foo/bar", "foo/x/bar", "foobar", "fooz/q/bar",
    "deep/leaf", "p/deep/q/r/leaf", "deep/leaf2",
    "xa/y", "xb/y", "xc/y", "w/xa/y",
    "root-only/", "sub/root-only/", "root-only2",
    "nested/a.tmp", "nested/keep.tmp", "nested/d/a.tmp", "other/nested/a.tmp",
    "[unterminated", "ends\\", "ends",
    "f.c*", "f.c",
    "café", "cafe", "caxé.txt", "caé.txt",
    "src/main.o", "src/util.o", "src/gen/", "src/gen/g.c", "src/x/gen/", "src/tmp", "src/a/tmp/",
    "src/z.log", "src/lib/tmp", "src/lib/x.a", "src/lib/keep.a", "src/lib/sub/", "src/lib/sub/f",
    "src/lib/sub2", "src/other/lib/x.a", "src/lib/inner/y.a",
    "src/crlf", "src/crlf\r", "src/cr", "src/cr\r",
    "src/lib/bom", "src/lib/bom2", "src/lib/\ufeffbom2",
]  # fmt: skip


@needs_git
def test_handwritten_tree_matches_git(tmp_path: Path, git_env: dict[str, str]) -> None:
    root = tmp_path / "repo"
    build_tree(root, ENTRIES, {"": ROOT_PATTERNS, **SUB_PATTERNS})
    visited = assert_same_as_git(root, git_env)
    ignored = {rel for rel, _, ours in visited if ours}
    # sanity: the tree exercises both outcomes, negations and nested files
    assert {"a.log", "build", "src/util.o", "src/lib/x.a", "src/crlf", "src/cr\r"} <= ignored
    assert {"src/lib/bom", "src/lib/\ufeffbom2"} <= ignored
    assert not {"keep.log", "src/main.o", "src/z.log", "src/lib/keep.a"} & ignored
    assert len(ignored) > 40
    assert len(visited) - len(ignored) > 40


NAME_PARTS = ["a", "b", "ab", "ba", "a.b", "b.c", "c", "x y", "#a", "!b", "é", "[a]", "a*", "\\b"]
NAME_PARTS += ["A1", "9", "a ", "-", "b\udce9", ".a", "a-b", "tmp"]

PATTERN_ATOMS = ["a", "b", "c", "ab", "a.b", "é", "*", "?", "**", "*.b", "a*", "*b", "[ab]"]
PATTERN_ATOMS += ["[!a]", "[^b]*", "[a-c]", "[[:alpha:]]", "[[:digit:]]", "\\*", "\\[a]", "x y"]
PATTERN_ATOMS += ["#a", "\\#a", "\\!b", "[]a]", "[a-]", "?*", "\\b", "a\\ ", "[[:space:]]"]
PATTERN_ATOMS += ["tmp", "9", "A1", "b\udce9", "[!]]", "a-b", "[a"]
DENSE_ATOMS = ["a", "b", "*", "?", "[ab]", "/", "é", "-", "**", "!", "\\", "[!a]"]


def random_pattern(rng: random.Random) -> str:
    segments = [rng.choice(PATTERN_ATOMS) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]
    if rng.random() < 0.3:
        segments[0] = rng.choice(PATTERN_ATOMS) + rng.choice(PATTERN_ATOMS)
    pattern = "/".join(segments)
    if rng.random() < 0.15:
        pattern = "**/" + pattern
    if rng.random() < 0.1:
        pattern += "/**"
    if rng.random() < 0.2:
        pattern = "/" + pattern
    if rng.random() < 0.25:
        pattern += "/"
    if rng.random() < 0.1:
        pattern += rng.choice(["  ", " \\ ", "\\  "])
    if rng.random() < 0.3:
        pattern = "!" + pattern
    return pattern


def dense_pattern(rng: random.Random) -> str:
    """Short patterns over a tiny alphabet: wildcards next to each other, odd '**' places."""
    body = "".join(rng.choice(DENSE_ATOMS) for _ in range(rng.randint(1, 7)))
    return ("!" if rng.random() < 0.4 else "") + body


def random_tree(rng: random.Random) -> tuple[list[str], dict[str, list[str]]]:
    entries: list[str] = []
    ignore_files: dict[str, list[str]] = {}

    def fill(rel_dir: str, depth: int) -> None:
        if rel_dir == "" or rng.random() < 0.4:
            ignore_files[rel_dir] = [random_pattern(rng) for _ in range(rng.randint(3, 25))]
        for name in rng.sample(NAME_PARTS, rng.randint(3, 9)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if depth < 3 and rng.random() < 0.35:
                entries.append(rel + "/")
                fill(rel, depth + 1)
            else:
                entries.append(rel)

    fill("", 0)
    return entries, ignore_files


@needs_git
@pytest.mark.parametrize("seed", range(12))
def test_randomized_trees_match_git(tmp_path: Path, git_env: dict[str, str], seed: int) -> None:
    rng = random.Random(seed)
    entries, ignore_files = random_tree(rng)
    root = tmp_path / "repo"
    build_tree(root, entries, ignore_files)
    assert_same_as_git(root, git_env)


@needs_git
@pytest.mark.parametrize("generator", [random_pattern, dense_pattern])
def test_many_random_paths_match_git(
    tmp_path: Path, git_env: dict[str, str], generator: Callable[[random.Random], str]
) -> None:
    """Rounds of random patterns against a few thousand paths, each judged on its own."""
    rng = random.Random(4242)
    entries: set[str] = set()
    while len(entries) < 3000:
        entries.add("/".join(rng.choice(NAME_PARTS) for _ in range(rng.randint(1, 4))))
    # a name is a file unless it is an ancestor of another entry
    parents = {e[:i] for e in entries for i, ch in enumerate(e) if ch == "/"}
    all_paths = sorted(parents | entries)
    root = tmp_path / "repo"
    build_tree(root, [p + "/" if p in parents else p for p in all_paths], {})
    subprocess.run(["git", "init", "-q", "--template=", str(root)], check=True, env=git_env)
    exclude = root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    compared = 0
    for _ in range(10):
        patterns = [generator(rng) for _ in range(rng.randint(1, 30))]
        exclude.write_bytes("".join(p + "\n" for p in patterns).encode("utf-8", "surrogateescape"))
        expected = git_ignored(root, all_paths, git_env)
        rules = IgnoreRules.empty().extend(patterns, "")
        mismatches = []
        for path in all_paths:
            # git reports the match of an ignored ancestor instead: skip those paths
            if any(expected[path[:i]] for i, ch in enumerate(path) if ch == "/"):
                continue
            compared += 1
            ours = rules.is_ignored(path, path in parents)
            if ours != expected[path]:
                mismatches.append((path, ours, expected[path]))
        assert not mismatches, patterns
    assert compared > 2500
