"""Transfer benchmark: ``narrative export/import/push/pull`` against stock tools (DESIGN.md §6).

Generates a deterministic workspace (``workspace.py``), ``narrative init``s it and takes a first
snapshot plus a few more after small mutations, so the store is a few snapshots deep. Our store
is a real bare git repository (``STORE``, from ``narrative info``), so the anchors operate on
the very same store and workspace. For each scenario OUR CLI (as a user would run it,
subprocesses) and the ANCHOR run alternately (who goes first alternates between reps), several
reps, medians; a markdown table goes to stdout (progress to stderr) and every sample to a JSON
file under ``bench/results/``.

Scenarios (target = ours/anchor median ratio unless stated):

* ``bundle``: ``narrative export OUT.bundle --json`` vs
  ``git --git-dir STORE bundle create OUT --all``; target ≤ 0.25x.
* ``zst``: ``narrative export OUT --format tar.zst`` vs
  ``tar -c -C WS --exclude=.narrative . | zstd -T2 -q -o OUT``; target ≤ 1.2x.
* ``zst-cold``: the same, each of ours after removing the sizes and sha256s of blob contents
  that exports keep in the store (``narrative/cache/blob-digests``): the first export of
  contents no export hashed yet (``zst`` reuses them from its first rep on); reported.
* ``gz``: ``narrative export OUT --format tar.gz`` vs
  ``tar -cz -C WS --exclude=.narrative -f OUT .``; target ≤ 1.0x.
* ``incr``: change 1 file and snapshot (untimed), then ``narrative export OUT --since PREV_ID``
  vs ``git bundle create OUT THREAD_REF ^PREV_COMMIT``; target ≤ 0.5 s and ≤ 16 KiB (absolute).
* ``import``: ``narrative init`` an empty dir (untimed), then ``narrative import BUNDLE`` +
  ``narrative restore ID --to D`` vs ``git clone --mirror BUNDLE X.git`` +
  ``git --git-dir X.git --work-tree D2 checkout -f COMMIT -- .``; target ≤ 1.0x.
* ``s3``: ``narrative push`` (full) and ``narrative pull`` into an empty store against a moto S3
  server on 127.0.0.1 started in this process; MB/s reported, no anchor.

Our packages' bytecode is compiled once before the scenarios (``compileall``, as a wheel install
does; see ``common.compile_bytecode``). Peak RSS of ours (export, import) must stay ≤ 256 MB.
Both sides of ``import`` read OUR bundle (same input). A plain ``git clone --bare`` of a bundle
whose refs all live under ``refs/narrative/*`` fetches no refs (only heads and tags), so the
anchor clones with ``--mirror`` (a bare clone fetching ``refs/*``).

Untimed checks (first rep): our full bundle passes ``git bundle verify`` in an empty repository
and ``git clone --mirror`` of it yields exactly the refs our export reported; the incremental
bundle verifies against the store and advances the thread ref; extracted archives and restored
directories equal the workspace; the pulled store holds the pushed head. Failures print
**MISMATCH**.

Usage::

    python bench/bench_transfer.py --quick            # 5,000 files / 100 MiB
    python bench/bench_transfer.py                    # 50,000 files / ~1 GB, 3 reps
    python bench/bench_transfer.py --quick --scenarios bundle,incr --reps 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import workspace
from common import (
    MIB,
    Proc,
    Sample,
    SideError,
    SideStats,
    check,
    compile_bytecode,
    cpu_model,
    drop_store,
    fmt,
    git_version,
    isolated_env,
    log,
    parse_bench_args,
    run,
    store_of,
    write_results,
)

RSS_TARGET_MB = 256.0
INCR_MAX_SECONDS = 0.5
INCR_MAX_BYTES = 16 * 1024
S3_BUCKET = "bench"
#: Untimed snapshots after the first one, each after touching this many files.
HISTORY = (10, 10, 10)

#: key -> (label, ratio target or None)
SCENARIOS: dict[str, tuple[str, float | None]] = {
    "bundle": ("full bundle export", 0.25),
    "zst": ("tar.zst export", 1.2),
    "zst-cold": ("tar.zst export, no digest of the contents kept yet", None),
    "gz": ("tar.gz export", 1.0),
    "incr": ("incremental bundle (1 file changed)", None),
    "import": ("import bundle + restore --to", 1.0),
    "s3": ("S3 push/pull (moto, loopback)", None),
}

# Variables that could route S3 traffic elsewhere or make botocore read a real AWS setup.
_DROP_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
_SET_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: both sides' samples for one operation."""

    key: str
    label: str
    #: Ratio target (ours/anchor); None for absolute (incr) or reported-only (S3) rows.
    target: float | None
    ours: SideStats = field(default_factory=SideStats)
    anchor: SideStats = field(default_factory=SideStats)
    ours_bytes: list[int] = field(default_factory=list)
    anchor_bytes: list[int] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ours_reported: list[Any] = field(default_factory=list)
    anchor_reported: list[Any] = field(default_factory=list)
    #: RSS budget applies (export/import rows).
    rss_checked: bool = True
    has_anchor: bool = True

    @property
    def ratio(self) -> float | None:
        o, a = self.ours.median, self.anchor.median
        return o / a if o is not None and a else None

    @staticmethod
    def _median_bytes(v: list[int]) -> float | None:
        return statistics.median(v) if v else None

    @property
    def ours_size(self) -> float | None:
        return self._median_bytes(self.ours_bytes)

    @property
    def anchor_size(self) -> float | None:
        return self._median_bytes(self.anchor_bytes)

    @property
    def mb_per_s(self) -> float | None:
        size, t = self.ours_size, self.ours.median
        return size / MIB / t if size and t else None

    def target_text(self) -> str:
        if self.key == "incr":
            return f"≤ {INCR_MAX_SECONDS:g} s, ≤ {INCR_MAX_BYTES // 1024} KiB"
        if self.target is None:
            return "reported"
        return f"≤ {self.target:.2f}x"

    def status(self) -> str:
        if self.mismatches:
            return "**MISMATCH**"
        if self.ours.errors:
            return "**ERROR**"
        if self.has_anchor and self.anchor.errors:
            return "ANCHOR ERROR"
        peak = self.ours.peak_mb
        if self.ours.median is None or peak is None:
            return "n/a"
        why = []
        if self.key == "incr":
            if self.ours.median > INCR_MAX_SECONDS:
                why.append("time")
            if (self.ours_size or 0) > INCR_MAX_BYTES:
                why.append("size")
        elif self.target is not None:
            if self.ratio is None:
                return "n/a"
            if self.ratio > self.target:
                why.append("time")
        if self.rss_checked and peak > RSS_TARGET_MB:
            why.append("RSS")
        if why:
            return f"MISS ({', '.join(why)})"
        if self.target is None and self.key != "incr":
            rate = self.mb_per_s
            return f"reported: {rate:.1f} MB/s" if rate is not None else "reported"
        return "ok"


def _human(n: float | None) -> str:
    if n is None:
        return "—"
    if n < 10 * 1024:
        return f"{n:.0f} B"
    if n < 10 * MIB:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MIB:.1f} MiB"


def _json_doc(p: Proc) -> Any:
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as exc:
        raise SideError(
            f"`{' '.join(p.argv[:3])}` --json printed no JSON: {p.stdout[:300]!r}"
        ) from exc


def _rm(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _fresh_dir(p: Path) -> Path:
    _rm(p)
    p.mkdir(parents=True)
    return p


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.reps: int = args.reps
        self.exe = str(args.narrative)
        self.workdir = workdir
        self.ws = workdir / "ws"
        self.store = self.ws / ".narrative"  # set by the first init (the data directory)
        self.out = workdir / "out"
        self.tmp = workdir / "tmp"
        home = workdir / "home"
        for d in (home, self.out, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in isolated_env(home).items() if k not in _DROP_ENV}
        self.env = base | _SET_ENV
        self.rows: dict[str, Row] = {}
        self.setup_errors: list[str] = []
        self.s3_endpoint: str | None = None

    # -- helpers

    def ours(self, *argv: str | Path, cwd: Path | None = None) -> Proc:
        return check(run([self.exe, *map(str, argv)], env=self.env, cwd=cwd or self.ws))

    def git(
        self, *argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        return check(run(["git", *map(str, argv)], env=env or self.env, cwd=cwd or self.workdir))

    def head(self, store_dir: Path | None = None) -> dict[str, Any]:
        doc = _json_doc(self.ours("log", "--json", "-n", "1", cwd=store_dir or self.ws))
        if isinstance(doc, dict) and "items" in doc:  # the CLI's list envelope
            doc = doc["items"]
        if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict):
            raise SideError(f"`narrative log --json -n 1` gave no snapshot: {str(doc)[:300]}")
        return doc[0]

    def snapshot(self, msg: str) -> dict[str, Any]:
        doc = _json_doc(self.ours("snapshot", "-m", msg, "--json"))
        return doc.get("snapshot", doc) if isinstance(doc, dict) else {}

    def row(self, key: str, label: str | None = None, target: float | None = None) -> Row:
        default_label, default_target = SCENARIOS.get(key, (key, None))
        r = Row(key, label or default_label, target if label else default_target)
        self.rows[key] = r
        return r

    def pair(
        self,
        row: Row,
        rep: int,
        ours_fn: Callable[[], tuple[Sample, int | None]],
        anchor_fn: Callable[[], tuple[Sample, int | None]] | None,
    ) -> None:
        """One rep of both sides, alternating who goes first; each is preceded by a sync."""
        sides: list[tuple[str, Callable[[], tuple[Sample, int | None]]]] = [("ours", ours_fn)]
        if anchor_fn is not None:
            sides.append(("anchor", anchor_fn))
        if rep % 2:
            sides.reverse()
        for name, fn in sides:
            stats: SideStats = getattr(row, name)
            tag = name if row.has_anchor else row.key
            os.sync()
            try:
                sample, size = fn()
            except SideError as exc:
                log(f"  {tag} FAILED: {exc}")
                stats.errors.append(str(exc))
                continue
            stats.add(sample)
            if size is not None:
                getattr(row, f"{name}_bytes").append(size)
            log(
                f"  {tag:6s} {sample.seconds:8.3f}s  rss {sample.maxrss_kib >> 10} MB"
                + (f"  {_human(size)}" if size is not None else "")
            )
        row.order.append(",".join(n for n, _ in sides))

    def mismatch(self, row: Row, msg: str) -> None:
        log(f"  MISMATCH: {msg}")
        row.mismatches.append(msg)

    # -- setup

    def setup(self) -> workspace.WorkspaceInfo:
        a = self.args
        log(f"generating workspace: {a.files:,} files, {a.size_mb:g} MiB in {self.ws}")
        info = workspace.generate(self.ws, a.files, a.size_mb, a.seed, force=True)
        log(
            f"  {info.files:,} files, {info.dirs:,} dirs, {info.symlinks} symlinks, "
            f"{info.total_bytes / MIB:.0f} MiB in {info.seconds:.1f}s"
        )
        t0 = time.perf_counter()
        self.ours("init", self.ws, cwd=self.workdir)
        self.store = store_of(self.exe, self.ws, self.env)
        p = run([self.exe, "snapshot", "-m", "first", "--json"], env=self.env, cwd=self.ws)
        check(p)
        log(f"  first snapshot {p.seconds:.1f}s, rss {p.maxrss_kib >> 10} MB")
        for i, n in enumerate(HISTORY):
            workspace.touch_files(self.ws, n, f"history-{i}")
            self.snapshot(f"history {i}")
        log(
            f"  store: {len(HISTORY) + 1} snapshots deep, {_du(self.store) / MIB:.0f} MiB "
            f"(setup {time.perf_counter() - t0:.1f}s)"
        )
        self.warm()
        return info

    def warm(self) -> None:
        """Untimed: read the workspace and the store once so neither side pays a cold cache."""
        t0 = time.perf_counter()
        n = 0
        for root, _dirs, files in os.walk(self.ws):
            for name in files:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    while f.read(MIB):
                        pass
                n += 1
        log(f"warm-up: read {n} files (workspace + store) in {time.perf_counter() - t0:.1f}s")

    # -- scenarios

    def sc_bundle(self) -> None:
        row = self.row("bundle")
        head = self.head()
        ours_out, anchor_out = self.out / "ours.bundle", self.out / "anchor.bundle"
        reported: dict[str, Any] = {}

        def ours() -> tuple[Sample, int | None]:
            _rm(ours_out)
            p = self.ours("export", ours_out, "--json")
            doc = _json_doc(p)
            reported.clear()
            reported.update(doc)
            row.ours_reported.append({k: doc.get(k) for k in ("size", "objects", "refs")})
            size = ours_out.stat().st_size
            if doc.get("size") != size:
                self.mismatch(row, f"export --json size {doc.get('size')} != file size {size}")
            return Sample(p.seconds, p.maxrss_kib), size

        def anchor() -> tuple[Sample, int | None]:
            _rm(anchor_out)
            p = self.git("--git-dir", self.store, "bundle", "create", "-q", anchor_out, "--all")
            return Sample(p.seconds, p.maxrss_kib), anchor_out.stat().st_size

        for rep in range(self.reps):
            log(f" rep {rep + 1}/{self.reps}")
            self.pair(row, rep, ours, anchor)
            if rep == 0 and ours_out.exists():
                self.verify_full_bundle(row, ours_out, reported, head)
        _rm(ours_out, anchor_out)

    def verify_full_bundle(
        self, row: Row, bundle: Path, reported: dict[str, Any], head: dict[str, Any]
    ) -> None:
        """Untimed: stock git accepts our bundle and gets exactly the refs we reported."""
        t0 = time.perf_counter()
        empty = _fresh_dir(self.tmp / "verify-empty")
        mirror = self.tmp / "verify-mirror.git"
        _rm(mirror)
        try:
            self.git("init", "-q", empty)
            self.git("bundle", "verify", "-q", bundle, cwd=empty)
            self.git("clone", "-q", "--mirror", bundle, mirror)
            lines = self.git(
                "--git-dir", mirror, "for-each-ref", "--format=%(objectname) %(refname)"
            )
            got = dict(reversed(line.split(" ", 1)) for line in lines.stdout.splitlines())
            want = reported.get("refs") or {}
            if got != want:
                self.mismatch(row, f"git clone --mirror refs {got} != export --json refs {want}")
            thread_ref = f"refs/narrative/threads/{head.get('thread')}"
            if got.get(thread_ref) != head.get("commit"):
                self.mismatch(
                    row,
                    f"bundle {thread_ref} = {got.get(thread_ref)}, expected head commit "
                    f"{head.get('commit')}",
                )
            self.git("--git-dir", mirror, "cat-file", "-e", f"{head.get('commit')}^{{tree}}")
            row.notes.append(
                "ours: git bundle verify (empty repo) ok; git clone --mirror ok, refs match"
            )
        except SideError as exc:
            self.mismatch(row, f"stock git rejects our bundle: {exc}")
        finally:
            _rm(empty, mirror)
        log(f"  verified our bundle with stock git ({time.perf_counter() - t0:.1f}s)")

    def sc_archive(self, key: str) -> None:
        row = self.row(key)
        fmt_name = "tar.gz" if key == "gz" else "tar.zst"
        ours_out, anchor_out = self.out / f"ours.{fmt_name}", self.out / f"anchor.{fmt_name}"
        # the sizes and sha256s of blob contents an export keeps (narrative.blobdigests): the
        # cold row exports as the first export after a first snapshot does, hashing everything
        digests = self.store / "narrative" / "cache" / "blob-digests"
        if fmt_name == "tar.zst":
            anchor_argv = [
                "bash",
                "-o",
                "pipefail",
                "-c",
                'tar -c -C "$1" --exclude=.narrative . | zstd -T2 -q -o "$2"',
                "bench",
                str(self.ws),
                str(anchor_out),
            ]
        else:
            anchor_argv = [
                "tar",
                "-cz",
                "-C",
                str(self.ws),
                "--exclude=.narrative",
                "-f",
                str(anchor_out),
                ".",
            ]

        def ours() -> tuple[Sample, int | None]:
            _rm(ours_out)
            if key == "zst-cold":
                _rm(digests)
            p = self.ours("export", ours_out, "--format", fmt_name, "--json")
            doc = _json_doc(p)
            row.ours_reported.append({k: doc.get(k) for k in ("size", "objects", "snapshot")})
            return Sample(p.seconds, p.maxrss_kib), ours_out.stat().st_size

        def anchor() -> tuple[Sample, int | None]:
            _rm(anchor_out)
            p = check(run(anchor_argv, env=self.env, cwd=self.workdir))
            return Sample(p.seconds, p.maxrss_kib), anchor_out.stat().st_size

        for rep in range(self.reps):
            log(f" rep {rep + 1}/{self.reps}")
            self.pair(row, rep, ours, anchor)
            if rep == 0 and ours_out.exists():
                self.verify_archive(row, ours_out, fmt_name)
        _rm(ours_out, anchor_out)

    def verify_archive(self, row: Row, archive: Path, fmt_name: str) -> None:
        """Untimed: stock tar extracts our archive; its ``files/`` equals the workspace."""
        dest = _fresh_dir(self.tmp / "verify-archive")
        try:
            flag = "--zstd" if fmt_name == "tar.zst" else "-z"
            check(
                run(
                    ["tar", "-x", flag, "-f", str(archive), "-C", str(dest)], env=self.env, cwd=dest
                )
            )
            diffs = workspace.compare_dirs(self.ws, dest / "files")
            if diffs:
                self.mismatch(
                    row, f"extracted {fmt_name} differs from workspace: {'; '.join(diffs[:5])}"
                )
            else:
                row.notes.append(f"ours: stock tar extracts the {fmt_name}; files/ == workspace")
        except SideError as exc:
            self.mismatch(row, f"stock tar rejects our {fmt_name}: {exc}")
        finally:
            _rm(dest)

    def sc_incr(self) -> None:
        row = self.row("incr")
        ours_out, anchor_out = self.out / "ours-incr.bundle", self.out / "anchor-incr.bundle"
        for rep in range(self.reps):
            log(f" rep {rep + 1}/{self.reps}")
            try:
                prev = self.head()
                touched = workspace.touch_files(self.ws, 1, f"incr-{rep}")
                self.snapshot(f"incr {rep}")
                new = self.head()
            except SideError as exc:
                log(f"  setup FAILED: {exc}")
                row.ours.errors.append(f"setup: {exc}")
                continue
            if new.get("commit") == prev.get("commit"):
                self.mismatch(row, f"rep {rep}: snapshot after changing {touched} created nothing")
                continue
            size_changed = (self.ws / touched[0]).stat().st_size
            row.notes.append(f"rep {rep}: changed {touched[0]} ({_human(size_changed)})")
            thread_ref = f"refs/narrative/threads/{new.get('thread')}"
            reported: dict[str, Any] = {}

            def ours(
                prev: dict[str, Any] = prev, reported: dict[str, Any] = reported
            ) -> tuple[Sample, int | None]:
                _rm(ours_out)
                p = self.ours("export", ours_out, "--since", str(prev["id"]), "--json")
                doc = _json_doc(p)
                reported.clear()
                reported.update(doc)
                row.ours_reported.append(
                    {
                        k: doc.get(k)
                        for k in ("size", "objects", "refs", "prerequisites", "nothing_new")
                    }
                )
                return Sample(p.seconds, p.maxrss_kib), ours_out.stat().st_size

            def anchor(
                prev: dict[str, Any] = prev, ref: str = thread_ref
            ) -> tuple[Sample, int | None]:
                _rm(anchor_out)
                p = self.git(
                    "--git-dir",
                    self.store,
                    "bundle",
                    "create",
                    "-q",
                    anchor_out,
                    ref,
                    f"^{prev['commit']}",
                )
                return Sample(p.seconds, p.maxrss_kib), anchor_out.stat().st_size

            self.pair(row, rep, ours, anchor)
            if rep == 0 and ours_out.exists():
                self.verify_incr_bundle(row, ours_out, reported, prev, new, thread_ref)
        _rm(ours_out, anchor_out)

    def verify_incr_bundle(
        self,
        row: Row,
        bundle: Path,
        reported: dict[str, Any],
        prev: dict[str, Any],
        new: dict[str, Any],
        thread_ref: str,
    ) -> None:
        """Untimed: stock git verifies it against the store (which has the prerequisites)."""
        try:
            if reported.get("nothing_new"):
                self.mismatch(row, "export --since reported nothing_new after a new snapshot")
            self.git("--git-dir", self.store, "bundle", "verify", "-q", bundle)
            heads = self.git("bundle", "list-heads", bundle).stdout.split("\n")
            got = dict(reversed(h.split(" ", 1)) for h in heads if h.strip())
            if got.get(thread_ref) != new.get("commit"):
                self.mismatch(
                    row,
                    f"incremental bundle {thread_ref} = {got.get(thread_ref)}, "
                    f"expected {new.get('commit')}",
                )
            # Its content applies on top of a store at the previous head.
            dest = self.tmp / "verify-incr.git"
            _rm(dest)
            self.git("init", "-q", "--bare", dest)
            self.git("--git-dir", dest, "fetch", "-q", self.store, f"{prev['commit']}:refs/prev")
            self.git("--git-dir", dest, "fetch", "-q", bundle, f"{thread_ref}:refs/new")
            self.git("--git-dir", dest, "cat-file", "-e", f"{new['commit']}^{{tree}}")
            row.notes.append(
                "ours: incremental bundle verifies and fetches on top of the previous head"
            )
        except SideError as exc:
            self.mismatch(row, f"stock git rejects our incremental bundle: {exc}")
        finally:
            _rm(self.tmp / "verify-incr.git")

    def sc_import(self) -> None:
        row = self.row("import")
        head = self.head()
        bundle = self.out / "import-source.bundle"
        _rm(bundle)
        try:
            self.ours("export", bundle, "--json")
            row.notes.append("both sides read the bundle made by `narrative export` (same input)")
        except SideError as exc:
            log(f"  ours export FAILED ({exc}); both sides read git's bundle instead")
            row.ours.errors.append(f"export of the input bundle: {exc}")
            self.git("--git-dir", self.store, "bundle", "create", "-q", bundle, "--all")
            row.notes.append("input bundle made by git (ours failed to export)")
        row.ours_reported.append({"input_bundle_bytes": bundle.stat().st_size})
        store_o, rest_o = self.workdir / "import-ours", self.workdir / "restore-ours"
        mirror, rest_a = self.workdir / "import-anchor.git", self.workdir / "restore-anchor"

        def ours() -> tuple[Sample, int | None]:
            drop_store(self.exe, store_o, self.env)
            _fresh_dir(store_o)
            _fresh_dir(rest_o)
            self.ours("init", store_o, cwd=self.workdir)
            os.sync()
            p1 = self.ours("import", bundle, "--json", cwd=store_o)
            p2 = self.ours("restore", str(head["id"]), "--to", rest_o, cwd=store_o)
            row.ours_reported.append({"import_s": p1.seconds, "restore_s": p2.seconds})
            log(f"  (ours: import {p1.seconds:.3f}s + restore {p2.seconds:.3f}s)")
            return Sample(p1.seconds + p2.seconds, max(p1.maxrss_kib, p2.maxrss_kib)), None

        def anchor() -> tuple[Sample, int | None]:
            _rm(mirror)
            _fresh_dir(rest_a)
            index = self.tmp / "anchor-index"
            _rm(index)
            try:
                p1 = self.git("clone", "-q", "--mirror", bundle, mirror)
                p2 = self.git(
                    "--git-dir",
                    mirror,
                    "--work-tree",
                    rest_a,
                    "checkout",
                    "-f",
                    str(head["commit"]),
                    "--",
                    ".",
                    cwd=rest_a,
                    env=self.env | {"GIT_INDEX_FILE": str(index)},
                )
            finally:
                _rm(index)
            row.anchor_reported.append({"clone_s": p1.seconds, "checkout_s": p2.seconds})
            log(f"  (anchor: clone {p1.seconds:.3f}s + checkout {p2.seconds:.3f}s)")
            return Sample(p1.seconds + p2.seconds, max(p1.maxrss_kib, p2.maxrss_kib)), None

        for rep in range(self.reps):
            log(f" rep {rep + 1}/{self.reps}")
            self.pair(row, rep, ours, anchor)
            if rep == 0:
                for name, dest in (("ours", rest_o), ("anchor", rest_a)):
                    if len(getattr(row, name).seconds) != 1:
                        continue
                    diffs = workspace.compare_dirs(self.ws, dest)
                    if diffs:
                        self.mismatch(
                            row, f"{name} restore differs from workspace: {'; '.join(diffs[:5])}"
                        )
                    else:
                        row.notes.append(f"{name}: restored tree == workspace")
            _rm(store_o, rest_o, mirror, rest_a)
        _rm(bundle)

    # -- S3

    def start_s3(self) -> Any:
        import s3fs
        from moto.server import ThreadedMotoServer

        for name in _DROP_ENV:
            os.environ.pop(name, None)
        os.environ.update(_SET_ENV)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self.s3_endpoint = f"http://{host}:{port}"
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", client_kwargs={"endpoint_url": self.s3_endpoint}
        )
        fs.mkdir(S3_BUCKET)
        return server, fs

    def sc_s3(self) -> None:
        push = self.row("s3push", "S3 push, full (moto, loopback)", None)
        pull = self.row("s3pull", "S3 pull into an empty store (moto, loopback)", None)
        for r in (push, pull):
            r.has_anchor = False
            r.rss_checked = False
        try:
            server, fs = self.start_s3()
        except Exception as exc:
            msg = f"moto S3 server unavailable: {exc!r}"
            log(f"  {msg}")
            push.ours.errors.append(msg)
            pull.ours.errors.append(msg)
            return
        log(f"  moto S3 at {self.s3_endpoint}")
        opts = [
            "--storage-option",
            "key=testing",
            "--storage-option",
            "secret=testing",
            "--storage-option",
            f"client_kwargs.endpoint_url={self.s3_endpoint}",
        ]
        head = self.head()
        puller = self.workdir / "pull-store"
        try:
            for rep in range(self.reps):
                log(f" rep {rep + 1}/{self.reps}")
                prefix = f"{S3_BUCKET}/remote-{rep}"
                url = f"s3://{prefix}"
                pushed: dict[str, Any] = {}

                def do_push(
                    url: str = url, rep: int = rep, pushed: dict[str, Any] = pushed
                ) -> tuple[Sample, int | None]:
                    self.ours("remote", "add", f"bench{rep}", url, *opts)
                    p = self.ours("push", f"bench{rep}", "--json")
                    doc = _json_doc(p)
                    pushed.update(doc)
                    push.ours_reported.append(
                        {k: doc.get(k) for k in ("size", "pushed", "attempts")}
                    )
                    size = doc.get("size")
                    return Sample(p.seconds, p.maxrss_kib), int(size) if size is not None else None

                def do_pull(
                    url: str = url, pushed: dict[str, Any] = pushed
                ) -> tuple[Sample, int | None]:
                    drop_store(self.exe, puller, self.env)
                    _fresh_dir(puller)
                    self.ours("init", puller, cwd=self.workdir)
                    self.ours("remote", "add", "origin", url, *opts, cwd=puller)
                    os.sync()
                    p = self.ours("pull", "origin", "--json", cwd=puller)
                    pull.ours_reported.append(_json_doc(p))
                    return Sample(p.seconds, p.maxrss_kib), pushed.get("size")

                self.pair(push, rep, do_push, None)
                if push.ours.errors:
                    break
                self.pair(pull, rep, do_pull, None)
                if rep == 0 and len(pull.ours.seconds) == 1:
                    try:
                        ref = f"refs/narrative/threads/{head.get('thread')}"
                        got = self.git(
                            "--git-dir", store_of(self.exe, puller, self.env), "rev-parse", ref
                        ).stdout.strip()
                        if got != head.get("commit"):
                            self.mismatch(
                                pull, f"pulled {ref} = {got}, expected {head.get('commit')}"
                            )
                        else:
                            pull.notes.append("pulled store's thread ref == pushed head")
                    except SideError as exc:
                        self.mismatch(pull, f"pulled store lacks the pushed thread: {exc}")
                _rm(puller)
                try:
                    fs.rm(prefix, recursive=True)
                except Exception as exc:  # space only; not a result
                    log(f"  (could not empty {url}: {exc!r})")
        finally:
            server.stop()


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# --------------------------------------------------------------------------- report


def render(bench: Bench, header: str) -> str:
    lines = [
        header,
        "",
        "| scenario | ours median (s) | anchor median (s) | ratio ours/anchor | target "
        "| ours peak RSS (MB) | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in bench.rows.values():
        lines.append(
            f"| {r.label} | {fmt(r.ours.median, '.3f')} | {fmt(r.anchor.median, '.3f')} "
            f"| {fmt(r.ratio, '.2f')}{'x' if r.ratio is not None else ''} | {r.target_text()} "
            f"| {fmt(r.ours.peak_mb, '.0f')} | {r.status()} |"
        )
    rss_rows = [r for r in bench.rows.values() if r.rss_checked and r.ours.peak_mb is not None]
    if rss_rows:
        worst = max(rss_rows, key=lambda r: r.ours.peak_mb or 0.0)
        peak = worst.ours.peak_mb or 0.0
        verdict = "ok" if peak <= RSS_TARGET_MB else "MISS"
        lines.append(
            f"| peak RSS, export + import (max: {worst.label}) | — | — | — "
            f"| ≤ {RSS_TARGET_MB:.0f} MB | {peak:.0f} | {verdict} |"
        )
    lines.append("")
    sizes = [
        f"{r.label}: ours {_human(r.ours_size)}, anchor {_human(r.anchor_size)}"
        if r.has_anchor
        else f"{r.label}: {_human(r.ours_size)}"
        for r in bench.rows.values()
        if r.ours_bytes or r.anchor_bytes
    ]
    if sizes:
        lines.append("Output sizes (median): " + "; ".join(sizes) + ".")
    for r in bench.rows.values():
        if r.key == "incr" and r.anchor.median is not None:
            lines.append(
                f"Incremental anchor (`git bundle create REF ^PREV`): {r.anchor.median:.3f} s, "
                f"{_human(r.anchor_size)}; ours max size {_human(max(r.ours_bytes, default=None))}."
            )
    lines.extend(f"**ERROR** setup: {e}" for e in bench.setup_errors)
    for r in bench.rows.values():
        lines.extend(f"**MISMATCH** {r.label}: {m}" for m in r.mismatches)
        lines.extend(f"**ERROR** {r.label}: ours: {e}" for e in r.ours.errors[:2])
        lines.extend(f"**ERROR** {r.label}: anchor: {e}" for e in r.anchor.errors[:2])
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_bench_args(
        argv, "Transfer benchmark: narrative export/import/push/pull vs git, tar, zstd.", SCENARIOS
    )


def _tool_version(argv: list[str], env: dict[str, str]) -> str | None:
    try:
        p = run(argv, env=env, cwd=Path.cwd())
    except SideError:
        return None
    text = (p.stdout.strip() or p.stderr.strip()).splitlines()
    return text[0] if p.rc == 0 and text else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    workdir = (
        args.workdir.resolve()
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="narrative-bench-transfer-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(args, workdir)
        env = bench.env
        if not args.narrative.exists():
            log(f"error: our CLI {args.narrative} not found")
            return 2
        zstd_needed = {"zst", "zst-cold"} & set(args.scenario_keys)
        if zstd_needed and shutil.which("zstd") is None:
            log("error: zstd not found (apt-get install -y zstd)")
            return 2
        ours_version = _tool_version([str(args.narrative), "--version"], env)
        versions = {
            "git": git_version(env),
            "tar": _tool_version(["tar", "--version"], env),
            "zstd": _tool_version(["zstd", "--version"], env),
            "ours": ours_version,
        }
        info = bench.setup()
        compile_bytecode(env, workdir)
        handlers: dict[str, Callable[[], None]] = {
            "bundle": bench.sc_bundle,
            "zst": lambda: bench.sc_archive("zst"),
            "zst-cold": lambda: bench.sc_archive("zst-cold"),
            "gz": lambda: bench.sc_archive("gz"),
            "incr": bench.sc_incr,
            "import": bench.sc_import,
            "s3": bench.sc_s3,
        }
        timings: dict[str, float] = {}
        for key in args.scenario_keys:
            log(f"scenario: {SCENARIOS[key][0]} ({args.reps} reps)")
            t0 = time.perf_counter()
            try:
                handlers[key]()
            except SideError as exc:  # an untimed setup step of the scenario failed
                log(f"  scenario FAILED: {exc}")
                bench.setup_errors.append(f"{key}: {exc}")
            timings[key] = time.perf_counter() - t0
        total = time.perf_counter() - t_start

        header = (
            f"Transfer benchmark — workspace {info.files:,} files / "
            f"{info.total_bytes / MIB:,.0f} MiB / {info.dirs:,} dirs (seed {args.seed}), store "
            f"{len(HISTORY) + 1}+ snapshots deep, {args.reps} reps, medians; {versions['git']}, "
            f"{versions['zstd'] or 'zstd ?'}; {os.cpu_count()} CPUs ({cpu_model()}); "
            f"total run {total:.0f}s."
        )
        print(render(bench, header), flush=True)

        out = write_results(
            "transfer",
            args,
            info,
            total,
            dict(versions),
            {
                "scenario_seconds": timings,
                "setup_errors": bench.setup_errors,
                "rss_target_mb": RSS_TARGET_MB,
                "rows": {
                    key: {
                        "label": r.label,
                        "target": r.target_text(),
                        "ratio": r.ratio,
                        "status": r.status(),
                        "order": r.order,
                        "mismatches": r.mismatches,
                        "notes": r.notes,
                        "ours_bytes": r.ours_bytes,
                        "anchor_bytes": r.anchor_bytes,
                        "mb_per_s": r.mb_per_s,
                        "ours_reported": r.ours_reported,
                        "anchor_reported": r.anchor_reported,
                        "ours": asdict(r.ours)
                        | {"median": r.ours.median, "peak_mb": r.ours.peak_mb},
                        "anchor": asdict(r.anchor)
                        | {"median": r.anchor.median, "peak_mb": r.anchor.peak_mb},
                    }
                    for key, r in bench.rows.items()
                },
            },
        )
        log(f"results: {out}  (total {total:.0f}s)")
        bad = bench.setup_errors or any(
            r.mismatches or r.ours.errors or r.anchor.errors for r in bench.rows.values()
        )
        return 1 if bad else 0
    finally:
        if args.keep:
            log(f"kept work directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
