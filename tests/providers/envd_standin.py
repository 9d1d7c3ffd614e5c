"""A local stand-in for E2B's envd (the agent inside every sandbox), for tests only.

With ``E2B_DEBUG=true`` the e2b SDK makes no control-plane call and talks plain HTTP to envd
(``E2B_SANDBOX_URL``). This module is that envd: a real threaded HTTP server on 127.0.0.1 that
serves the SDK's own Connect stubs (``process.Process``, ``filesystem.Filesystem``) and envd's
plain HTTP routes (``/files`` upload/download, ``/health``), so the SDK runs unmodified.

Fidelity, and where it stops:

* Each sandbox is a real host directory standing in for ``/``; sandbox paths (absolute, or
  relative to ``/home/user`` as envd resolves them) map below it, and anything resolving outside
  it (a symlink pointing out) is refused with ``PERMISSION_DENIED`` / HTTP 403.
* Commands are real subprocesses with streamed stdout/stderr, exit codes, env vars, cwd and
  signals. They run on the host, so only ``cwd`` and ``HOME`` are translated into the sandbox
  root; arguments are not (callers that want to pass here use relative paths).
* Sandboxes are picked by the ``E2b-Sandbox-Id`` header the SDK sends. A killed or unknown
  sandbox answers 502 "The sandbox ... was not found", as E2B's edge proxy does, which the SDK
  maps to ``SandboxNotRunningException`` and ``is_running() == False``.
* Not implemented (``UNIMPLEMENTED``): PTYs, reattaching to a process (``Connect``),
  ``StreamInput``, ``Update`` and directory watchers.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import posixpath
import queue
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.filesystem import filesystem_pb
from e2b.envd.filesystem.filesystem_connect import FilesystemWSGIApplication
from e2b.envd.process import process_pb
from e2b.envd.process.process_connect import ProcessWSGIApplication
from protobuf import Oneof
from protobuf.wkt import Timestamp
from werkzeug.formparser import parse_form_data
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wsgi import LimitedStream

DEBUG_SANDBOX_ID = "debug_sandbox_id"
"""The id ``Sandbox.create()`` returns in debug mode (no control plane assigns one)."""
HOME = "/home/user"
USER = "user"

StartResponse = Any  # the WSGI start_response callable
Environ = dict[str, Any]


class PathEscape(Exception):
    """A sandbox path resolves outside the sandbox root."""


@dataclass
class _Proc:
    pid: int
    popen: subprocess.Popen[bytes]
    config: process_pb.ProcessConfig
    tag: str | None
    events: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)


class SandboxState:
    """One sandbox: a root directory on the host and the processes started in it."""

    def __init__(self, sandbox_id: str, root: Path) -> None:
        self.id = sandbox_id
        self.root = root
        self.alive = True
        self.procs: dict[int, _Proc] = {}
        self.lock = threading.Lock()
        (root / HOME.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)

    def host_path(self, path: str) -> Path:
        """Map a sandbox path to the host; relative paths are relative to the user's home."""
        if path.startswith("~"):
            path = HOME + path[1:]
        if not path.startswith("/"):
            path = posixpath.join(HOME, path)
        host = self.root / posixpath.normpath(path).lstrip("/")
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(host)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise PathEscape(path)
        return host

    def sandbox_path(self, host: Path) -> str:
        return "/" + os.path.relpath(host, self.root).replace(os.sep, "/").removeprefix(".")

    def kill(self) -> None:
        """What the control plane's kill does: every process dies, the sandbox is gone."""
        self.alive = False
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            signal_group(proc.popen, signal.SIGKILL)


def signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)


def _entry(sandbox: SandboxState, host: Path) -> filesystem_pb.EntryInfo:
    st = os.lstat(host)
    is_link = stat.S_ISLNK(st.st_mode)
    target_st = st
    if is_link:
        try:
            target_st = os.stat(host)
        except OSError:
            target_st = st
    kind = (
        filesystem_pb.FileType.DIRECTORY
        if stat.S_ISDIR(target_st.st_mode)
        else filesystem_pb.FileType.FILE
    )
    info = filesystem_pb.EntryInfo(
        name=host.name,
        type=kind,
        path=sandbox.sandbox_path(host),
        size=st.st_size,
        mode=st.st_mode & 0o7777,
        permissions=stat.filemode(st.st_mode),
        owner=USER,
        group=USER,
        modified_time=Timestamp.from_datetime(datetime.fromtimestamp(st.st_mtime, tz=UTC)),
        is_symlink=is_link,
    )
    if is_link:
        info.symlink_target = os.readlink(host)
    return info


class _Filesystem:
    """``filesystem.Filesystem`` over one sandbox's root."""

    def __init__(self, sandbox: SandboxState) -> None:
        self.sandbox = sandbox

    def _path(self, path: str) -> Path:
        try:
            return self.sandbox.host_path(path)
        except PathEscape:
            raise ConnectError(
                Code.PERMISSION_DENIED, f"path '{path}' escapes the sandbox"
            ) from None

    def _existing(self, path: str) -> Path:
        host = self._path(path)
        if not host.exists() and not host.is_symlink():
            raise ConnectError(Code.NOT_FOUND, f"no such file or directory: '{path}'")
        return host

    def stat(self, request: filesystem_pb.StatRequest, ctx: RequestContext) -> Any:
        host = self._existing(request.path)
        return filesystem_pb.StatResponse(entry=_entry(self.sandbox, host))

    def make_dir(self, request: filesystem_pb.MakeDirRequest, ctx: RequestContext) -> Any:
        host = self._path(request.path)
        if host.is_dir():
            raise ConnectError(Code.ALREADY_EXISTS, f"directory '{request.path}' already exists")
        try:
            host.mkdir(parents=True)
        except FileExistsError:
            raise ConnectError(Code.INVALID_ARGUMENT, f"'{request.path}' is a file") from None
        return filesystem_pb.MakeDirResponse(entry=_entry(self.sandbox, host))

    def move(self, request: filesystem_pb.MoveRequest, ctx: RequestContext) -> Any:
        source = self._existing(request.source)
        destination = self._path(request.destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        return filesystem_pb.MoveResponse(entry=_entry(self.sandbox, destination))

    def list_dir(self, request: filesystem_pb.ListDirRequest, ctx: RequestContext) -> Any:
        host = self._existing(request.path)
        if not host.is_dir():
            raise ConnectError(Code.INVALID_ARGUMENT, f"path '{request.path}' is not a directory")
        depth = request.depth or 1
        entries = []
        for dirpath, dirnames, filenames in os.walk(host):
            level = len(Path(dirpath).relative_to(host).parts) + 1
            for name in sorted(dirnames + filenames):
                entries.append(_entry(self.sandbox, Path(dirpath) / name))
            if level >= depth:
                dirnames.clear()
        return filesystem_pb.ListDirResponse(entries=entries)

    def remove(self, request: filesystem_pb.RemoveRequest, ctx: RequestContext) -> Any:
        host = self._existing(request.path)
        if host.is_dir() and not host.is_symlink():
            shutil.rmtree(host)
        else:
            host.unlink()
        return filesystem_pb.RemoveResponse()

    def _unimplemented(self, *args: Any) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "directory watchers are not in the stand-in")

    watch_dir = create_watcher = get_watcher_events = remove_watcher = _unimplemented


class _Process:
    """``process.Process`` running real subprocesses in one sandbox's root."""

    def __init__(self, sandbox: SandboxState) -> None:
        self.sandbox = sandbox

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        home = str(self.sandbox.host_path(HOME))
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "USER": USER,
            "LANG": "C.UTF-8",
            "E2B_SANDBOX": "true",
            "E2B_SANDBOX_ID": self.sandbox.id,
        }
        return {**base, **extra}

    def start(self, request: process_pb.StartRequest, ctx: RequestContext) -> Iterator[Any]:
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "PTYs are not in the stand-in")
        config = request.process or process_pb.ProcessConfig()
        cwd_path = config.cwd if config.has_field("cwd") and config.cwd else HOME
        try:
            cwd = self.sandbox.host_path(cwd_path)
        except PathEscape:
            raise ConnectError(
                Code.PERMISSION_DENIED, f"cwd '{cwd_path}' escapes the sandbox"
            ) from None
        if not cwd.is_dir():
            raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd_path}' does not exist")
        want_stdin = request.stdin if request.has_field("stdin") else True
        try:
            popen = subprocess.Popen(
                [config.cmd, *config.args],
                cwd=cwd,
                env=self._env(dict(config.envs)),
                stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ConnectError(Code.INTERNAL, f"error starting process: {exc}") from exc
        proc = _Proc(popen.pid, popen, config, request.tag if request.has_field("tag") else None)
        with self.sandbox.lock:
            self.sandbox.procs[proc.pid] = proc
        return self._stream(proc, ctx)

    def _stream(self, proc: _Proc, ctx: RequestContext) -> Iterator[Any]:
        def pump(name: str, stream: Any) -> None:
            for chunk in iter(lambda: stream.read1(32768), b""):
                proc.events.put((name, chunk))
            proc.events.put((name, b""))

        readers = [
            threading.Thread(target=pump, args=(n, s), daemon=True)
            for n, s in (("stdout", proc.popen.stdout), ("stderr", proc.popen.stderr))
        ]
        for reader in readers:
            reader.start()
        interval = float(ctx.request_headers.get("keepalive-ping-interval", "50") or 50)
        deadline = ctx.timeout_ms
        end_at = time.monotonic() + deadline / 1000 if deadline is not None else None

        def event(**kwargs: Any) -> Any:
            return process_pb.StartResponse(event=process_pb.ProcessEvent(**kwargs))

        deadline_passed = False
        try:
            yield event(event=Oneof("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid)))
            open_streams = 2
            while open_streams:
                wait = interval
                if end_at is not None:
                    wait = min(wait, end_at - time.monotonic())
                    if wait <= 0:
                        deadline_passed = True
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
                try:
                    name, chunk = proc.events.get(timeout=wait)
                except queue.Empty:
                    yield event(event=Oneof("keepalive", process_pb.ProcessEvent.KeepAlive()))
                    continue
                if not chunk:
                    open_streams -= 1
                    continue
                data = process_pb.ProcessEvent.DataEvent(output=Oneof(name, chunk))
                yield event(event=Oneof("data", data))
            code = proc.popen.wait()
            if not self.sandbox.alive:
                # The VM is gone: the proxy cuts the stream, no end event is ever sent.
                message = f"the connection to sandbox {self.sandbox.id} ended mid-stream"
                raise ConnectError(Code.UNAVAILABLE, message)
            if code < 0:
                end = process_pb.ProcessEvent.EndEvent(
                    exit_code=-1, exited=False, status=f"signal: {signal.Signals(-code).name}"
                )
            else:
                end = process_pb.ProcessEvent.EndEvent(
                    exit_code=code, exited=True, status=f"exit status {code}"
                )
            yield event(event=Oneof("end", end))
        finally:
            # envd bounds a process by the deadline of the request that started it (none when
            # the client sent no timeout), not by the client staying connected: a client that
            # disconnects leaves it running, and it stays listed until it exits.
            if deadline_passed and proc.popen.poll() is None:
                signal_group(proc.popen, signal.SIGKILL)
            if proc.popen.poll() is None:
                threading.Thread(
                    target=self._finish, args=(proc, end_at), name="envd-reap", daemon=True
                ).start()
            else:
                self._finish(proc, None)

    def _finish(self, proc: _Proc, end_at: float | None) -> None:
        """Wait for the process (killing it when its deadline passes), then forget it."""
        timeout = None if end_at is None else max(0.0, end_at - time.monotonic())
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.popen, signal.SIGKILL)
        proc.popen.wait()
        for pipe in (proc.popen.stdin, proc.popen.stdout, proc.popen.stderr):
            if pipe is not None:
                pipe.close()
        with self.sandbox.lock:
            self.sandbox.procs.pop(proc.pid, None)

    def _find(self, selector: process_pb.ProcessSelector | None) -> _Proc:
        with self.sandbox.lock:
            procs = list(self.sandbox.procs.values())
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=pid):
                found = [p for p in procs if p.pid == pid]
            case Oneof(field="tag", value=tag):
                found = [p for p in procs if p.tag == tag]
            case _:
                found = []
        if not found:
            raise ConnectError(Code.NOT_FOUND, "process not found")
        return found[0]

    def list(self, request: process_pb.ListRequest, ctx: RequestContext) -> Any:
        with self.sandbox.lock:
            procs = list(self.sandbox.procs.values())
        return process_pb.ListResponse(
            processes=[process_pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag) for p in procs]
        )

    def send_signal(self, request: process_pb.SendSignalRequest, ctx: RequestContext) -> Any:
        proc = self._find(request.process)
        sig = signal.SIGKILL if request.signal == process_pb.Signal.SIGKILL else signal.SIGTERM
        signal_group(proc.popen, sig)
        return process_pb.SendSignalResponse()

    def send_input(self, request: process_pb.SendInputRequest, ctx: RequestContext) -> Any:
        proc = self._find(request.process)
        if proc.popen.stdin is None:
            raise ConnectError(Code.FAILED_PRECONDITION, "stdin is not enabled for the process")
        match request.input.input if request.input is not None else None:
            case Oneof(field="stdin", value=data):
                proc.popen.stdin.write(data)
                proc.popen.stdin.flush()
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "only stdin input is supported")
        return process_pb.SendInputResponse()

    def close_stdin(self, request: process_pb.CloseStdinRequest, ctx: RequestContext) -> Any:
        proc = self._find(request.process)
        if proc.popen.stdin is not None:
            proc.popen.stdin.close()
        return process_pb.CloseStdinResponse()

    def _unimplemented(self, *args: Any) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "not in the stand-in")

    connect = update = stream_input = _unimplemented


def _json(start_response: StartResponse, status: str, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _error(start_response: StartResponse, code: int, message: str) -> list[bytes]:
    reasons = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 502: "Bad Gateway"}
    return _json(start_response, f"{code} {reasons[code]}", {"code": code, "message": message})


class _FilesRoute:
    """envd's plain HTTP ``/files``: GET downloads one file, POST uploads (multipart or raw)."""

    def __init__(self, sandbox: SandboxState) -> None:
        self.sandbox = sandbox

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        from urllib.parse import parse_qs

        params = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            if environ["REQUEST_METHOD"] == "GET":
                return self._download(params.get("path", ""), start_response)
            if environ["REQUEST_METHOD"] == "POST":
                return self._upload(environ, params.get("path"), start_response)
        except PathEscape as exc:
            return _error(start_response, 403, f"path '{exc}' escapes the sandbox")
        return _error(start_response, 400, "unsupported method")

    def _download(self, path: str, start_response: StartResponse) -> Iterable[bytes]:
        host = self.sandbox.host_path(path)
        if not host.exists():
            return _error(start_response, 404, f"path '{path}' does not exist")
        if host.is_dir():
            return _error(start_response, 400, f"path '{path}' is a directory")
        size = host.stat().st_size
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
        )

        def body() -> Iterator[bytes]:
            with open(host, "rb") as f:
                yield from iter(lambda: f.read(65536), b"")

        return body()

    def _write(self, path: str, chunks: Iterable[bytes]) -> dict[str, str]:
        host = self.sandbox.host_path(path)
        if host.is_dir():
            raise IsADirectoryError(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        with open(host, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        return {"name": host.name, "type": "file", "path": self.sandbox.sandbox_path(host)}

    def _upload(
        self, environ: Environ, path: str | None, start_response: StartResponse
    ) -> Iterable[bytes]:
        content_type = environ.get("CONTENT_TYPE", "")
        written: list[dict[str, str]] = []
        try:
            if content_type.startswith("multipart/form-data"):
                _stream, _form, files = parse_form_data(environ)
                uploads = files.getlist("file")
                try:
                    for upload in uploads:
                        single = path and len(uploads) == 1
                        target = path if single else upload.filename or ""
                        chunks = iter(partial(upload.stream.read, 65536), b"")
                        written.append(self._write(target or "", chunks))
                finally:
                    for upload in files.values():
                        upload.close()
            else:
                if not path:
                    return _error(start_response, 400, "missing path")
                stream: Any = environ["wsgi.input"]
                if environ.get("HTTP_CONTENT_ENCODING", "") == "gzip":
                    stream = gzip.GzipFile(fileobj=stream)
                written.append(self._write(path, iter(lambda: stream.read(65536), b"")))
        except IsADirectoryError as exc:
            return _error(start_response, 400, f"path '{exc}' is a directory")
        return _json(start_response, "200 OK", written)


class QuietHandler(WSGIRequestHandler):
    """Serves requests without logging each one."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def loopback_server(app: Any) -> BaseWSGIServer:
    """A threaded server of the WSGI ``app`` on a free port of 127.0.0.1 (every stand-in's)."""
    return make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)


class LoopbackServing:
    """A stand-in that serves itself (a WSGI app) on a free port of 127.0.0.1, from a thread
    of its own."""

    def __init__(self) -> None:
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "stand-in not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def serve(self, name: str) -> None:
        self._server = loopback_server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._thread.start()

    def stop_serving(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class EnvdStandIn(LoopbackServing):
    """The server: many sandboxes by id, each with its own root below ``base``."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base
        self.sandboxes: dict[str, SandboxState] = {}
        self._apps: dict[str, dict[str, Any]] = {}

    def add_sandbox(self, sandbox_id: str = DEBUG_SANDBOX_ID) -> SandboxState:
        """A fresh sandbox (replacing any earlier one of that id, whose processes die)."""
        if sandbox_id in self.sandboxes:
            self.kill(sandbox_id)
        root = self.base / f"{sandbox_id}-{len(self._apps)}-{os.urandom(3).hex()}"
        root.mkdir(parents=True)
        sandbox = SandboxState(sandbox_id, root)
        self.sandboxes[sandbox_id] = sandbox
        self._apps[sandbox_id] = {
            "/process.Process/": ProcessWSGIApplication(_Process(sandbox)),  # type: ignore[arg-type]
            "/filesystem.Filesystem/": FilesystemWSGIApplication(_Filesystem(sandbox)),  # type: ignore[arg-type]
            "/files": _FilesRoute(sandbox),
        }
        return sandbox

    def kill(self, sandbox_id: str = DEBUG_SANDBOX_ID) -> None:
        """Kill a sandbox the way E2B's control plane does (in debug mode the SDK cannot)."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            sandbox.kill()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # connectrpc's error path drains wsgi.input to EOF: bound it by Content-Length.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() != "chunked":
            environ["wsgi.input"] = LimitedStream(environ["wsgi.input"], length)
        sandbox_id = environ.get("HTTP_E2B_SANDBOX_ID", DEBUG_SANDBOX_ID)
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None or not sandbox.alive:
            # What E2B's edge proxy answers for a sandbox that is gone.
            return _error(start_response, 502, f"The sandbox {sandbox_id} was not found")
        path = environ.get("PATH_INFO", "/")
        if path == "/health":
            start_response("204 No Content", [])
            return []
        for prefix, app in self._apps[sandbox_id].items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                result: Iterable[bytes] = app(environ, start_response)
                return result
        return _error(start_response, 404, f"no route {path}")

    def start(self) -> EnvdStandIn:
        self.serve("envd-standin")
        return self

    def stop(self) -> None:
        for sandbox in self.sandboxes.values():
            sandbox.kill()
        self.stop_serving()
