"""Compare-and-swap ref updates, interoperable with stock git's locking protocol.

A ref is updated while holding ``<ref>.lock`` (created exclusively, as git does, so a concurrent
``git update-ref`` and our writers exclude each other): the current value is checked, the new one
is written and fsynced to a dot-file beside the ref (git ignores dot-files in ``refs/``) and
renamed over the ref, then the lock is removed. A crash leaves either the old or the new value,
never a torn one.

Thread heads (``refs/narrative/threads/<id>``) are guarded here, under that lock, so that no
caller can skip it: a thread head only moves to a descendant of its current value, and is never
deleted, unless the caller passes ``force=True`` (only ``narrative thread reset --force`` and
gc's history rewrite do). Every move of a thread head is first appended to its *head log*,
``logs/<ref>`` in git's reflog format (``git reflog show <ref>`` reads it), so a head a forced
move left behind is still named, resolvable as ``<thread>@{n}`` and kept by gc.

Our lock files name their owner (host, boot, pid and the process's start time), so a lock whose
owner is gone on this host is broken at once, and a reused pid is told apart by its start time.
Locks we cannot attribute (git's own, which are empty or hold an id, or another host's) are
taken to be left by a killed process once older than :data:`STALE_LOCK_SECONDS`.
"""

from __future__ import annotations

import builtins
import functools
import os
import time

from .ancestry import is_ancestor
from .errors import ConcurrentUpdate, InvalidInput, LockTimeout, NonFastForward, StoreCorrupted
from .fsutil import mkstemp, unlink_quiet, write_atomic
from .odb import ObjectStore
from .plain import Frozen
from .processes import process_start_time

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "ANY",
    "STALE_LOCK_SECONDS",
    "THREAD_REF_PREFIX",
    "HeadLogEntry",
    "RefStore",
    "lock_owner_stamp",
    "owner_is_gone",
    "validate_ref_name",
]

STALE_LOCK_SECONDS: Final = 30.0
ANY: Final = b"any"
"""Pass as ``expected`` to update a ref whatever its current value."""

THREAD_REF_PREFIX: Final = "refs/narrative/threads/"
"""Refs under this prefix are thread heads: guarded and logged by :meth:`RefStore.update`."""

_ZERO = b"\x00" * 20
_LOG_IDENTITY = b"narrative <narrative@localhost>"
_OWNER_MAGIC = b"narrative-lock"


@functools.cache
def _this_host() -> tuple[str, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "-"
    return os.uname().nodename, boot  # what socket.gethostname() answers, without its import


def lock_owner_stamp() -> bytes:
    """What our lock files hold: who owns them, so a lock left by a dead owner is recognised."""
    host, boot = _this_host()
    start = process_start_time(os.getpid()) or "-"
    return b"%s %s %s %d %s\n" % (
        _OWNER_MAGIC,
        host.encode(),
        boot.encode(),
        os.getpid(),
        start.encode(),
    )


def owner_is_gone(stamp: bytes) -> bool | None:
    """Whether the owner named by a lock's content is gone: True/False when it ran on this
    host, None when that cannot be told (an empty or foreign lock, another host)."""
    parts = stamp.split()
    if len(parts) != 5 or parts[0] != _OWNER_MAGIC:
        return None
    host, boot = _this_host()
    try:
        owner_host, owner_boot = parts[1].decode(), parts[2].decode()
        pid, start = int(parts[3]), parts[4].decode()
    except (UnicodeDecodeError, ValueError):
        return None
    if owner_host != host or boot == "-" or start == "-":
        return None
    if owner_boot != boot:
        return True  # the machine rebooted since: every process of that boot is gone
    return process_start_time(pid) != start


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


class HeadLogEntry(Frozen):
    """One move of a thread head: from ``old`` to ``new`` (None: absent), when and why."""

    __slots__ = ("new", "old", "reason", "time")
    FIELDS = ("old", "new", "time", "reason")
    old: bytes | None
    new: bytes | None
    time: int
    reason: str

    def __init__(self, old: bytes | None, new: bytes | None, time: int, reason: str) -> None:
        self.set_fields(old, new, time, reason)


class RefStore:
    """Read and update refs of one git dir (``odb``: its object store, for the ancestry check
    of thread heads; opened on first use when not given)."""

    def __init__(
        self, git_dir: str, lock_timeout: float = 10.0, odb: ObjectStore | None = None
    ) -> None:
        self.git_dir = git_dir
        self.lock_timeout = lock_timeout
        self._odb = odb

    @property
    def odb(self) -> ObjectStore:
        if self._odb is None:
            self._odb = ObjectStore(self.git_dir)
        return self._odb

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
                if fname.endswith(".lock") or fname.startswith("."):
                    continue  # locks, and our writers' temporary files
                path = os.path.join(root, fname)
                name = os.path.relpath(path, self.git_dir).replace(os.sep, "/")
                oid = self._read_loose(path, name)
                if oid is not None:
                    refs[name] = oid
        return refs

    def _acquire(self, lock_path: str) -> None:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            if self._create_lock(lock_path):
                return
            self._break_if_stale(lock_path)
            if time.monotonic() > deadline:
                raise LockTimeout(lock_path, self.lock_timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _create_lock(lock_path: str) -> bool:
        """Create ``lock_path`` holding our owner stamp; False if it exists.

        The stamp is written to a dot-file first and hard-linked into place, so the lock is
        never seen empty (an empty lock could only be judged by its age)."""
        fd, tmp = mkstemp(".lock-", os.path.dirname(lock_path))
        try:
            os.write(fd, lock_owner_stamp())
            os.close(fd)
            fd = -1
            os.link(tmp, lock_path)
            return True
        except FileExistsError:
            return False
        finally:
            if fd >= 0:
                os.close(fd)
            unlink_quiet(tmp)

    @staticmethod
    def _break_if_stale(lock_path: str) -> None:
        try:
            with open(lock_path, "rb") as f:
                stamp = f.read(512)
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return
        except OSError:
            stamp, age = b"", 0.0
        gone = owner_is_gone(stamp)
        if gone is False or (gone is None and age <= STALE_LOCK_SECONDS):
            return
        # Rename first: only one breaker wins. If what we moved is not the lock we judged (it
        # was broken and retaken meanwhile), put it back.
        stale = f"{lock_path}.stale-{os.getpid()}"
        try:
            os.rename(lock_path, stale)
        except FileNotFoundError:
            return
        try:
            with open(stale, "rb") as f:
                moved = f.read(512)
            if moved != stamp:
                os.link(stale, lock_path)
        except OSError:
            pass  # the put-back lost to a new owner, who holds the lock now: nothing to undo
        finally:
            unlink_quiet(stale)

    def update(
        self,
        name: str,
        new: bytes | None,
        expected: bytes | None = ANY,
        *,
        force: bool = False,
        reason: str = "update",
    ) -> None:
        """Point ``name`` at ``new`` (None deletes) if it currently equals ``expected``.

        ``expected=None`` requires that the ref does not exist yet; :data:`ANY` skips the check.
        A thread head (:data:`THREAD_REF_PREFIX`) moves only to a descendant of its current
        value unless ``force``; each move of one is appended to its head log with ``reason``.

        Raises:
            ConcurrentUpdate: the current value differs from ``expected``.
            NonFastForward: a thread head would move to a non-descendant or be deleted.
        """
        path = self._path(name)
        if new is not None and (new == _ZERO or len(new) != 20):
            raise InvalidInput(f"invalid object id for ref {name}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_path = path + ".lock"
        self._acquire(lock_path)
        try:
            current = self.read(name)
            if expected not in (ANY, current):
                raise ConcurrentUpdate(f"ref {name} moved concurrently")
            if name.startswith(THREAD_REF_PREFIX) and current != new:
                if (
                    current is not None
                    and not force
                    and (new is None or not is_ancestor(self.odb, current, new))
                ):
                    raise NonFastForward(name, current, new)
                # logged before the ref moves: a crash never leaves the old head unnamed
                self._append_log(name, HeadLogEntry(current, new, int(time.time()), reason))
            if new is None:
                self._delete_locked(name, path)
                return
            write_atomic(path, new.hex().encode() + b"\n")
        finally:
            unlink_quiet(lock_path)

    # -- head logs of thread refs -------------------------------------------------------------

    def _log_path(self, name: str) -> str:
        return os.path.join(self.git_dir, "logs", *validate_ref_name(name).split("/"))

    def _append_log(self, name: str, entry: HeadLogEntry) -> None:
        reason = " ".join(entry.reason.split()) or "update"
        line = b"%s %s %s %d +0000\t%s\n" % (
            (entry.old or _ZERO).hex().encode(),
            (entry.new or _ZERO).hex().encode(),
            _LOG_IDENTITY,
            entry.time,
            reason.encode("utf-8", "replace"),
        )
        path = self._log_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                os.write(fd, line)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no torn line (a full disk): the move is refused whole
                raise
        finally:
            os.close(fd)

    def head_log(self, name: str) -> builtins.list[HeadLogEntry]:
        """The moves of thread head ``name``, oldest first (unreadable lines are skipped)."""
        try:
            with open(self._log_path(name), "rb") as f:
                lines = f.read().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return []
        entries = []
        for line in lines:
            head, tab, reason = line.partition(b"\t")
            fields = head.split(b" ")
            stamp = _log_time(line)
            try:
                old, new = bytes.fromhex(fields[0].decode()), bytes.fromhex(fields[1].decode())
            except (IndexError, ValueError, UnicodeDecodeError):
                continue
            if stamp is None or not tab or len(old) != 20 or len(new) != 20:
                continue
            entries.append(
                HeadLogEntry(
                    None if old == _ZERO else old,
                    None if new == _ZERO else new,
                    stamp,
                    reason.decode("utf-8", "replace"),
                )
            )
        return entries

    def logged_refs(self) -> builtins.list[str]:
        """Every thread ref that has a head log (deleted refs included)."""
        base = os.path.join(self.git_dir, "logs", *THREAD_REF_PREFIX.rstrip("/").split("/"))
        names = []
        for root, _dirs, files in os.walk(base):
            for fname in files:
                if not fname.startswith("."):
                    path = os.path.join(root, fname)
                    names.append(
                        os.path.relpath(path, os.path.join(self.git_dir, "logs")).replace(
                            os.sep, "/"
                        )
                    )
        return sorted(names)

    def expire_head_log(self, name: str, older_than: float) -> None:
        """Drop the entries of ``name``'s head log recorded before time ``older_than``."""
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_path = path + ".lock"
        self._acquire(lock_path)
        try:
            log_path = self._log_path(name)
            try:
                with open(log_path, "rb") as f:
                    lines = f.read().splitlines(keepends=True)
            except FileNotFoundError:
                return
            kept = [
                line
                for line in lines
                if (stamp := _log_time(line)) is not None and stamp >= older_than
            ]
            if kept != lines:
                write_atomic(log_path, b"".join(kept))
        finally:
            unlink_quiet(lock_path)

    def _delete_locked(self, name: str, path: str) -> None:
        unlink_quiet(path)
        packed_path = os.path.join(self.git_dir, "packed-refs")
        if name not in self._packed():
            return
        lock = packed_path + ".lock"
        self._acquire(lock)
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
            write_atomic(packed_path, b"".join(kept))
        finally:
            unlink_quiet(lock)


def _log_time(line: bytes) -> int | None:
    try:
        return int(line.partition(b"\t")[0].split(b" ")[-2])
    except (IndexError, ValueError):
        return None
