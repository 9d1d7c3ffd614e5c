"""A snapshot built straight from an environment's (hostile) tar stream, no file on disk.

Extracting the tar and then walking it costs a file creation per member (about half a
millisecond each here: most of a 5,000-file collect). Here each regular file's bytes are hashed
as they stream by (and kept in a spool when the store lacks them); directories, files and
links are kept as an in-memory tree; at the end the ignore rules are applied to that tree
exactly as the scanner applies them to a directory (:mod:`narrative.scan`), and only the blobs
the tree keeps are deflated into the snapshot's pack. An ignored file never reaches the store.

Only *plain* members are taken this way: a directory, regular file or symlink whose path the
path rule accepts (:func:`narrative.paths.is_safe_path`: no ``.git``, no top-level store name,
no ``..``), no component one of our temporary names, nothing of that name given before (but a
directory again), no file or link on the way, and no more than :data:`MAX_MEMBERS` of them. At
the first other member (a hard link, a device, a duplicate, a ``.git`` directory, ...)
everything taken so far is written into the scratch directory and the rest of the stream goes
through the extractor (:func:`providers.tar_intake.extract_members`); the caller then
snapshots that directory. So every member that is not plain is decided, refused or written, by
the same code as before, and a plain one is what the extractor would have written: the tree is
the same either way.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

from narrative.blobs import STREAM_THRESHOLD
from narrative.fsutil import is_workspace_tmp
from narrative.ignore import IgnoreRules, ignore_lines
from narrative.objects import MODE_DIR, MODE_EXEC, MODE_FILE, MODE_LINK, object_header
from narrative.odb import PackWriter
from narrative.paths import is_safe_path
from narrative.scan import DirNode, FileJob, ScanResult
from narrative.store import Store
from narrative.zstream import deflate

from .tar_intake import (
    READ_BUFFER,
    check_total,
    extract_members,
    member_parts,
    refusals,
    strip_member,
)

__all__ = ["scan_tar"]

_IGNORE_FILES = (".gitignore", ".narrativeignore")
_CHUNK = 1 << 20
_SPOOL_IN_MEMORY = 32 << 20
MAX_MEMBERS = 200_000
"""Members kept in memory (~50 MB); past them the rest is extracted to disk, as before: the
size limit does not count empty files and directories, so memory is bounded here."""


@dataclass(slots=True)
class _Entry:
    """A member taken: ``oid`` is None for a directory and for a file over the size cap (never
    read); ``data`` holds a link's target and an ignore file's content."""

    kind: str  # "dir", "file" or "link"
    mode: int = MODE_DIR
    oid: bytes | None = None
    size: int = 0
    data: bytes | None = None


class _Deflating:
    """``length`` bytes of ``spool`` from ``offset``, read deflated (for PackWriter)."""

    def __init__(self, spool: IO[bytes], offset: int, length: int) -> None:
        self._spool, self._offset, self._left = spool, offset, length
        self._comp: Any = zlib.compressobj(1)

    def read(self, size: int = _CHUNK) -> bytes:
        while self._comp is not None:
            self._spool.seek(self._offset)
            chunk = self._spool.read(min(size, self._left))
            self._offset += len(chunk)
            self._left -= len(chunk)
            if chunk:
                out = self._comp.compress(chunk)
            else:
                out, self._comp = self._comp.flush(), None
            if out:
                return bytes(out)
        return b""


class _TarScan:
    def __init__(self, store: Store, scratch: str, strip: str, max_bytes: int) -> None:
        self.store = store
        self.scratch = scratch
        self.strip = strip
        self.max_bytes = max_bytes
        self.max_size = store.config.max_file_size
        self.entries: dict[str, _Entry] = {"": _Entry("dir")}
        self.children: dict[str, list[str]] = {}
        self.staged: dict[bytes, tuple[int, int]] = {}
        """oid → (offset, length) of its content in the spool."""
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by run
            _SPOOL_IN_MEMORY, dir=store.odb.tmp_dir
        )
        self.total = 0

    def run(self, stream: IO[bytes], writer: PackWriter) -> ScanResult | None:
        os.makedirs(self.store.odb.tmp_dir, exist_ok=True)
        self.store.odb.invalidate()
        try:
            with refusals(), tarfile.open(fileobj=stream, mode="r|*", bufsize=READ_BUFFER) as tar:
                members = iter(tar)
                for member in members:
                    stripped = strip_member(member, self.strip)
                    if stripped is None:
                        continue
                    total = check_total(self.total, member, self.max_bytes)
                    parts = member_parts(stripped.name)
                    if not self._take(tar, stripped, parts):
                        self._materialise()
                        rest = itertools.chain([member], members)
                        extract_members(
                            tar, rest, self.scratch, self.strip, self.max_bytes, self.total
                        )
                        return None
                    self.total = total
            return self._resolve(writer)
        finally:
            self.spool.close()

    # -- taking members -------------------------------------------------------------------------

    def _take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]) -> bool:
        """Take a plain member (see the module docstring); False, with nothing read, for any
        other."""
        if not parts:
            return not member.issym()  # the directory itself: skipped, as the extractor does
        path = "/".join(parts)
        if len(self.entries) > MAX_MEMBERS:
            return False
        if not is_safe_path(path) or any(map(is_workspace_tmp, parts)):
            return False
        if member.isdir():
            if not self._room(parts, "dir"):
                return False
            if path not in self.entries:
                self._add(parts, _Entry("dir"))
            return True
        if member.issym():
            try:
                target = os.fsencode(member.linkname)
            except UnicodeEncodeError:
                return False
            if not target or b"\0" in target or not self._room(parts, "link"):
                return False
            self._add(parts, _Entry("link", MODE_LINK, _blob_id(target), len(target), target))
            return True
        if not member.isreg() or not self._room(parts, "file"):
            return False
        source = tar.extractfile(member)
        assert source is not None  # a regular member
        mode = MODE_EXEC if member.mode & 0o100 else MODE_FILE
        size = member.size
        keep = parts[-1] in _IGNORE_FILES
        if size > self.max_size and not keep:
            entry = _Entry("file", mode, None, size)  # skipped as too large: never read
        elif size <= STREAM_THRESHOLD or keep:
            data = source.read()
            oid = _blob_id(data)
            if oid not in self.staged and not self.store.odb.exists(oid):
                self._stage(oid, data)
            entry = _Entry("file", mode, oid, size, data if keep else None)
        else:
            entry = _Entry("file", mode, self._stream(source, size), size)
        self._add(parts, entry)
        return True

    def _room(self, parts: tuple[str, ...], kind: str) -> bool:
        """Whether a member of ``kind`` at ``parts`` is plain: nothing but directories on the
        way, and nothing there yet (but a directory, for a directory)."""
        for depth in range(1, len(parts)):
            have = self.entries.get("/".join(parts[:depth]))
            if have is not None and have.kind != "dir":
                return False
        have = self.entries.get("/".join(parts))
        return have is None or (kind == "dir" and have.kind == "dir")

    def _add(self, parts: tuple[str, ...], entry: _Entry) -> None:
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in self.entries:
                self.entries[path] = entry if depth == len(parts) else _Entry("dir")
                self.children.setdefault("/".join(parts[: depth - 1]), []).append(parts[depth - 1])

    def _stage(self, oid: bytes, data: bytes) -> None:
        offset = self.spool.seek(0, os.SEEK_END)
        self.spool.write(data)
        self.staged[oid] = (offset, len(data))

    def _stream(self, source: IO[bytes], size: int) -> bytes:
        """Hash a large file as it streams, copying it into the spool on the way (dropped
        again when the store has it)."""
        digest = hashlib.sha1(object_header("blob", size))
        offset = self.spool.seek(0, os.SEEK_END)
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            self.spool.write(chunk)
        oid = digest.digest()
        if oid in self.staged or self.store.odb.exists(oid):
            self.spool.truncate(offset)
        else:
            self.staged[oid] = (offset, self.spool.tell() - offset)
        return oid

    # -- the tree -------------------------------------------------------------------------------

    def _resolve(self, writer: PackWriter) -> ScanResult:
        jobs: list[FileJob] = []
        dirs: list[DirNode] = []
        root = self._dir("", IgnoreRules.empty(), writer, jobs, dirs)
        skipped = [item for node in dirs for item in node.skipped]
        return ScanResult(root, jobs, dirs, skipped, len(dirs))

    def _dir(
        self,
        rel: str,
        rules: IgnoreRules,
        writer: PackWriter,
        jobs: list[FileJob],
        dirs: list[DirNode],
    ) -> DirNode:
        """The scanner's view of directory ``rel``: its ignore files read (``.gitignore``,
        then ``.narrativeignore``; regular files only, as the scanner does not follow a
        link there), ignored entries and files over the size cap left out."""
        names = self.children.get(rel, [])
        prefix = rel + "/" if rel else ""
        for special in _IGNORE_FILES:
            entry = self.entries.get(prefix + special)
            if entry is not None and entry.kind == "file" and entry.data is not None:
                rules = rules.extend(ignore_lines(entry.data), rel)
        node = DirNode(rel)
        for name in names:
            path = prefix + name
            entry = self.entries[path]
            if entry.kind == "dir":
                if not (rules and rules.is_ignored(path, True)):
                    node.children.append(self._dir(path, rules, writer, jobs, dirs))
                continue
            if rules and rules.is_ignored(path, False):
                continue
            if entry.kind == "file" and entry.size > self.max_size:
                node.skipped.append({"path": path, "size": entry.size, "reason": "too-large"})
                continue
            self._write(entry, writer)
            node.file_count += 1
            node.byte_count += entry.size
            item: list[Any] = [os.fsencode(name), entry.mode, entry.oid]
            node.entries.append(item)
            jobs.append(FileJob(path, "", (0, 0, entry.size, 0, 0), entry.mode, item))
        for child in node.children:
            node.entries.append([os.fsencode(child.rel.rpartition("/")[2]), MODE_DIR, child])
        dirs.append(node)
        return node

    def _write(self, entry: _Entry, writer: PackWriter) -> None:
        """Put the blob of a kept file or link into the snapshot's pack (if it is new)."""
        assert entry.oid is not None
        if entry.kind == "link":
            assert entry.data is not None
            writer.add_raw("blob", entry.data)
            return
        staged = self.staged.get(entry.oid)
        if staged is None or entry.oid in writer:
            return
        if entry.size <= STREAM_THRESHOLD:
            self.spool.seek(staged[0])
            writer.add("blob", entry.oid, entry.size, deflate(self.spool.read(staged[1])))
        else:
            writer.add_stream("blob", entry.oid, entry.size, _Deflating(self.spool, *staged))  # type: ignore[arg-type]

    # -- falling back to the extractor ----------------------------------------------------------

    def _materialise(self) -> None:
        """Write every member taken so far into the scratch directory, as the extractor would
        have (a file over the size cap as a sparse file of its size: only its size is read)."""
        for path, entry in self.entries.items():
            if not path:
                continue
            full = os.path.join(self.scratch, path)
            if entry.kind == "dir":
                os.makedirs(full, 0o700, exist_ok=True)
            elif entry.kind == "link":
                assert entry.data is not None
                os.symlink(os.fsdecode(entry.data), full)
            else:
                mode = 0o755 if entry.mode == MODE_EXEC else 0o644
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with open(os.open(full, flags, mode), "wb") as out:
                    if entry.oid is None:
                        out.truncate(entry.size)
                    else:
                        out.write(self._content(entry))
                    os.fchmod(out.fileno(), mode)

    def _content(self, entry: _Entry) -> bytes:
        assert entry.oid is not None
        if entry.data is not None:
            return entry.data
        staged = self.staged.get(entry.oid)
        if staged is None:
            return self.store.odb.read(entry.oid)[1]
        self.spool.seek(staged[0])
        return self.spool.read(staged[1])


def _blob_id(data: bytes) -> bytes:
    digest = hashlib.sha1(object_header("blob", len(data)))
    digest.update(data)
    return digest.digest()


def scan_tar(
    store: Store, writer: PackWriter, stream: IO[bytes], scratch: str, strip: str, max_bytes: int
) -> ScanResult | None:
    """Read the tar ``stream`` (members renamed by removing the leading ``strip``) into a
    snapshot's content: the blobs it keeps written to ``writer``, the tree returned as a scan
    of its extraction would return it (a :data:`narrative.snapshot.Fill`). None when a member
    that is not plain made it extract everything into the empty directory ``scratch``
    instead, to be walked. :class:`~narrative.errors.InvalidInput` for a member refused or
    when the regular files add up to more than ``max_bytes``."""
    return _TarScan(store, scratch, strip, max_bytes).run(stream, writer)
