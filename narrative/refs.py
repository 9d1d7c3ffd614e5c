"""Compare-and-swap ref updates, interoperable with stock git's locking protocol.

A ref is updated by creating ``<ref>.lock`` exclusively, checking the current value, writing and
fsyncing the new value into the lock file and renaming it over the ref: exactly what git does, so
a concurrent ``git update-ref`` and our writers exclude each other. A crash leaves either the old
or the new value, never a torn one. Locks older than :data:`STALE_LOCK_SECONDS` are left by a
killed process (we hold them for microseconds) and are broken.
"""

from __future__ import annotations

import os
import time
from typing import Final

from .errors import ConcurrentUpdate, InvalidInput, LockTimeout, StoreCorrupted
from .fsutil import unlink_quiet

__all__ = ["ANY", "RefStore", "STALE_LOCK_SECONDS", "validate_ref_name"]

STALE_LOCK_SECONDS: Final = 30.0
ANY: Final = b"any"
"""Pass as ``expected`` to update a ref whatever its current value."""

_ZERO = b"\x00" * 20


def validate_ref_name(name: str) -> str:
    """Refuse names git would refuse, or that could escape the refs directory."""
    parts = name.split("/")
    bad = (
        not name.startswith("refs/")
        or any(p in ("", ".", "..") or p.startswith(".") or p.endswith(".lock") for p in parts)
        or any(c in name for c in " ~^:?*[\\\x7f")
        or any(ord(c) < 32 for c in name)
        or "@{" in name
        or name.endswith("/")
    )
    if bad:
        raise InvalidInput(f"invalid ref name: {name!r}")
    return name


class RefStore:
    """Read and update refs of one git dir."""

    def __init__(self, git_dir: str, lock_timeout: float = 10.0) -> None:
        self.git_dir = git_dir
        self.lock_timeout = lock_timeout

    def _path(self, name: str) -> str:
        return os.path.join(self.git_dir, *validate_ref_name(name).split("/"))

    def _packed(self) -> dict[str, bytes]:
        refs: dict[str, bytes] = {}
        try:
            with open(os.path.join(self.git_dir, "packed-refs"), "rb") as f:
                for line in f:
                    if line.startswith((b"#", b"^")):
                        continue
                    oid, _, name = line.strip().partition(b" ")
                    refs[name.decode()] = bytes.fromhex(oid.decode())
        except FileNotFoundError:
            pass
        except ValueError as exc:
            raise StoreCorrupted(f"unreadable packed-refs: {exc}") from exc
        return refs

    def _read_loose(self, path: str, name: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                raw = f.read().strip()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            oid = bytes.fromhex(raw.decode())
        except ValueError:
            oid = b""
        if len(oid) != 20:
            raise StoreCorrupted(f"ref {name} is unreadable")
        return oid

    def read(self, name: str) -> bytes | None:
        """Binary oid the ref points to, or None if it does not exist."""
        oid = self._read_loose(self._path(name), name)
        if oid is not None:
            return oid
        return self._packed().get(name)

    def list(self, prefix: str) -> dict[str, bytes]:
        """All refs under ``prefix`` (which ends with '/'), loose overriding packed."""
        refs = {n: o for n, o in self._packed().items() if n.startswith(prefix)}
        base = os.path.join(self.git_dir, *prefix.rstrip("/").split("/"))
        for root, _dirs, files in os.walk(base):
            for fname in files:
                if fname.endswith(".lock"):
                    continue
                path = os.path.join(root, fname)
                name = os.path.relpath(path, self.git_dir).replace(os.sep, "/")
                oid = self._read_loose(path, name)
                if oid is not None:
                    refs[name] = oid
        return refs

    def _acquire(self, lock_path: str) -> int:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                return os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._break_if_stale(lock_path)
            if time.monotonic() > deadline:
                raise LockTimeout(lock_path, self.lock_timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _break_if_stale(lock_path: str) -> None:
        try:
            age = time.time() - os.stat(lock_path).st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            # Rename first: only one breaker wins, and never a fresh lock taken meanwhile.
            stale = f"{lock_path}.stale-{os.getpid()}"
            try:
                os.rename(lock_path, stale)
                os.unlink(stale)
            except FileNotFoundError:
                pass

    def update(self, name: str, new: bytes | None, expected: bytes | None = ANY) -> None:
        """Point ``name`` at ``new`` (None deletes) if it currently equals ``expected``.

        ``expected=None`` requires that the ref does not exist yet; :data:`ANY` skips the check.
        Raises ConcurrentUpdate when the current value differs.
        """
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_path = path + ".lock"
        fd = self._acquire(lock_path)
        try:
            current = self.read(name)
            if expected not in (ANY, current):
                raise ConcurrentUpdate(f"ref {name} moved concurrently")
            if new is None:
                self._delete_locked(name, path)
                os.close(fd)
                fd = -1
                os.unlink(lock_path)
                return
            if new == _ZERO or len(new) != 20:
                raise InvalidInput(f"invalid object id for ref {name}")
            os.write(fd, new.hex().encode() + b"\n")
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(lock_path, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            unlink_quiet(lock_path)
            raise

    def _delete_locked(self, name: str, path: str) -> None:
        unlink_quiet(path)
        packed_path = os.path.join(self.git_dir, "packed-refs")
        if name not in self._packed():
            return
        lock = packed_path + ".lock"
        fd = self._acquire(lock)
        try:
            with open(packed_path, "rb") as f:
                lines = f.read().splitlines(keepends=True)
            kept: list[bytes] = []
            skip_peel = False
            for line in lines:
                if line.startswith(b"^"):
                    if not skip_peel:
                        kept.append(line)
                    continue
                skip_peel = line.rstrip(b"\n").endswith(b" " + name.encode())
                if not skip_peel:
                    kept.append(line)
            os.write(fd, b"".join(kept))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(lock, packed_path)
        finally:
            if fd >= 0:
                os.close(fd)
                unlink_quiet(lock)
