"""Files of a container of the ``docker`` provider, through the archive endpoints.

``put_archive``/``get_archive`` are binary-safe, streamed, and work on stopped containers too.
Restore and collect use :mod:`providers.shipping`, which treats what comes back from the
container as hostile; removing a file and emptying directories are ``sh`` helper commands
(:func:`providers.docker.commands.run_quiet`), since the Engine API has no call for them.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, cast

import docker

from narrative.errors import InvalidInput

from ..base import SpawnLog, check_relative_path, tail_start
from ..emptying import TEMP_DIRS, empty_argv
from ..errors import ProviderError
from ..shipping import scratch_dir, snapshot_from_tar, snapshot_tar_chunks
from .client import archive_url, raise_for_status, sdk_errors
from .commands import run_checked, run_quiet

if TYPE_CHECKING:
    from narrative.models import Snapshot
    from narrative.store import Store

__all__ = [
    "TEMP_DIRS",
    "collect_snapshot",
    "delete_file",
    "empty_directories",
    "open_archive",
    "put_snapshot",
    "read_file",
    "read_tail",
    "write_file",
]

_CHUNK = 1 << 20
_DIR_BIT = 1 << 31
"""``os.ModeDir`` of Go, as found in the ``mode`` of the archive stat header."""

# Removes one file (or symlink); 2: absent, 3: a directory.
_DELETE_SCRIPT = r"""
if [ -d "$1" ] && [ ! -L "$1" ]; then exit 3; fi
if [ ! -e "$1" ] && [ ! -L "$1" ]; then exit 2; fi
rm -f -- "$1"
"""


class _ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (the SDK's archive stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@contextlib.contextmanager
def open_archive(api: Any, resource_id: str, path: str, timeout: float) -> Iterator[IO[bytes]]:
    """The tar stream of a container path, read as it arrives; the response is closed on
    exit even when the stream was not read to its end (``get_archive`` leaves it open)."""
    url = archive_url(api, resource_id)
    response = api.get(
        url,
        params={"path": path},
        headers={"Accept-Encoding": "identity"},
        stream=True,
        timeout=timeout,
    )
    try:
        raise_for_status(response)
        yield io.BufferedReader(_ChunkReader(response.iter_content(_CHUNK)), _CHUNK)
    finally:
        response.close()


def _path_stat(api: Any, resource_id: str, workdir: str, rel: str) -> dict[str, Any] | None:
    """The daemon's stat of a workspace path (HEAD of the archive endpoint); None if absent.

    docker-py exposes no HEAD helper, so the request is made on the client session itself.
    """
    url = archive_url(api, resource_id)
    with sdk_errors("stat", resource_id, path=rel):
        response = api.head(url, params={"path": posixpath.join(workdir, rel)})
        if response.status_code == 404:
            api.inspect_container(resource_id)  # ResourceGone if the container is
            return None
        raise_for_status(response)
        header = response.headers.get("X-Docker-Container-Path-Stat")
    return cast(dict[str, Any], docker.utils.decode_json_header(header)) if header else {}


def read_file(api: Any, resource_id: str, workdir: str, path: str, timeout: float) -> bytes:
    """The content of the regular file ``path`` (relative to ``workdir``)."""
    rel = check_relative_path(path)
    with (
        sdk_errors("read_file", resource_id, path=rel),
        open_archive(api, resource_id, posixpath.join(workdir, rel), timeout) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        member = tar.next()
        if member is None:
            raise FileNotFoundError(f"{path}: no such file in the environment")
        if member.isdir():
            raise IsADirectoryError(f"{path} is a directory")
        if not member.isreg():
            raise InvalidInput(f"{path} is not a regular file")
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read()


def write_file(api: Any, resource_id: str, workdir: str, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (relative to ``workdir``), never over a directory."""
    rel = check_relative_path(path)
    stat = _path_stat(api, resource_id, workdir, rel)
    # Extracting a file over a directory would replace the whole directory.
    if stat is not None and int(stat.get("mode", 0)) & _DIR_BIT:
        raise IsADirectoryError(f"{path} is a directory")
    with tempfile.SpooledTemporaryFile(max_size=8 * _CHUNK) as spool:
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        spool.seek(0)
        _put_archive(api, resource_id, workdir, spool, "write_file")


def _put_archive(
    api: Any, resource_id: str, workdir: str, tar: IO[bytes] | Iterator[bytes], op: str
) -> None:
    with sdk_errors(op, resource_id):
        if not api.put_archive(resource_id, workdir, tar):
            raise ProviderError(f"docker {op} failed: the daemon refused the archive")


def delete_file(api: Any, resource_id: str, workdir: str, path: str) -> None:
    """Remove the file (or symlink) ``path``, relative to ``workdir``."""
    rel = check_relative_path(path)
    code, output = run_quiet(api, resource_id, workdir, ["sh", "-c", _DELETE_SCRIPT, "sh", rel])
    if code == 2:
        raise FileNotFoundError(f"{path}: no such file in the environment")
    if code == 3:
        raise IsADirectoryError(f"{path} is a directory")
    if code != 0:
        raise ProviderError(f"cannot delete {path}: {output.decode(errors='replace').strip()}")


def read_tail(
    api: Any, resource_id: str, path: str, *, since: int, limit: int, timeout: float
) -> SpawnLog:
    """The end of the container file ``path`` (see :func:`providers.base.tail_start`)."""
    with (
        sdk_errors("read_spawn_log", resource_id, path=path),
        open_archive(api, resource_id, path, timeout) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        member = tar.next()
        content = tar.extractfile(member) if member is not None else None
        if member is None or content is None:  # nothing, or not a regular file
            return SpawnLog(0, b"")
        start = tail_start(member.size, since, limit)
        skipped = 0
        while skipped < start:  # a tar stream cannot seek: read past, keep nothing
            chunk = content.read(min(start - skipped, _CHUNK))
            if not chunk:
                return SpawnLog(0, b"")  # cut short
            skipped += len(chunk)
        return SpawnLog(member.size, content.read(member.size - start))


def empty_directories(api: Any, resource_id: str, workdir: str, directories: list[str]) -> None:
    """Empty ``directories`` (the first must exist), keeping the directories themselves."""
    what = f"empty {' '.join(directories)}"
    run_checked(api, resource_id, workdir, empty_argv(directories), what)


def put_snapshot(
    api: Any, resource_id: str, workdir: str, store: Store, snapshot: Snapshot
) -> None:
    """Extract ``snapshot`` into ``workdir`` (which the caller emptied): the tar is streamed
    to the daemon as it is made (chunked), so the snapshot may be far larger than memory and
    never lands on disk on this side."""
    with snapshot_tar_chunks(store, snapshot) as chunks:
        _put_archive(api, resource_id, workdir, chunks, "restore")


def collect_snapshot(
    api: Any,
    resource_id: str,
    workdir: str,
    store: Store,
    env_id: str,
    *,
    thread_id: str,
    run_id: str | None,
    message: str,
    max_bytes: int,
    timeout: float,
) -> Snapshot:
    """Snapshot what ``workdir`` holds, read through the hostile-tar extractor."""
    # Streamed straight into the hostile-tar extractor: the size limit applies while
    # reading, so a huge file in the container never lands on disk in full.
    with (
        sdk_errors("collect", resource_id),
        open_archive(api, resource_id, workdir, timeout) as stream,
    ):
        return snapshot_from_tar(
            store,
            stream,
            scratch_dir(store, env_id),
            thread_id,
            run_id,
            message,
            strip=posixpath.basename(workdir) + "/",
            max_bytes=max_bytes,
        )
