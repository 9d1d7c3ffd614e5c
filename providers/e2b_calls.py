"""How the ``e2b`` provider (:mod:`providers.e2b_provider`) meets the SDK: the one place its
errors become the providers' error tree, and a file object over a streamed download."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from e2b import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    TimeoutException,
)
from e2b.exceptions import SandboxNotRunningException, SandboxUnreachableException

from narrative.errors import InvalidInput, NarrativeError

from .base import ExecResult
from .errors import ProviderError, ProviderUnavailable, ResourceGone

__all__ = ["StreamReader", "tar_failed", "translate_error", "translating"]


def translate_error(exc: Exception, resource_id: str | None, path: str | None = None) -> Exception:
    """The one place e2b SDK and transport errors become the providers' error tree."""
    if isinstance(exc, NarrativeError | OSError) and not isinstance(exc, ConnectionError):
        return exc  # ours already (or a builtin file error we raised on purpose)
    if isinstance(exc, FileNotFoundException) and path is not None:
        return FileNotFoundError(f"{path}: no such file in the environment")
    if isinstance(exc, SandboxNotFoundException | SandboxNotRunningException):
        return ResourceGone(resource_id or "(e2b sandbox)")
    if isinstance(exc, AuthenticationException):
        return ProviderUnavailable("e2b refused the API key (check the configured api_key_env)")
    if isinstance(exc, RateLimitException):
        return ProviderUnavailable(f"e2b rate limit: {exc}")
    if isinstance(exc, SandboxUnreachableException | httpx.TransportError | ConnectionError) or (
        isinstance(exc, TimeoutException) and not isinstance(exc, SandboxNotRunningException)
    ):
        return ProviderUnavailable(f"e2b sandbox {resource_id} unreachable: {exc}")
    if isinstance(exc, InvalidArgumentException):
        return InvalidInput(f"e2b refused the request: {exc}")
    if isinstance(exc, NotFoundException) and path is not None:
        return FileNotFoundError(f"{path}: no such file in the environment")
    if isinstance(exc, SandboxException):
        return ProviderError(f"e2b: {exc}")
    return exc


@contextmanager
def translating(resource_id: str | None, path: str | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        translated = translate_error(exc, resource_id, path)
        if translated is exc:
            raise
        raise translated from exc


def tar_failed(what: str, resource_id: str, result: ExecResult) -> ProviderError:
    detail = result.stderr.decode(errors="replace").strip()
    return ProviderError(
        f"{what} e2b sandbox {resource_id} failed (tar exit {result.exit_code}): {detail}"
    )


class StreamReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (a streamed download, for tarfile)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
