"""The error subtree of the transfer package (bundles, archives, storage, remotes).

Everything here derives from :class:`narrative.errors.NarrativeError`, so the CLI prints one
clear line and exits 1. Errors carry the URL they are about (credentials in it are redacted by
the raiser) and mix in a built-in where one fits::

    NarrativeError
    └── TransferError
        ├── StorageError(url)                    I/O failure talking to a storage backend
        │   └── StorageLockTimeout(url, seconds) (+TimeoutError) a storage lock stayed taken
        ├── ArtifactNotFound(url) (+LookupError) no such artifact, or not published (no sidecar)
        ├── ChecksumMismatch(url, expected, actual)  content differs from its ``.sha256`` sidecar
        ├── InvalidArtifact (+ValueError)        bad or hostile content: malformed sidecar,
        │                                        oversized document, ...
        └── IncompleteExport                     an artifact about to be written would not be
                                                 complete (its objects are not closed, or the
                                                 files do not rebuild the snapshot's tree)

Backend exceptions (``OSError`` from local files, botocore/s3fs/aiohttp errors) are translated
into this tree in exactly one place, :func:`transfer.fsio.translate`.
"""

from __future__ import annotations

from narrative.errors import NarrativeError

__all__ = [
    "ArtifactNotFound",
    "ChecksumMismatch",
    "IncompleteExport",
    "InvalidArtifact",
    "StorageError",
    "StorageLockTimeout",
    "TransferError",
]


class TransferError(NarrativeError):
    """Root of the errors raised by the transfer package."""


class StorageError(TransferError):
    """An I/O operation against a storage backend failed.

    Attributes:
        url: The URL being accessed (credentials redacted).
    """

    def __init__(self, url: str, message: str | None = None) -> None:
        super().__init__(message or f"storage error at {url}")
        self.url = url


class StorageLockTimeout(StorageError, TimeoutError):
    """A lock guarding a storage object could not be taken in time.

    Attributes:
        url: The URL of the object the lock guards.
        seconds: How long the caller waited.
    """

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(url, f"timed out after {seconds:.0f}s waiting for the lock on {url}")
        self.seconds = seconds


class ArtifactNotFound(TransferError, LookupError):
    """No artifact at this URL, or its data exists but it was never published.

    Attributes:
        url: The URL that was looked up (credentials redacted).
    """

    def __init__(self, url: str, message: str | None = None) -> None:
        super().__init__(message or f"artifact not found: {url}")
        self.url = url


class ChecksumMismatch(TransferError):
    """The content of an artifact does not hash to the digest in its sidecar.

    Attributes:
        url: The artifact's URL (credentials redacted).
        expected: The hex sha256 its ``.sha256`` sidecar records.
        actual: The hex sha256 of the bytes actually read.
    """

    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {url}: sidecar says sha256 {expected}, content is {actual}"
        )
        self.url = url
        self.expected = expected
        self.actual = actual


class InvalidArtifact(TransferError, ValueError):
    """Content that is malformed, oversized or hostile.

    Attributes:
        url: The artifact's URL when known (credentials redacted), else None.
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class IncompleteExport(TransferError):
    """A bundle or archive being written would not be complete: an object it needs is missing
    from the store, or what was selected is not closed under reachability. Nothing is published.
    """
