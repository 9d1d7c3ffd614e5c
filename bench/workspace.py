"""Deterministic workspace generator for the benchmarks (DESIGN.md §6).

Builds a synthetic "repository-like" workspace from a seed: many nested directories, ~70% text
files (source-like lines, compressible) and ~30% binary files (incompressible), a size
distribution with many small files and a few multi-MB ones, a couple of executables and a few
relative symlinks (to files and to a directory) that stay inside the workspace. The same
``(seed, files, size_mb)`` always produces byte-identical content, paths and modes.

Also offers deterministic mutation (:func:`touch_files`) and a tree comparison
(:func:`compare_dirs`) used to verify restores.

Usable as a module (``from workspace import generate``) or as a script::

    python bench/workspace.py DIR --files 50000 --size-mb 1000
    python bench/workspace.py DIR --touch 1000 --seed 7      # mutate an existing workspace
"""

from __future__ import annotations

import argparse
import filecmp
import math
import os
import random
import shutil
import stat
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_FILES",
    "DEFAULT_SIZE_MB",
    "MAX_FILE_SIZE",
    "WorkspaceInfo",
    "compare_dirs",
    "generate",
    "list_files",
    "touch_files",
]

DEFAULT_FILES = 50_000
DEFAULT_SIZE_MB = 1000
DEFAULT_SEED = 20240601
MIB = 1024 * 1024
#: Hard cap per file; well under the 50 MiB where hosting services start to complain.
MAX_FILE_SIZE = 24 * MIB
MAX_DEPTH = 5
FILES_PER_DIR = 25
TEXT_FRACTION = 0.70
CORPUS_SIZE = 4 * MIB
#: Top-level names never touched or compared (the store lives there).
DEFAULT_IGNORE = frozenset({".narrative"})

_DIR_WORDS = (  # noqa: SIM905
    "src lib pkg core utils tests docs assets internal api models vendor build config "
    "scripts data web cmd tools examples handlers services components fixtures schema "
    "proto plugins"
).split()
_FILE_WORDS = (  # noqa: SIM905
    "main util helper client server model view controller config parser lexer token store "
    "cache index router handler worker queue stream buffer codec schema types errors "
    "session"
).split()
_TEXT_EXT = (".py", ".py", ".py", ".js", ".ts", ".go", ".rs", ".c", ".h", ".md", ".json", ".txt")
_BIN_EXT = (".bin", ".png", ".jpg", ".zip", ".so", ".pdf", ".dat", ".woff2")


@dataclass(frozen=True)
class WorkspaceInfo:
    """Summary of a generated workspace."""

    root: Path
    files: int
    dirs: int
    symlinks: int
    executables: int
    text_files: int
    binary_files: int
    total_bytes: int
    largest_file: int
    seconds: float


@dataclass
class _FilePlan:
    rel: str
    kind: str  # "text" | "binary"
    size: int
    executable: bool = False


def _syllable_word(rng: random.Random) -> str:
    cons = "bcdfghklmnprstvz"
    vow = "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(1, 3)))


def _build_corpus(seed: int, size: int = CORPUS_SIZE) -> bytes:
    """Source-like text: repetitive identifiers and keywords, so it compresses like code."""
    rng = random.Random(f"corpus:{seed}")
    words = [_syllable_word(rng) for _ in range(600)]
    caps = [w.capitalize() for w in words[:150]]
    templates = (
        "def {a}_{b}({c}, {d}):",
        "{i}{a} = {b}.{c}({d}, {n})",
        "{i}return {a} + {n}",
        "{i}# {a} {b} {c} {d}",
        "class {A}{B}({C}):",
        "{i}if {a} is not None and {b} > {n}:",
        "import {a}.{b}",
        "from {a} import {b}, {c}",
        "",
        "{i}self.{a} = {b}",
        "const {a} = require('{b}/{c}');",
        "{i}for (int {a} = 0; {a} < {n}; ++{a}) {{",
        "{i}}}",
        '{i}{a}.{b}("{c} {d}", {n});',
        '{i}raise {A}Error(f"{a} {{{b}}} failed")',
        '{i}log.debug("%s: %d", {a}, {n})',
    )
    lines: list[str] = []
    total = 0
    while total < size:
        t = rng.choice(templates)
        line = t.format(
            i="    " * rng.randint(0, 3),
            a=rng.choice(words),
            b=rng.choice(words),
            c=rng.choice(words),
            d=rng.choice(words),
            A=rng.choice(caps),
            B=rng.choice(caps),
            C=rng.choice(caps),
            n=rng.randint(0, 4096),
        )
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()[:size]


def _plan_dirs(rng: random.Random, n_dirs: int) -> list[str]:
    """Relative dir paths ('' = root), shaped like a real tree.

    A dozen or so top-level dirs, most dirs at depth 2-4, some at the MAX_DEPTH cap.
    """
    n_top = min(n_dirs, max(3, round(math.sqrt(n_dirs) / 3)))
    by_depth: list[list[str]] = [[""]] + [[] for _ in range(MAX_DEPTH)]
    out = [""]
    depths = list(range(2, MAX_DEPTH + 1))
    weights = [25, 35, 25, 15][: len(depths)]
    for k in range(n_dirs):
        depth = 1 if k < n_top else rng.choices(depths, weights)[0]
        while not by_depth[depth - 1]:
            depth -= 1
        parent = rng.choice(by_depth[depth - 1])
        name = f"{rng.choice(_DIR_WORDS)}_{k}"
        rel = f"{parent}/{name}" if parent else name
        by_depth[depth].append(rel)
        out.append(rel)
    return out


def _plan_sizes(rng: random.Random, n: int, target: int) -> list[int]:
    """Many small files (log-normal, median ~4 KiB), a few multi-MB ones, a handful empty."""
    if n == 0:
        return []
    n_large = n // 2000 if n >= 2000 else (1 if n >= 100 else 0)
    large = [rng.randint(2 * MIB, 20 * MIB) for _ in range(n_large)]
    if large and sum(large) > target // 2:
        f = (target // 2) / sum(large)
        large = [max(1, int(s * f)) for s in large]
    n_small = n - n_large
    small = [rng.lognormvariate(math.log(4096), 1.4) for _ in range(n_small)]
    budget = max(0, target - sum(large))
    scale = budget / sum(small) if small and sum(small) > 0 else 0.0
    sizes = [min(MAX_FILE_SIZE, int(s * scale)) for s in small] + large
    # A few empty files (realistic: __init__.py, .keep).
    for idx in rng.sample(range(n_small), min(n_small, max(1, n // 1000))):
        sizes[idx] = 0
    rng.shuffle(sizes)
    return sizes


def _plan(seed: int, n_files: int, target_bytes: int) -> tuple[list[str], list[_FilePlan]]:
    rng = random.Random(seed)
    n_dirs = max(1, n_files // FILES_PER_DIR)
    dirs = _plan_dirs(rng, n_dirs)
    sizes = _plan_sizes(rng, n_files, target_bytes)
    # Every directory gets at least one file (git does not store empty dirs), then random.
    homes = [dirs[1 + i] if i < n_dirs else rng.choice(dirs) for i in range(n_files)]
    plans: list[_FilePlan] = []
    for i, (home, size) in enumerate(zip(homes, sizes, strict=True)):
        kind = "text" if rng.random() < TEXT_FRACTION else "binary"
        ext = rng.choice(_TEXT_EXT if kind == "text" else _BIN_EXT)
        name = f"{rng.choice(_FILE_WORDS)}_{i}{ext}"
        plans.append(_FilePlan(f"{home}/{name}" if home else name, kind, size))
    # A couple of executables: small text files turned into shell scripts.
    small_text = [p for p in plans if p.kind == "text" and 0 < p.size < 64 * 1024]
    for p in rng.sample(small_text, min(3, len(small_text))):
        p.executable = True
    return dirs, plans


def _write_file(
    root: Path, seed: int, i: int, p: _FilePlan, corpus: bytes, corpus2: memoryview
) -> None:
    frng = random.Random(f"{seed}:{i}")
    fd = os.open(root / p.rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with open(fd, "wb") as f:
        os.fchmod(fd, 0o755 if p.executable else 0o644)  # independent of the umask
        if p.kind == "binary":
            f.write(frng.randbytes(p.size))
            return
        if p.executable:
            header = f"#!/bin/sh\n# {p.rel}\necho {frng.getrandbits(64)}\nexit 0\n".encode()
        else:
            header = f"# {p.rel} ({frng.getrandbits(64):016x})\n".encode()
        off = corpus.find(b"\n", frng.randrange(len(corpus))) + 1
        head = header[: p.size]
        f.write(head)
        left = p.size - len(head)
        corpus_len = len(corpus)
        while left > 0:
            chunk = min(left, corpus_len)
            f.write(corpus2[off : off + chunk])
            left -= chunk
            off = 0


def generate(
    root: str | os.PathLike[str],
    files: int = DEFAULT_FILES,
    size_mb: float = DEFAULT_SIZE_MB,
    seed: int = DEFAULT_SEED,
    *,
    force: bool = False,
) -> WorkspaceInfo:
    """Create a deterministic workspace at ``root``.

    Args:
        root: Target directory; must not exist or be empty (or pass ``force``).
        files: Number of regular files (symlinks come on top).
        size_mb: Approximate total size in MiB.
        seed: Content seed; same arguments give a byte-identical workspace.
        force: Delete ``root`` first if it exists.
    """
    t0 = time.perf_counter()
    rootp = Path(root)
    if rootp.exists():
        if force:
            shutil.rmtree(rootp)
        elif any(rootp.iterdir()):
            raise FileExistsError(f"{rootp} exists and is not empty")
    rootp.mkdir(parents=True, exist_ok=True)

    dirs, plans = _plan(seed, files, int(size_mb * MIB))
    for d in dirs[1:]:
        (rootp / d).mkdir(parents=True, exist_ok=True)

    corpus = _build_corpus(seed)
    corpus2 = memoryview(corpus + corpus)
    # File creation is syscall-bound (slow on virtual disks); threads overlap it. Content
    # depends only on (seed, index), so the write order does not affect the result.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(
            pool.map(
                lambda ip: _write_file(rootp, seed, ip[0], ip[1], corpus, corpus2),
                enumerate(plans),
                chunksize=256,
            )
        )
    n_text = sum(p.kind == "text" for p in plans)
    n_bin = len(plans) - n_text

    # A few relative symlinks that stay inside the workspace: to files, and one to a directory.
    rng = random.Random(f"links:{seed}")
    n_links = 0
    if plans:
        for k in range(4):
            target = rng.choice(plans).rel
            home = rng.choice(dirs)
            link = rootp / home / f"link_{k}"
            os.symlink(os.path.relpath(rootp / target, rootp / home), link)
            n_links += 1
        if len(dirs) > 2:
            home = rng.choice(dirs)
            # Not an ancestor of (or equal to) the link's own directory: no cycles.
            choices = [d for d in dirs[1:] if not (home == d or home.startswith(d + "/"))]
            if choices:
                target = rng.choice(choices)
                os.symlink(os.path.relpath(rootp / target, rootp / home), rootp / home / "link_dir")
                n_links += 1

    return WorkspaceInfo(
        root=rootp,
        files=len(plans),
        dirs=len(dirs) - 1,
        symlinks=n_links,
        executables=sum(p.executable for p in plans),
        text_files=n_text,
        binary_files=n_bin,
        total_bytes=sum(p.size for p in plans),
        largest_file=max((p.size for p in plans), default=0),
        seconds=time.perf_counter() - t0,
    )


def list_files(root: str | os.PathLike[str], ignore: Iterable[str] = DEFAULT_IGNORE) -> list[str]:
    """Sorted relative paths of regular files (not symlinks) under ``root``.

    Top-level entries named in ``ignore`` (e.g. the ``.narrative`` store) are skipped.
    """
    skip = set(ignore)
    out: list[str] = []
    stack = [""]
    rootp = os.fspath(root)
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(rootp, rel) if rel else rootp) as it:
            for e in it:
                if not rel and e.name in skip:
                    continue
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append(r)
                elif e.is_file(follow_symlinks=False):
                    out.append(r)
    out.sort()
    return out


def touch_files(
    root: str | os.PathLike[str],
    n: int,
    seed: int | str,
    ignore: Iterable[str] = DEFAULT_IGNORE,
) -> list[str]:
    """Deterministically modify the content of ``n`` existing regular files.

    Each chosen file gets a marker overwritten at a seed-chosen offset and is then either grown
    (a tail appended) or, sometimes, shortened, so both size and content change. Cheap even for
    multi-MB files (no full rewrite). Symlinks are never followed. Returns the touched paths.
    """
    files = list_files(root, ignore)
    rng = random.Random(f"touch:{seed}")
    chosen = rng.sample(files, min(n, len(files)))
    for i, rel in enumerate(chosen):
        path = os.path.join(os.fspath(root), rel)
        marker = f"<<touch {seed} {i} {rng.getrandbits(48):012x}>>\n".encode()
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if size > 0:
                f.seek(rng.randrange(size))
                f.write(marker)
            size = max(size, f.tell())
            if size > 256 and rng.random() < 0.25:
                f.truncate(size - rng.randint(1, 128))
            else:
                f.seek(0, os.SEEK_END)
                f.write(marker * rng.randint(1, 4))
    return chosen


def compare_dirs(
    expected: str | os.PathLike[str],
    actual: str | os.PathLike[str],
    ignore: Iterable[str] = DEFAULT_IGNORE,
    limit: int = 20,
) -> list[str]:
    """Differences between two trees as git would see them (content, exec bit, symlinks).

    Empty directories are ignored (git cannot store them). Top-level names in ``ignore`` are
    skipped on both sides. Returns at most ``limit`` human-readable difference lines.
    """
    skip = set(ignore)

    def entries(root: str) -> dict[str, tuple[str, str | bool]]:
        out: dict[str, tuple[str, str | bool]] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                for e in it:
                    if not rel and e.name in skip:
                        continue
                    r = f"{rel}/{e.name}" if rel else e.name
                    if e.is_symlink():
                        out[r] = ("link", os.readlink(e.path))
                    elif e.is_dir():
                        stack.append(r)
                    elif e.is_file():
                        mode = e.stat(follow_symlinks=False).st_mode
                        out[r] = ("file", bool(mode & stat.S_IXUSR))
                    else:
                        out[r] = ("other", False)
        return out

    exp_root, act_root = os.fspath(expected), os.fspath(actual)
    exp, act = entries(exp_root), entries(act_root)
    diffs: list[str] = []
    for r in sorted(exp.keys() - act.keys()):
        diffs.append(f"missing: {r}")
    for r in sorted(act.keys() - exp.keys()):
        diffs.append(f"unexpected: {r}")
    for r in sorted(exp.keys() & act.keys()):
        if len(diffs) >= limit:
            break
        if exp[r] != act[r]:
            diffs.append(f"differs ({exp[r]} vs {act[r]}): {r}")
        elif exp[r][0] == "file" and not filecmp.cmp(
            os.path.join(exp_root, r), os.path.join(act_root, r), shallow=False
        ):
            diffs.append(f"content differs: {r}")
    return diffs[:limit]


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--files", type=int, default=DEFAULT_FILES)
    ap.add_argument("--size-mb", type=float, default=DEFAULT_SIZE_MB, help="total MiB")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--force", action="store_true", help="delete DIR first if it exists")
    ap.add_argument(
        "--touch", type=int, metavar="N", help="mutate N files of an existing DIR instead"
    )
    args = ap.parse_args(argv)
    if args.touch is not None:
        touched = touch_files(args.dir, args.touch, args.seed)
        print(f"touched {len(touched)} files in {args.dir}")
        return 0
    try:
        info = generate(args.dir, args.files, args.size_mb, args.seed, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc} (use --force)", file=sys.stderr)
        return 2
    print(
        f"{info.root}: {info.files} files ({info.text_files} text, {info.binary_files} binary, "
        f"{info.executables} executable), {info.dirs} dirs, {info.symlinks} symlinks, "
        f"{info.total_bytes / MIB:.1f} MiB (largest {info.largest_file / MIB:.1f} MiB) "
        f"in {info.seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
