"""Ignore rules: the own matcher (narrative.ignore) vs pathspec's GitIgnoreSpec, stock
``git check-ignore`` as the oracle (docs/decisions.md).

A realistic root ``.gitignore`` (Python, Node and editor patterns, anchored and ``**``
patterns, directory-only patterns, character classes, negations) over ~50k paths of a generated
tree. Both matchers answer for each entry itself, the way the scanner asks while it walks
(an entry under an ignored directory is never asked about); an entry counts as ignored when it or
a parent directory is. The same files are created on disk in a git repository and every path is
given to ``git check-ignore --stdin``.

Usage::

    pip install -e ".[bench]"              # pathspec
    python bench/bench_ignore.py            # 50k paths, best of 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from collections.abc import Callable

from common import best_of

IGNORE = (
    """\
# Python
__pycache__/
*.py[cod]
*$py.class
*.so
.Python
build/
develop-eggs/
dist/
downloads/
eggs/
.eggs/
/lib/
lib64/
parts/
sdist/
var/
wheels/
*.egg-info/
.installed.cfg
*.egg
MANIFEST
.tox/
.nox/
.coverage
.coverage.*
.cache
nosetests.xml
coverage.xml
*.cover
.hypothesis/
.pytest_cache/
.mypy_cache/
.ruff_cache/
.env
.venv
env/
venv/
ENV/
# Node
node_modules/
npm-debug.log*
yarn-debug.log*
yarn-error.log*
.pnpm-debug.log*
/coverage
.next/
out/
# logs, but keep the important ones
logs/
*.log
!important.log
!/keep/**/*.log
# editors and OS
.idea/
.vscode/*
!.vscode/settings.json
*.sw[op]
*~
.DS_Store
Thumbs.db
# data, except the samples
data/**/*.csv
!data/samples/*.csv
**/fixtures/generated/
docs/_build/
src/**/tmp[0-9]/
*.tmp
!keep.tmp
\\#*
**/cache/**
[[:upper:]]*.md
![R]EADME.md
src/**/gen/
"""
    + "trailing\\ \n"
)  # an escaped trailing space: a name ending in a space


def make_paths(count: int) -> list[tuple[str, bool]]:
    """(path, is_dir) for every entry of a generated tree, parents before children."""
    entries: dict[str, bool] = {}

    def add(path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), True)
        entries[path] = False

    names = [
        "mod.py",
        "mod.pyc",
        "run.log",
        "important.log",
        "data.csv",
        "notes.tmp",
        "keep.tmp",
        "x.swp",
        "README.md",
        "#hash.txt",
        "Upper.md",
        "trailing ",
        "a.so",
        "b~",
        "settings.json",
        "index.js",
        "style.css",
    ]
    dirs = [
        "src/core",
        "src/core/gen",
        "src/api/v1",
        "src/api/v2",
        "tests/unit",
        "docs/api",
        "src/ui/components",
        "src/ui/pages",
        "scripts",
        "src/core/cache/a",
        "src/app",
        "src/app/__pycache__",
        "src/lib",
        "src/app/tmp1",
        "src/app/tmpx",
        "lib",
        "pkg/lib",
        "node_modules/left-pad",
        "web/node_modules/react",
        "logs",
        "keep/a/b",
        "data/raw/2024",
        "data/samples",
        "tests/fixtures/generated",
        "tests/fixtures/static",
        ".vscode",
        ".idea",
        "docs/_build/html",
        "docs/guide",
        "build/x",
        "venv/bin",
        "coverage",
        "web/coverage",
        "proj.egg-info",
        "web/.next/cache",
        "out",
    ]
    i = 0
    while len(entries) < count:
        base = dirs[i % len(dirs)]
        add(f"{base}/d{i // 300 % 40}/{names[i % len(names)].replace('.', f'{i}.', 1)}")
        add(f"{base}/{names[(i * 7) % len(names)]}")
        i += 1
    return list(entries.items())


def effective(is_ignored: Callable[[str, bool], bool], paths: list[tuple[str, bool]]) -> set[str]:
    """Paths ignored themselves or through a parent, asking as the walking scanner does."""
    ignored: set[str] = set()
    for path, is_dir in paths:  # parents come first
        parent = path.rpartition("/")[0]
        if (parent and parent in ignored) or is_ignored(path, is_dir):
            ignored.add(path)
    return ignored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=50_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import pathspec

    from narrative.ignore import IgnoreRules

    lines = IGNORE.splitlines()
    paths = make_paths(args.paths)
    own_rules = IgnoreRules.empty().extend(lines, "")
    spec = pathspec.GitIgnoreSpec.from_lines(lines)

    def own(path: str, is_dir: bool) -> bool:
        return own_rules.is_ignored(path, is_dir)

    def lib(path: str, is_dir: bool) -> bool:
        return spec.match_file(path + "/" if is_dir else path)

    t_compile_own = best_of(args.reps, lambda: IgnoreRules.empty().extend(lines, ""))
    t_compile_lib = best_of(args.reps, lambda: pathspec.GitIgnoreSpec.from_lines(lines))
    t_own = best_of(args.reps, lambda: [own(p, d) for p, d in paths])
    t_lib = best_of(args.reps, lambda: [lib(p, d) for p, d in paths])

    with tempfile.TemporaryDirectory() as repo:
        subprocess.run(["git", "init", "-q", repo], check=True)
        with open(os.path.join(repo, ".gitignore"), "w") as f:
            f.write(IGNORE)
        for path, is_dir in paths:
            full = os.path.join(repo, path)
            if is_dir:
                os.makedirs(full, exist_ok=True)
            else:
                open(full, "wb").close()
        out = subprocess.run(
            ["git", "-C", repo, "check-ignore", "--stdin", "-z"],
            input="\0".join(p for p, _ in paths) + "\0",
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    oracle = {p for p in out.split("\0") if p}
    own_set = effective(own, paths)
    lib_set = effective(lib, paths)

    n = len(paths)
    print(f"{n} paths, {len(oracle)} ignored according to git check-ignore")
    print(f"compile  own {t_compile_own * 1e3:7.2f} ms   pathspec {t_compile_lib * 1e3:7.2f} ms")
    print(
        f"match    own {t_own * 1e3:7.1f} ms ({t_own / n * 1e6:.2f} us/path)   "
        f"pathspec {t_lib * 1e3:7.1f} ms ({t_lib / n * 1e6:.2f} us/path)   "
        f"pathspec/own x{t_lib / t_own:.1f}"
    )
    for name, got in (("own", own_set), ("pathspec", lib_set)):
        wrong = sorted(got ^ oracle)
        example = f", e.g. {wrong[:4]}" if wrong else ""
        print(f"{name:8} disagrees with git on {len(wrong)} paths{example}")


if __name__ == "__main__":
    main()
