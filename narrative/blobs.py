"""Turn files into blobs in a pack, on every core.

Reading, SHA-1 and zlib all release the GIL, so a small thread pool keeps both cores busy on a
first snapshot. Files are hashed before they are compressed, so content the store already holds
costs one read and one hash. Files above :data:`STREAM_THRESHOLD` are streamed through a spool
file so memory stays flat whatever the size cap.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import progress
from .objects import MODE_LINK, hash_object, object_header, sha1
from .odb import ObjectStore, PackWriter
from .scan import FileJob
from .zstream import deflate, deflated_bound, stream_compressors

__all__ = ["STREAM_THRESHOLD", "write_blobs"]

STREAM_THRESHOLD = 8 << 20
_CHUNK = 1 << 20
_PARALLEL_MIN_JOBS = 32


class _Changed(Exception):
    """The file changed size while it was read; it will be retried."""


def _read_small(path: str, size: int) -> bytes:
    """The file's ``size`` bytes, read straight into one buffer (no file object: a first
    snapshot reads tens of thousands of files)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        parts = []
        got = 0
        while got <= size:  # one byte more than expected: a file that grew is seen
            chunk = os.read(fd, size + 1 - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got != size:
        raise _Changed
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _hash_stream(path: str, size: int) -> bytes:
    h = sha1(object_header("blob", size))
    got = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            got += len(chunk)
    if got != size:
        raise _Changed
    return h.digest()


def _write_stream(writer: PackWriter, path: str, size: int, oid: bytes) -> None:
    import tempfile  # (~2 ms to import: paid only when a large file is stored)

    compressors = stream_compressors()
    for module in compressors:
        h = sha1(object_header("blob", size))
        comp = module.compressobj(1)
        with tempfile.SpooledTemporaryFile(max_size=_CHUNK * 4) as spool:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    spool.write(comp.compress(chunk))
            spool.write(comp.flush())
            if h.digest() != oid:
                raise _Changed
            if spool.tell() > deflated_bound(size) and module is not compressors[-1]:
                continue  # ISA-L's stream grew past what the reader allows: zlib's instead
            spool.seek(0)
            writer.add_stream("blob", oid, size, spool)
            return


def _store_one(job: FileJob, store: ObjectStore, writer: PackWriter | None) -> None:
    if job.mode == MODE_LINK:
        data = os.fsencode(os.readlink(job.path))
        oid = writer.add_raw("blob", data) if writer is not None else hash_object("blob", data)
    else:
        size = job.key[2]
        for _attempt in range(3):
            try:
                if size <= STREAM_THRESHOLD:
                    data = _read_small(job.path, size)
                    h = sha1(object_header("blob", size))
                    h.update(data)
                    oid = h.digest()
                    if writer is not None and oid not in writer and not store.exists(oid):
                        writer.add("blob", oid, size, deflate(data))
                else:
                    oid = _hash_stream(job.path, size)
                    if writer is not None and oid not in writer and not store.exists(oid):
                        _write_stream(writer, job.path, size, oid)
                break
            except _Changed:
                # Being written right now: take its current state, and never trust the stat key.
                size = os.lstat(job.path).st_size
                job.changed = True
        else:
            raise OSError(f"{job.rel} keeps changing while being read")
    job.entry[2] = oid


def write_blobs(
    jobs: list[FileJob], store: ObjectStore, writer: PackWriter | None
) -> list[FileJob]:
    """Store every job's file as a blob (only hash it without a writer); returns the jobs that
    could not be read.

    A file that disappeared or became unreadable since the walk is dropped from the snapshot
    (reported back) rather than failing the whole snapshot.
    """
    failed: list[FileJob] = []
    with progress.stage("hashing", sum(job.key[2] for job in jobs), "bytes") as advance:

        def run(job: FileJob) -> None:
            try:
                _store_one(job, store, writer)
            except OSError:
                failed.append(job)
            advance(job.key[2])

        _run_jobs(jobs, run)
    return failed


def _run_jobs(jobs: list[FileJob], run: Callable[[FileJob], None]) -> None:
    if len(jobs) < _PARALLEL_MIN_JOBS:
        for job in jobs:
            run(job)
    else:
        from concurrent.futures import ThreadPoolExecutor  # imported late: costly at start-up

        workers = max(2, min(4, os.cpu_count() or 2))

        def run_batch(batch: list[FileJob]) -> None:
            for job in batch:
                run(job)

        # a few large batches: one future per file costs more than hashing small files
        batches = [jobs[i :: workers * 8] for i in range(workers * 8)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run_batch, batches))
