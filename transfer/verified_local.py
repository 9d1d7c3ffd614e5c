"""Reading a published artifact from a plain local path without fsspec: the streaming
:class:`VerifiedReader` (shared with :mod:`transfer.verified`, which opens every other URL
through fsspec) and the sidecar's parsing. ``narrative import FILE`` of a plain path (no colon,
no storage options, :func:`~transfer.storage_base.plain_local_path`) thus never imports fsspec
(60-180 ms of a quick-profile import, docs/decisions.md), as exports to local files do not.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ArtifactNotFound, ChecksumMismatch, InvalidArtifact
from .storage_base import (
    SIDECAR_SUFFIX,
    Progress,
    StageProgress,
    check_artifact_path,
    redact,
    translate,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "HEX64",
    "VerifiedReader",
    "not_published",
    "open_local_verified",
    "parse_sidecar",
]

HEX64 = re.compile(r"[0-9a-fA-F]{64}")
SIDECAR_LIMIT = 1024
"""Largest sidecar read (a digest, a name and a newline need far less)."""
_IO_CHUNK = 1 << 20


def parse_sidecar(raw: bytes, url: str) -> str:
    """The digest a sidecar's content records; InvalidArtifact when it records none."""
    shown = redact(url) + SIDECAR_SUFFIX
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArtifact(f"checksum sidecar {shown} is not ASCII text", shown) from None
    fields = text.split()
    if not fields or not HEX64.fullmatch(fields[0]):
        raise InvalidArtifact(f"checksum sidecar {shown} holds no sha256 digest", shown)
    return fields[0].lower()


def not_published(url: str) -> ArtifactNotFound:
    """The error for an artifact with no sidecar (missing or unpublished)."""
    shown = redact(url)
    return ArtifactNotFound(
        shown,
        f"artifact {shown} is missing or unpublished (no {SIDECAR_SUFFIX} sidecar)",
    )


class VerifiedReader(io.BufferedIOBase):
    """A streaming reader that checks the artifact against its sidecar at end of data.

    Not seekable: the digest is computed over the bytes in the order they are read. When a
    read reaches the end of the data (or the known size), the digest is compared with the
    sidecar and :class:`~transfer.errors.ChecksumMismatch` is raised on a difference.
    ``close()`` does the same check if everything was read but the end was never seen.
    Closing after a partial read does not verify anything.
    """

    def __init__(
        self,
        raw: Any,
        url: str,
        expected: str,
        size: int | None,
        callback: Progress | None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_close = on_close
        self._raw = raw
        self._url = url
        self._expected = expected
        self._size = size
        self._callback = callback
        self._hash = hashlib.sha256()
        self._pos = 0
        self._checked = False
        self._verified = False

    @property
    def sha256(self) -> str:
        """The digest the sidecar records."""
        return self._expected

    @property
    def size(self) -> int | None:
        """The object's size in bytes, when the backend reports it."""
        return self._size

    @property
    def verified(self) -> bool:
        """True once the whole content was read and matched the sidecar."""
        return self._verified

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all remaining when negative or None).

        Raises:
            ChecksumMismatch: This read reached the end and the content differs.
            StorageError: The backend failed.
        """
        if self.closed:
            raise ValueError("read of a closed file")
        whole = size is None or size < 0
        with translate(self._url, "reading"):
            data = self._raw.read() if whole else self._raw.read(size)
        if not isinstance(data, bytes):
            data = bytes(data)
        self._hash.update(data)
        self._pos += len(data)
        if data and self._callback is not None:
            self._callback.relative_update(len(data))
        at_end = whole or (size != 0 and not data) or self._pos == self._size
        if at_end and not self._checked:
            self._check()
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size if size >= 0 else _IO_CHUNK)

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)

    def readinto1(self, buffer: WriteableBuffer) -> int:
        return self.readinto(buffer)

    def _check(self) -> None:
        self._checked = True  # report a mismatch once, not again on close
        actual = self._hash.hexdigest()
        if actual != self._expected:
            raise ChecksumMismatch(redact(self._url), self._expected, actual)
        self._verified = True

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._checked and self._size is not None and self._pos == self._size:
                self._check()
        finally:
            try:
                with translate(self._url, "closing"):
                    self._raw.close()
            finally:
                if self._on_close is not None:
                    self._on_close()
                super().close()


def _read_local_sidecar(path: str, url: str) -> str | None:
    """The digest recorded beside the local file ``path``; None when it is not published
    (what :func:`transfer.sidecar.read_sidecar` gives through fsspec's local filesystem)."""
    side_url = url + SIDECAR_SUFFIX
    try:
        f = open(path + SIDECAR_SUFFIX, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > SIDECAR_LIMIT:
            raise InvalidArtifact(
                f"{redact(side_url)} is {size} bytes, over the {SIDECAR_LIMIT}-byte limit",
                redact(side_url),
            )
        raw = f.read(SIDECAR_LIMIT + 1)
    if len(raw) > SIDECAR_LIMIT:
        raise InvalidArtifact(
            f"{redact(side_url)} is over the {SIDECAR_LIMIT}-byte limit", redact(side_url)
        )
    return parse_sidecar(raw, url)


def open_local_verified(path: str, url: str, callback: Any = None) -> VerifiedReader:
    """:func:`transfer.verified.open_verified` for the local file ``path`` (which ``url``, a
    plain path, names): the sidecar first, then the data, hashed as it is read.

    Raises:
        ArtifactNotFound: No data, or no sidecar (missing or unpublished artifact).
        InvalidArtifact: The sidecar is malformed.
        StorageError: The file cannot be read.
    """
    check_artifact_path(path, url)
    with translate(url, "opening"):
        expected = _read_local_sidecar(path, url)
        if expected is None:
            raise not_published(url)
        raw = open(path, "rb", buffering=_IO_CHUNK)  # noqa: SIM115 - the reader closes it
    size = os.fstat(raw.fileno()).st_size
    if callback is not None:
        callback.set_size(size)
        return VerifiedReader(raw, url, expected, size, callback)
    shown = StageProgress("receiving", size)
    return VerifiedReader(raw, url, expected, size, shown, on_close=shown.finish)
