"""Moving a workspace in and out of environments that only speak tar (Docker, E2B).

Out: :func:`write_snapshot_tar` streams one snapshot's files as a plain tar (directories, regular
files with their exec bit, symlinks), reading blobs straight from the store.

In: :func:`snapshot_from_tar` treats the environment's tar as hostile input. What a snapshot
of its extraction would hold is built straight from the stream (:mod:`providers.tar_snapshot`):
no file is created for a plain member. From the first member that is not plain on, the tar is
extracted into a scratch directory inside the store (:mod:`providers.tar_intake`), refusing
absolute paths, ``..``, paths through symlinks that leave the directory, device files and
fifos (Python's ``data`` filter decides for all but plain files and directories), and that
directory is snapshotted like any workspace (its ``.gitignore`` honoured). A size limit stops
tar bombs on both paths. Symlinks themselves are recorded with whatever target they have (a
workspace may legitimately point at ``/usr/bin/python3``): they are data, never followed.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import stat as stat_mod
import tarfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from narrative.models import Snapshot
from narrative.objects import MODE_EXEC, MODE_LINK
from narrative.odb import PackWriter
from narrative.runs import incoming_ref
from narrative.scan import ScanResult
from narrative.snapshot import Fill, take_snapshot
from narrative.store import Store
from narrative.trees import flatten_tree

from .records import env_state_dir
from .tar_intake import extract_tar
from .tar_snapshot import scan_tar

__all__ = [
    "DEFAULT_MAX_COLLECT_BYTES",
    "scratch_dir",
    "snapshot_from_tar",
    "snapshot_tar_chunks",
    "write_snapshot_tar",
]

DEFAULT_MAX_COLLECT_BYTES = 8 << 30


def write_snapshot_tar(store: Store, snapshot: Snapshot, out: IO[bytes], prefix: str = "") -> int:
    """Write ``snapshot`` as a tar stream to ``out``; members are named ``prefix + path``.

    Returns the number of files written.
    """
    flat = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
    dirs: set[str] = set()
    for path in flat:
        parent = os.path.dirname(path)
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted(dirs):
            info = tarfile.TarInfo(prefix + directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path, (mode, oid) in sorted(flat.items()):
            _kind, data = store.odb.read(oid)
            info = tarfile.TarInfo(prefix + path)
            if mode == MODE_LINK:
                info.type = tarfile.SYMTYPE
                info.linkname = os.fsdecode(data)
                tar.addfile(info)
                continue
            info.size = len(data)
            info.mode = 0o755 if mode == MODE_EXEC else 0o644
            tar.addfile(info, io.BytesIO(data))
    return len(flat)


_CHUNK = 1 << 20
_QUEUED_CHUNKS = 8


class _ChunkQueue(io.RawIOBase):
    """The writing end of :func:`snapshot_tar_chunks`: bytes gathered into chunks, queued."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException | None]) -> None:
        self._chunks = chunks
        self._pending = bytearray()
        self.cancelled = threading.Event()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._pending += data
        if len(self._pending) >= _CHUNK:
            self.send(bytes(self._pending))
            self._pending.clear()
        return len(data)

    def send(self, item: bytes | BaseException | None) -> None:
        while not self.cancelled.is_set():
            with contextlib.suppress(queue.Full):
                self._chunks.put(item, timeout=0.1)
                return
        raise _Cancelled

    def finish(self) -> None:
        if self._pending:
            self.send(bytes(self._pending))
        self.send(None)


class _Cancelled(Exception):
    """The reader of the chunks went away."""


@contextlib.contextmanager
def snapshot_tar_chunks(
    store: Store, snapshot: Snapshot, prefix: str = ""
) -> Iterator[Iterator[bytes]]:
    """``snapshot`` as a tar (:func:`write_snapshot_tar`) in chunks, written on a thread while
    they are read: an upload streams the tar as it is made, with no copy of it on disk. An
    error writing it is raised by the iterator; leaving the context stops the writer."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUED_CHUNKS)
    sink = _ChunkQueue(chunks)

    def write() -> None:
        try:
            write_snapshot_tar(store, snapshot, sink, prefix)  # type: ignore[arg-type]
            sink.finish()
        except _Cancelled:
            pass
        except BaseException as exc:  # handed to the reader, which raises it
            with contextlib.suppress(_Cancelled):
                sink.send(exc)

    def read() -> Iterator[bytes]:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    writer = threading.Thread(target=write, name="snapshot-tar", daemon=True)
    writer.start()
    try:
        yield read()
    finally:
        sink.cancelled.set()
        writer.join()


def scratch_dir(store: Store, env_id: str) -> str:
    """A per-environment scratch directory inside the store (same file system as the store)."""
    return os.path.join(env_state_dir(store, env_id), "collect")


def snapshot_from_tar(
    store: Store,
    stream: IO[bytes],
    scratch: str,
    thread_id: str,
    run_id: str | None,
    message: str,
    strip: str = "",
    max_bytes: int = DEFAULT_MAX_COLLECT_BYTES,
    *,
    extract: bool = False,
) -> Snapshot:
    """Snapshot a (hostile) tar stream onto ``thread_id``, safely; clean up.

    ``strip`` removes a leading directory (``docker get_archive`` names members ``work/...``).
    ``extract``: extract every member and snapshot the directory, as before the snapshot was
    built from the stream (the same tree, slower; kept as the oracle of the tests).
    """
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)

    def from_stream(writer: PackWriter) -> ScanResult | None:
        scan = scan_tar(store, writer, stream, scratch, strip, max_bytes)
        if scan is None:  # extracted after all: walked as any workspace
            _normalise_modes(scratch)
        return scan

    fill: Fill | None = from_stream
    try:
        if extract:
            extract_tar(stream, scratch, strip, max_bytes)
            _normalise_modes(scratch)
            fill = None
        return take_snapshot(
            store,
            thread_id=thread_id,
            run_id=run_id,
            message=message,
            workspace=scratch,
            stage_as=incoming_ref(run_id) if run_id else None,  # a result: screened first
            fill=fill,
        ).snapshot
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _normalise_modes(root: str) -> None:
    """The data filter may drop permissions; make directories traversable for the walk."""
    for dirpath, dirnames, _files in os.walk(root):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat_mod.S_ISDIR(st.st_mode):
                os.chmod(full, (st.st_mode & 0o777) | 0o700)
