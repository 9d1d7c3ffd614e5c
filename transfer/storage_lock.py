"""Lock objects on storage: ``<path>.lock`` taken by exclusive create, the mutual exclusion
:func:`transfer.publishing.compare_and_swap_small` runs under. Local files use ``O_CREAT |
O_EXCL``, S3 a conditional PUT (``If-None-Match: *``), ``memory://`` a process-wide mutex;
other backends get a best-effort check-then-create. A lock older than
:data:`STALE_LOCK_SECONDS` is taken to be left by a crashed writer and is broken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from narrative.jsonio import parse_json

from .errors import StorageLockTimeout
from .fsio import file_exists, is_local, is_s3, precondition_failed, redact, rm_if_exists, translate
from .storage_base import LOCK_SUFFIX

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "LOCK_SUFFIX",
    "STALE_LOCK_SECONDS",
    "StorageLock",
]

logger = logging.getLogger(__name__)


DEFAULT_LOCK_TIMEOUT = 30.0
"""Seconds :func:`transfer.publishing.compare_and_swap_small` waits for its lock, at most."""
STALE_LOCK_SECONDS = 60.0
"""A lock older than this is taken to be left over by a crashed writer and is broken."""
_LOCK_BODY_LIMIT = 1024  # bytes of a lock object read back (its JSON body is far smaller)
# memory:// lives in this process only: a process-wide mutex makes its exclusive create exact.
_MEMORY_MUTEX = threading.Lock()


class StorageLock:
    """A lock object ``<path>.lock`` taken by exclusive create, with stale-lock breaking.

    Local files use ``O_CREAT | O_EXCL``; S3 uses a conditional PUT (``If-None-Match: *``);
    ``memory://`` uses a process-wide mutex around its create. Other backends get a
    check-then-create that is not atomic (best effort). A lock older than
    :data:`STALE_LOCK_SECONDS` is taken to be left by a crashed writer and is broken.
    """

    def __init__(self, fs: AbstractFileSystem, path: str, url: str, timeout: float) -> None:
        self.fs = fs
        self.path = path
        self.url = url
        self.timeout = timeout
        self.token = uuid.uuid4().hex
        self.body = json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "created": time.time(),
            }
        ).encode()
        self._fd: int | None = None

    def __enter__(self) -> StorageLock:
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            with translate(self.url + LOCK_SUFFIX, "locking", writing=True):
                if self._try_create():
                    return self
                self._break_if_stale()
            if time.monotonic() > deadline:
                raise StorageLockTimeout(redact(self.url), self.timeout)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.1)

    def __exit__(self, *exc: object) -> None:
        with translate(self.url + LOCK_SUFFIX, "unlocking", writing=True):
            self._release()

    def _try_create(self) -> bool:
        fs = self.fs
        if is_local(fs):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, self.body)
            finally:
                os.close(fd)
            return True
        if is_s3(fs):
            try:
                fs.pipe_file(self.path, self.body, IfNoneMatch="*")
            except Exception as exc:
                if not precondition_failed(exc):
                    raise
                # A retried PUT may have succeeded the first time: the lock may be ours.
                return self._owner() == self.token
            return True
        if isinstance(fs, MemoryFileSystem):
            with _MEMORY_MUTEX:
                if file_exists(fs, self.path):
                    return False
                fs.pipe_file(self.path, self.body)
            return True
        if file_exists(fs, self.path):  # other backends: not atomic, see the class docstring
            return False
        fs.pipe_file(self.path, self.body)
        return self._owner() == self.token

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        try:
            body = parse_json(raw[:_LOCK_BODY_LIMIT])
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _owner(self) -> str | None:
        body = self._read()
        token = None if body is None else body.get("token")
        return token if isinstance(token, str) else None

    def _break_if_stale(self) -> None:
        if is_local(self.fs):
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return
            if age > STALE_LOCK_SECONDS:
                # Rename first: only one breaker wins, and never a fresh lock taken meanwhile.
                stale = f"{self.path}.stale-{uuid.uuid4().hex}"
                try:
                    os.rename(self.path, stale)
                    os.unlink(stale)
                except FileNotFoundError:
                    return
                logger.warning("broke a stale lock %s (%.0fs old)", self.path, age)
            return
        body = self._read()
        created = None if body is None else body.get("created")
        if isinstance(created, (int, float)) and time.time() - created > STALE_LOCK_SECONDS:
            rm_if_exists(self.fs, self.path)
            logger.warning("broke a stale lock %s", redact(self.url) + LOCK_SUFFIX)

    def _release(self) -> None:
        if is_local(self.fs):
            with contextlib.suppress(FileNotFoundError):
                with open(self.path, "rb") as f:
                    mine = self.token.encode() in f.read(_LOCK_BODY_LIMIT)
                if mine:
                    os.unlink(self.path)
                    return
            logger.warning("lock %s was broken while held", self.path)
            return
        if self._owner() == self.token:
            rm_if_exists(self.fs, self.path)
        else:
            logger.warning("lock %s was broken while held", redact(self.url) + LOCK_SUFFIX)
