"""The optional file watcher: a journal of changed directories so a snapshot stats only those.

``narrative watch`` runs :func:`run_watcher`: one inotify instance watches every directory of
the workspace (never the store, never the inside of a ``.git`` except its ``info/exclude``) and
appends to a journal in the store's private dir, ``narrative/watch/<workspace digest>/``:

* ``state`` — JSON ``{"generation": ..., "pid": ...}``, written once every watch is in place;
* ``journal-<generation>`` — records ``<kind><relative path>\\0``: ``d`` a directory whose
  entries (or an entry's content or metadata) changed, ``t`` a directory to walk entirely (new,
  or moved in), ``!`` "anything may have changed" (an ignore file changed), ``c`` a cookie;
* ``lock`` — held (flock) by the live watcher: a free lock means no watcher, whatever
  ``state`` says (a killed watcher's pid may be reused);
* ``cookies/`` — :func:`sync_journal` creates a unique file there and waits until the
  watcher has journaled it. inotify delivers the events of one instance in order, so once the
  cookie is in the journal, every change completed before it was created is in the journal too.

A snapshot records ``(generation, offset after its cookie)`` in the stat cache it writes (the
scan starts after the cookie). The next snapshot trusts the journal only when the watcher still
runs the same generation: it then re-lists the journaled directories, walks ``t`` subtrees
whole, and takes everything else from the cache. Whatever could make the journal incomplete —
no watcher, a restart (new generation), a queue overflow (the watcher starts a new generation),
a watch it could not add (the watcher stops), a sync timeout, a ``!`` record — means the full scan.

Not seen by inotify, hence by no journal: writes through a shared ``mmap``, writes to a file
through a hard link (or bind mount) outside the workspace, and changes made on another machine
through a network file system. Do not run the watcher on such workspaces.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import time
from collections.abc import Callable, Iterator

from .errors import InvalidInput, WatcherStopped
from .fsutil import is_locked, write_atomic
from .jsonio import load_json
from .paths import STORE_DIR_NAME
from .plain import Frozen
from .scan import KnownChanges
from .statcache import cache_path

__all__ = [
    "JournalMark",
    "JournalSync",
    "known_changes",
    "run_watcher",
    "sync_journal",
    "wait_ready",
    "watch_dir",
    "watcher_pid",
    "watcher_running",
]

JournalMark = tuple[str, int]
"""(generation, journal offset) a stat cache was taken at."""

JOURNAL_LIMIT = 64 << 20
"""A journal this large is replaced by a new generation (costing one full scan)."""
SYNC_TIMEOUT = 2.0
"""How long a snapshot waits for the watcher to journal its cookie before scanning in full."""

# inotify(7) constants
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_DIR_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
)  # fmt: skip
_ENTRY_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW
"""For ``.git`` (only ``info`` coming or going matters there: ignore rules)."""
_INFO_MASK = _ENTRY_MASK | IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB
"""For ``.git/info`` (``exclude`` holds ignore rules)."""
_EVENT = struct.Struct("iIII")
_RULE_FILES = frozenset((".gitignore", ".narrativeignore"))


def watch_dir(store_dir: str, workspace: str) -> str:
    """The watcher's private directory for ``workspace`` (next to its stat cache)."""
    name = os.path.basename(cache_path(store_dir, workspace)).removeprefix("stat-")
    return os.path.join(store_dir, "narrative", "watch", name)


class _Inotify:
    """A minimal ctypes binding of inotify(7) (the standard library has none)."""

    def __init__(self) -> None:
        import ctypes  # (only the watcher needs it: snapshots import this module too)

        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd: int = fd
        self._errno = ctypes.get_errno

    def add(self, path: str, mask: int) -> int:
        wd = int(self._add(self.fd, os.fsencode(path), mask))
        if wd < 0:
            code = self._errno()
            raise OSError(code, os.strerror(code), path)
        return wd

    def remove(self, wd: int) -> None:
        self._rm(self.fd, wd)  # EINVAL when already gone: nothing to do

    def read(self, timeout: float) -> list[tuple[int, int, bytes]]:
        """Events ``(wd, mask, name)`` available within ``timeout`` seconds."""
        import select  # (here, as signal below: a snapshot imports this module, never runs it)

        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            events.append((wd, mask, name))
        return events

    def close(self) -> None:
        os.close(self.fd)


class _Watch:
    """What one inotify watch descriptor watches."""

    __slots__ = ("kind", "rel")
    rel: str
    kind: str
    """``dir`` a workspace directory, ``git`` a ``.git``, ``info`` a ``.git/info``, ``cookies``."""

    def __init__(self, rel: str, kind: str) -> None:
        self.rel = rel
        self.kind = kind


class _Session:
    """One generation: an inotify instance, its watches and its journal file."""

    def __init__(self, workspace: str, private: str, exclude: set[str]) -> None:
        self.workspace = workspace
        self.private = private
        self.exclude = exclude
        self.generation = os.urandom(16).hex()
        self.inotify = _Inotify()
        self.watches: dict[int, _Watch] = {}
        self.journal = os.open(
            os.path.join(private, f"journal-{self.generation}"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        self.pending: dict[bytes, None] = {}
        self.written = 0
        cookies = os.path.join(private, "cookies")
        self.watches[self.inotify.add(cookies, IN_CREATE | IN_ONLYDIR)] = _Watch("", "cookies")
        self.add_tree("")
        if not any(w.kind == "dir" and not w.rel for w in self.watches.values()):
            raise WatcherStopped(f"cannot watch {workspace}: gone or unreadable")

    def _abs(self, rel: str) -> str:
        return os.path.join(self.workspace, rel) if rel else self.workspace

    def _add(self, rel: str, kind: str, mask: int) -> bool:
        try:
            wd = self.inotify.add(self._abs(rel), mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise WatcherStopped(
                    "inotify watch limit reached (raise fs.inotify.max_user_watches); "
                    "snapshots scan in full"
                ) from exc
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                # gone or replaced already (its parent's events cover it), or unreadable (the
                # scan cannot list it either; a chmod that opens it is an event: watched then)
                return False
            raise WatcherStopped(f"cannot watch {self._abs(rel)}: {exc.strerror}") from exc
        self.watches[wd] = _Watch(rel, kind)
        return True

    def add_tree(self, rel: str) -> None:
        """Watch ``rel`` and every directory below it (each watched before it is listed)."""
        if not self._add(rel, "dir", _DIR_MASK):
            return
        try:
            with os.scandir(self._abs(rel)) as it:
                entries = list(it)
        except OSError:
            return
        prefix = rel + "/" if rel else ""
        for entry in entries:
            with contextlib.suppress(OSError):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.name == ".git":
                    self.add_git(prefix + entry.name)
                elif not self.excluded(prefix + entry.name):
                    self.add_tree(prefix + entry.name)

    def add_git(self, rel: str) -> None:
        if self._add(rel, "git", _ENTRY_MASK):
            self._add(rel + "/info", "info", _INFO_MASK)

    def excluded(self, rel: str) -> bool:
        if rel == STORE_DIR_NAME:
            return True
        return os.path.join(self.workspace, rel) in self.exclude

    def drop_tree(self, rel: str) -> None:
        """Stop watching ``rel`` and below (moved away or deleted)."""
        prefix = rel + "/"
        for wd, watch in list(self.watches.items()):
            if watch.kind != "cookies" and (watch.rel == rel or watch.rel.startswith(prefix)):
                del self.watches[wd]
                self.inotify.remove(wd)

    def record(self, kind: str, rel: str = "") -> None:
        # A dict: one record per directory and batch, however many events it had. A repeat
        # after a cookie in the same batch may go: every event of a batch was queued before the
        # batch is written, so before the snapshot waiting for that cookie starts its scan.
        self.pending[kind.encode() + os.fsencode(rel) + b"\0"] = None

    def handle(self, wd: int, mask: int, raw_name: bytes) -> bool:
        """Journal one event; False when the generation can no longer be trusted."""
        if mask & IN_Q_OVERFLOW:
            return False
        watch = self.watches.get(wd)
        if watch is None:
            return True  # a watch dropped since (its events are covered by a ``t`` record)
        if mask & IN_IGNORED:
            del self.watches[wd]
            return bool(watch.rel) or watch.kind != "dir"  # the root's watch: start over
        name = os.fsdecode(raw_name)
        if watch.kind == "cookies":
            self.record("c", name)
            return True
        if watch.kind != "dir":
            if (watch.kind, name) in (("git", "info"), ("info", "exclude")):
                self.record("!")
                if watch.kind == "git" and mask & (IN_CREATE | IN_MOVED_TO):
                    self._add(watch.rel + "/info", "info", _INFO_MASK)
            return True
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            return bool(watch.rel)  # the workspace itself went away: start over
        rel = f"{watch.rel}/{name}" if watch.rel else name
        if not name or self.excluded(rel):
            return True
        if name == ".git":
            if mask & (IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM):
                self.record("!")  # a nested repo came or went: its info/exclude rules too
                if mask & (IN_DELETE | IN_MOVED_FROM):
                    self.drop_tree(rel)
                elif mask & IN_ISDIR:
                    self.add_git(rel)
            return True
        if name in _RULE_FILES:
            self.record("!")
            return True
        self.record("d", watch.rel)
        if mask & IN_ISDIR:
            if mask & (IN_MOVED_FROM | IN_DELETE):
                self.drop_tree(rel)
            elif mask & (IN_CREATE | IN_MOVED_TO | IN_ATTRIB):
                if not mask & IN_ATTRIB:
                    self.drop_tree(rel)  # a stale watch under that name would journal wrong paths
                # (a chmod may have made an unreadable directory watchable)
                self.add_tree(rel)  # before the record: what lands before the watch is walked
                self.record("t", rel)
        return True

    def flush(self) -> bool:
        """Append the batch to the journal; False once the journal is due for a new one."""
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            os.write(self.journal, data)
            self.written += len(data)
        return self.written < JOURNAL_LIMIT

    def close(self) -> None:
        self.inotify.close()
        os.close(self.journal)


@contextlib.contextmanager
def _exclusive(private: str) -> Iterator[int]:
    fd = os.open(os.path.join(private, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInput("a watcher is already running for this workspace") from None
        yield fd
    finally:
        os.close(fd)


def _clear_private(private: str) -> None:
    for name in os.listdir(private):
        if name.startswith("journal-") or name == "state":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(private, name))
    cookies = os.path.join(private, "cookies")
    for name in os.listdir(cookies):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cookies, name))


def run_watcher(
    store_dir: str,
    workspace: str,
    on_ready: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Watch ``workspace`` until SIGTERM/SIGINT (or ``should_stop()``), keeping its journal.

    ``on_ready(generation)`` is called each time a generation's watches are all in place.
    Raises :class:`WatcherStopped` when the journal cannot be kept complete.
    """
    import signal

    ws = os.path.realpath(workspace)
    if not os.path.isdir(ws):
        raise InvalidInput(f"workspace {ws} does not exist")
    private = watch_dir(store_dir, ws)
    os.makedirs(os.path.join(private, "cookies"), exist_ok=True)
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with _exclusive(private):
            _clear_private(private)
            while not stopping and not (should_stop and should_stop()):
                session = _Session(ws, private, {os.path.realpath(store_dir)})
                try:
                    state = {"generation": session.generation, "pid": os.getpid()}
                    write_atomic(os.path.join(private, "state"), json.dumps(state).encode())
                    if on_ready is not None:
                        on_ready(session.generation)
                    _pump(session, lambda: bool(stopping) or bool(should_stop and should_stop()))
                finally:
                    session.close()
                    _clear_private(private)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pump(session: _Session, stop: Callable[[], bool]) -> None:
    """Journal events until told to stop or the generation breaks or its journal is full
    (then return, to start a new generation)."""
    while not stop():
        for wd, mask, name in session.inotify.read(0.2):
            if not session.handle(wd, mask, name):
                session.flush()
                return
        if not session.flush():
            return


def watcher_running(store_dir: str, workspace: str) -> bool:
    """Whether a live watcher holds the workspace's watch lock."""
    return is_locked(os.path.join(watch_dir(store_dir, os.path.realpath(workspace)), "lock"))


def _state(private: str) -> dict[str, object] | None:
    try:
        with open(os.path.join(private, "state"), "rb") as f:
            state = load_json(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def watcher_pid(store_dir: str, workspace: str) -> int | None:
    """The pid of the live watcher of ``workspace``, if any."""
    if not watcher_running(store_dir, workspace):
        return None
    state = _state(watch_dir(store_dir, os.path.realpath(workspace)))
    pid = state.get("pid") if state else None
    return pid if isinstance(pid, int) else None


def wait_ready(store_dir: str, workspace: str, pid: int, timeout: float) -> str | None:
    """Wait until the watcher ``pid`` has its watches in place; its generation, or None if
    it exited first or took longer than ``timeout``."""
    private = watch_dir(store_dir, os.path.realpath(workspace))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(private)
        if state is not None and state.get("pid") == pid:
            return str(state.get("generation"))
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return None
        time.sleep(0.02)
    return None


class JournalSync(Frozen):
    """The live watcher's journal, synchronised up to ``offset`` (just after our cookie)."""

    __slots__ = ("generation", "offset", "path")
    FIELDS = ("generation", "offset", "path")
    generation: str
    offset: int
    path: str

    def __init__(self, generation: str, offset: int, path: str) -> None:
        self.set_fields(generation, offset, path)

    @property
    def mark(self) -> JournalMark:
        return (self.generation, self.offset)


def sync_journal(
    store_dir: str, workspace: str, timeout: float = SYNC_TIMEOUT
) -> JournalSync | None:
    """Wait until the live watcher has journaled every change made before this call.

    None when there is no watcher or it did not answer in time (the caller scans in full).
    """
    private = watch_dir(store_dir, workspace)
    if not watcher_running(store_dir, workspace):
        return None
    state = _state(private)
    if state is None or not isinstance(state.get("generation"), str):
        return None
    generation = str(state["generation"])
    path = os.path.join(private, f"journal-{generation}")
    try:
        start = os.stat(path).st_size
    except OSError:
        return None
    cookie = f"{os.getpid()}-{os.urandom(16).hex()}"
    cookie_path = os.path.join(private, "cookies", cookie)
    try:
        os.close(os.open(cookie_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:
        return None
    needle = b"c" + cookie.encode() + b"\0"
    deadline = time.monotonic() + timeout
    pause = 0.0005
    try:
        with open(path, "rb") as journal:
            journal.seek(start)
            seen = b""
            while True:
                seen += journal.read()
                found = seen.find(needle)
                if found >= 0:
                    return JournalSync(generation, start + found + len(needle), path)
                if time.monotonic() > deadline:
                    return None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(cookie_path)


def known_changes(sync: JournalSync, since: JournalMark | None) -> KnownChanges | None:
    """What changed between ``since`` and ``sync``; None when the journal cannot tell."""
    if since is None or since[0] != sync.generation or since[1] > sync.offset:
        return None
    try:
        with open(sync.path, "rb") as journal:
            journal.seek(since[1])
            data = journal.read(sync.offset - since[1])
    except OSError:
        return None
    dirs: set[str] = set()
    trees: set[str] = set()
    for record in data.split(b"\0")[:-1]:
        kind, rel = record[:1], os.fsdecode(record[1:])
        if kind == b"d":
            dirs.add(rel)
        elif kind == b"t":
            trees.add(rel)
        elif kind != b"c":
            return None  # "!" (or anything unknown): the full scan
    return KnownChanges(frozenset(dirs), frozenset(trees))
