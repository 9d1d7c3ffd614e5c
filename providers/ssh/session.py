"""SSH connections for the ``ssh`` provider: one per host and login, shared by every call of
this process, on a private event loop thread (the provider interface is synchronous, asyncssh
is not).

Host keys are trusted strictly: the key must be in the configured ``known_hosts`` file, or
match the fingerprint pinned in the config (trust on first use, with the fingerprint shown by
the refusal and confirmed by the user passing it). Only the configured key is offered; no SSH
agent is consulted or forwarded, and ``~/.ssh/config`` is not read (an environment's record says
everything about how it is reached).

A reverse tunnel (:meth:`Session.forward_socket`) forwards a unix socket on the remote host to
one on this machine through the connection; :class:`Session` keeps it up: when the connection
drops it reconnects with backoff and forwards again, so a runtime on the host reaches the hub
again within seconds of the link coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

with warnings.catch_warnings():
    # cryptography 51 deprecates DSA, which asyncssh still names at import: not ours to show
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

from ..errors import ProviderError, ProviderUnavailable
from .target import SSHTarget, quote_argv

__all__ = ["CommandResult", "Session", "offered_host_key", "session_for"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHUNK = 1 << 16
_RECONNECT_ATTEMPT = 5.0
"""Seconds one reconnection attempt of the tunnel keeper may take: a SYN lost while the link
was down is sent again soon after it is back."""
_KEEPALIVE = 2.0
"""Seconds between keepalives: a dead link is noticed within three of them."""


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class _Loop:
    """One event loop on a daemon thread for every SSH connection of this process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, name="ssh-loop", daemon=True)
        thread.start()

    def call(self, coro: Awaitable[T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


_LOOP_LOCK = threading.Lock()
_SESSIONS: dict[SSHTarget, Session] = {}


_LOOPS: list[_Loop] = []


def _loop() -> _Loop:
    with _LOOP_LOCK:  # (two threads must not start two loops)
        if not _LOOPS:
            _LOOPS.append(_Loop())
        return _LOOPS[0]


def session_for(target: SSHTarget) -> Session:
    """The shared session of ``target`` (connected lazily)."""
    with _LOOP_LOCK:
        session = _SESSIONS.get(target)
        if session is None:
            session = _SESSIONS[target] = Session(target)
        return session


def offered_host_key(host: str, port: int, timeout: float) -> str:
    """The fingerprint (``SHA256:...``) of the host key ``host`` offers, as a connection of
    :class:`Session` with nothing in known_hosts would be offered it (same algorithm
    preference); nothing is trusted or sent but the key exchange.

    Raises:
        ProviderUnavailable: no SSH server answers within ``timeout``.
    """

    async def probe() -> str:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port, config=[]), timeout)
        if key is None:
            raise ProviderUnavailable(f"ssh {host}:{port}: no host key offered")
        return str(key.get_fingerprint("sha256"))

    try:
        return _loop().call(probe(), timeout + 5)
    except (TimeoutError, asyncssh.Error, OSError) as exc:
        raise ProviderUnavailable(f"ssh {host}:{port}: no SSH server answers ({exc})") from None


class _Client(asyncssh.SSHClient):
    """Trusts a host key missing from known_hosts only when it matches the pinned fingerprint;
    remembers the fingerprint offered, for the refusal to show."""

    def __init__(self, pin: str | None, seen: list[str]) -> None:
        self.pin = pin
        self.seen = seen

    def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
        fingerprint = str(key.get_fingerprint("sha256"))
        self.seen.append(fingerprint)
        return self.pin is not None and fingerprint == self.pin


class Session:
    """Commands, file streams and reverse tunnels on one host, over one shared connection."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._forwards: dict[str, str] = {}
        self._listeners: dict[str, tuple[asyncssh.SSHClientConnection, asyncssh.SSHListener]] = {}
        """remote socket path → the connection and listener forwarding it now."""
        """remote socket path → local socket path, forwarded again after a reconnect."""
        self._keeper: asyncio.Task[None] | None = None
        self._home: str | None = None
        self.runtimes: set[str] = set()
        """Runtime directories known to be installed on the host (checked once a process)."""
        self.prefixes: dict[str, str] = {}
        """Runtime directory → ``sys.base_prefix`` of its Python on the host."""

    def absolute(self, path: str) -> str:
        """``path`` with a leading ``~/`` replaced by the remote user's home."""
        if path != "~" and not path.startswith("~/"):
            return path
        if self._home is None:
            self._home = self.check('printf %s "$HOME"', "finding the home directory").decode()
        return self._home if path == "~" else f"{self._home}/{path[2:]}"

    # -- connection -----------------------------------------------------------------------------

    def call(
        self,
        make: Callable[[asyncssh.SSHClientConnection], Awaitable[T]],
        timeout: float | None = None,
    ) -> T:
        """Run ``make(connection)`` on the SSH loop and wait for it, errors translated."""

        async def run() -> T:
            return await make(await self._connection())

        limit = None if timeout is None else timeout + self.target.connect_timeout + 5
        try:
            return _loop().call(run(), limit)
        except TimeoutError:
            raise ProviderUnavailable(f"ssh {self.target.label}: no answer in time") from None
        except (asyncssh.Error, OSError) as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: BaseException) -> ProviderError:
        where = f"ssh {self.target.label}"
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, asyncssh.PermissionDenied):
            return ProviderError(
                f"{where}: login refused for the key {self.target.key_file} ({exc.reason})"
            )
        if isinstance(exc, asyncssh.DisconnectError):
            return ProviderUnavailable(f"{where}: connection lost ({exc.reason})")
        return ProviderUnavailable(f"{where}: {exc}")

    async def _connection(self, *, keeper: bool = False) -> asyncssh.SSHClientConnection:
        """The open connection, made (again) when there is none; while the keeper reconnects,
        other callers fail at once instead of waiting for the link."""
        if self._conn is not None and self._conn.is_closed() and not keeper and self._keeping():
            # the keeper is reconnecting: do not make every caller wait for the link too
            raise ProviderUnavailable(f"ssh {self.target.label}: connection lost, reconnecting")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None or self._conn.is_closed():
                self._conn = await self._connect(_RECONNECT_ATTEMPT if keeper else None)
            return self._conn

    def _keeping(self) -> bool:
        return bool(self._forwards) and self._keeper is not None and not self._keeper.done()

    async def _connect(self, timeout: float | None = None) -> asyncssh.SSHClientConnection:
        target = self.target
        if not os.path.exists(target.key_file):
            raise ProviderError(f"ssh {target.label}: no private key at {target.key_file}")
        known: Any
        if os.path.exists(target.known_hosts):
            known = target.known_hosts
        else:
            known = asyncssh.import_known_hosts("")
        seen: list[str] = []
        try:
            conn, _client = await asyncssh.create_connection(
                lambda: _Client(target.host_key, seen),
                target.host,
                target.port,
                username=target.user,
                client_keys=[target.key_file],
                known_hosts=known,
                agent_path=None,
                agent_forwarding=False,
                config=[],
                connect_timeout=min(timeout or target.connect_timeout, target.connect_timeout),
                keepalive_interval=_KEEPALIVE,
                keepalive_count_max=3,
            )
        except asyncssh.HostKeyNotVerifiable:
            offered = seen[-1] if seen else "unknown"
            why = (
                f"it does not match the pinned host_key {target.host_key}"
                if target.host_key
                else f"it is not in {target.known_hosts}"
            )
            raise ProviderError(
                f"ssh {target.label}: the host key is not trusted: {why}. The host offered "
                f"the key {offered}; check that fingerprint out of band, then add the key to "
                f"known_hosts or pass --config host_key={offered}"
            ) from None
        log.debug("ssh %s connected", target.label)
        return conn

    # -- commands -------------------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        stdin: IO[bytes] | bytes | None = None,
        stdout: Callable[[bytes], object] | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        timeout: float | None = None,
        on_timeout: str | None = None,
    ) -> CommandResult:
        """Run ``command`` (a shell command line) and wait for it.

        ``stdin`` is streamed in; ``stdout``, when given, is called with each chunk of the
        output, which the result then leaves out; ``on_output`` gets ``("stdout" | "stderr",
        chunk)`` as they arrive. After ``timeout`` seconds ``on_timeout`` (a command that ends
        the first one's processes) runs on a second channel and the output so far is kept.
        """

        async def go(conn: asyncssh.SSHClientConnection) -> CommandResult:
            try:
                process = await conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                # the server could not open a session (connection lost, sessions exhausted):
                # nothing is known about the host, so nothing may be concluded from it (a
                # missing program is the command's exit status 127, not this)
                raise ProviderUnavailable(
                    f"ssh {self.target.label}: no session channel: {exc.reason}"
                ) from None
            chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

            async def pump(name: str, stream: Any) -> None:
                while data := await stream.read(_CHUNK):
                    if name == "stdout" and stdout is not None:
                        await asyncio.get_running_loop().run_in_executor(None, stdout, data)
                    else:
                        chunks[name].append(data)
                    if on_output is not None:
                        on_output(name, data)

            async def feed() -> None:
                if isinstance(stdin, bytes):
                    process.stdin.write(stdin)
                elif stdin is not None:
                    loop = asyncio.get_running_loop()
                    while data := await loop.run_in_executor(None, stdin.read, _CHUNK):
                        process.stdin.write(data)
                        await process.stdin.drain()
                process.stdin.write_eof()

            pumps = asyncio.gather(
                pump("stdout", process.stdout), pump("stderr", process.stderr), feed()
            )
            timed_out = False
            try:
                await asyncio.wait_for(asyncio.shield(pumps), timeout)
            except TimeoutError:
                timed_out = True
                if on_timeout is None:  # a probe: no answer means the host is not reachable
                    process.close()
                    raise ProviderUnavailable(
                        f"ssh {self.target.label}: no answer within {timeout:g}s"
                    ) from None
                if on_timeout is not None:
                    with contextlib.suppress(asyncssh.Error, OSError):
                        await conn.run(on_timeout, check=False, timeout=30)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pumps), 10)
            completed = await asyncio.wait_for(process.wait(check=False), 10)
            process.close()
            status = completed.exit_status
            if status is None or status < 0:  # ended by a signal
                signal_name = completed.exit_signal[0] if completed.exit_signal else None
                status = 128 + _signal_number(signal_name)
            return CommandResult(
                status, b"".join(chunks["stdout"]), b"".join(chunks["stderr"]), timed_out
            )

        return self.call(go, None if timeout is None else timeout + 45)

    def check(
        self, command: str, what: str, *, stdin: bytes | None = None, timeout: float = 120
    ) -> bytes:
        """Run ``command``; its stdout, or a :class:`ProviderError` saying ``what`` failed."""
        result = self.run(command, stdin=stdin, timeout=timeout)
        if result.exit_code != 0 or result.timed_out:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            detail = detail.splitlines()[-1] if detail else f"exit code {result.exit_code}"
            raise ProviderError(f"ssh {self.target.label}: {what} failed: {detail}")
        return result.stdout

    # -- reverse tunnel -------------------------------------------------------------------------

    def forward_socket(self, remote_path: str, local_path: str) -> None:
        """Forward connections to the unix socket ``remote_path`` on the host to
        ``local_path`` here, now and after every reconnect, until :meth:`unforward`."""

        async def go(conn: asyncssh.SSHClientConnection) -> None:
            current = self._listeners.get(remote_path)
            if not (
                current and current[0] is conn and self._forwards.get(remote_path) == local_path
            ):
                await self._forward(conn, remote_path, local_path)  # (a run before this one
                # on the same connection forwarded it already: nothing to do)
            self._forwards[remote_path] = local_path
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.get_running_loop().create_task(self._keep(conn))

        self.call(go, 60)

    def unforward(self, remote_path: str) -> None:
        async def go() -> None:
            self._forwards.pop(remote_path, None)
            _conn, listener = self._listeners.pop(remote_path, (None, None))
            if listener is not None:
                listener.close()

        _loop().call(go(), 10)

    async def _forward(self, conn: asyncssh.SSHClientConnection, remote: str, local: str) -> None:
        _old_conn, old = self._listeners.pop(remote, (None, None))
        if old is not None:
            old.close()  # (a no-op on a connection that is gone)
        # a socket file left by an earlier connection would make the server refuse to listen
        await conn.run(f"rm -f {quote_argv([remote])}", check=False, timeout=30)
        self._listeners[remote] = (conn, await conn.forward_remote_path(remote, local))

    async def _keep(self, forwarded: asyncssh.SSHClientConnection) -> None:
        """Reconnect and forward again whenever the connection is lost, while any forward is
        wanted: attempts of at most :data:`_RECONNECT_ATTEMPT` seconds, backoff from 0.5 s up
        to 5 s, so a link back up is used within seconds. ``forwarded`` is the connection the
        forwards are on; a connection made meanwhile by someone else gets them too, and a
        forward that failed is tried again."""
        delay = 0.5
        while self._forwards:
            conn = self._conn
            if conn is forwarded and conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), 1.0)
                continue
            try:
                conn = await asyncio.wait_for(self._connection(keeper=True), _RECONNECT_ATTEMPT + 1)
                for remote, local in list(self._forwards.items()):
                    await asyncio.wait_for(self._forward(conn, remote, local), 30)
                forwarded = conn
                log.info("ssh %s: tunnel up again", self.target.label)
                delay = 0.5
            except (asyncssh.Error, OSError, ProviderError) as exc:  # TimeoutError included
                log.info("ssh %s: reconnecting the tunnel failed: %s", self.target.label, exc)
                if conn is not None and conn is not forwarded and not conn.is_closed():
                    conn.close()  # forwards half made: start again on a fresh connection
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _signal_number(name: str | None) -> int:
    try:
        return int(signal.Signals[f"SIG{name}"]) if name else 1
    except KeyError:
        return 1
