"""A local stand-in for the part of Daytona's HTTP API the ``daytona`` SDK uses, for tests only.

A real threaded HTTP server on 127.0.0.1 serving two route trees, as Daytona does:

* ``/api``: the control plane (``/sandbox`` create, get, list by labels, start, stop, delete,
  ``last-activity``), with the API key checked as a bearer token (401 otherwise);
* ``/toolbox/<sandbox id>``: the daemon's toolbox, as the SDK reaches it through the
  ``toolboxProxyUrl`` of a sandbox: ``process/execute`` (one-shot, output merged), sessions
  (create, run a command asynchronously, the command's exit code and its stdout and stderr
  logs kept apart, list, delete) and files
  (``bulk-upload`` multipart, ``bulk-download`` answered as multipart with an ``error`` part
  for a missing file).

Each sandbox is a Docker container on the test engine (the offline image, the host's ``/usr``,
Python and this checkout mounted read-only, as the docker provider's ``host_runtime`` does),
on the host's network so a runtime inside reaches a hub on 127.0.0.1. Session commands are
``docker exec``s that carry the session in their environment, so deleting a session kills
its processes, as the daemon does.

What it imitates of Daytona beyond the routes:

* auto-stop: a started sandbox with an ``autoStopInterval`` that sees no activity (a toolbox
  request, a ``last-activity`` call, a start) for that many minutes is stopped; a minute lasts
  :attr:`DaytonaStandIn.minute` seconds (tests shorten it). Running processes are no activity.
* a stopped sandbox's toolbox answers 400 "... Is the Sandbox started?";
* rate limiting: :meth:`DaytonaStandIn.rate_limit` makes the next control-plane requests
  answer 429 with a ``Retry-After`` header, as Daytona's API does when throttled;
* a deleted sandbox is gone (404), its container removed.

Not implemented: snapshots other than the default, image builds (``FROM`` of a local image
only), volumes, PTYs, previews, the socket.io event stream (404: the SDK falls back to polling).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from werkzeug.formparser import parse_form_data
from werkzeug.serving import BaseWSGIServer

from providers.docker.client import capturing_responses
from providers.docker.client import connect as connect_engine
from providers.docker.image import host_runtime
from providers.proctree import signal_argv
from tests.providers.docker_support import connect, ensure_image
from tests.providers.envd_standin import loopback_server

StartResponse = Any
Environ = dict[str, Any]

HOME = "/home/daytona"
API_KEY = "standin-key-0123456789"
"""The key the stand-in accepts (a test value, never a real one)."""
OWNER_LABEL = "daytona.standin.owner"
"""Label of a stand-in's containers (``<start time>-<random>``). Not ``narrative.owner``: the
docker tests' sweep of ``pytest-`` owners would remove the containers of a stand-in serving a
test session running beside them; a stand-in removes its own when it stops, and those of
stand-ins started over :data:`LEAK_AGE` seconds ago (killed before they could)."""
LEAK_AGE = 6 * 3600
SESSION_VAR = "DAYTONA_STANDIN_SESSION"
"""Set in each session command's environment, so a session's processes can be killed."""
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    409: "Conflict",
    429: "Too Many Requests",
}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Command:
    id: str
    command: str
    exec_id: str = ""
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    output: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Box:
    id: str
    container: str
    labels: dict[str, str]
    env: dict[str, str]
    snapshot: str
    auto_stop: int
    auto_delete: int | None
    state: str = "started"
    created: str = field(default_factory=_now)
    last_activity: float = field(default_factory=time.monotonic)
    sessions: dict[str, dict[str, _Command]] = field(default_factory=dict)
    lifecycle: threading.Lock = field(default_factory=threading.Lock)
    """Held by a start or stop: one at a time, as Daytona's runner does them."""


class DaytonaStandIn:
    """The server; sandboxes are containers labelled with this stand-in (removed afterwards)."""

    def __init__(self, minute: float = 60.0) -> None:
        self.minute = minute
        """Seconds a Daytona minute lasts here (auto-stop)."""
        self.boxes: dict[str, _Box] = {}
        self.throttled = 0
        """Requests answered 429 so far."""
        self.requests: list[tuple[str, str]] = []
        """``(method, path)`` of every request, in order."""
        self.command_lines: list[str] = []
        """Every command line a sandbox's daemon was given (the daemon keeps and lists them)."""
        self._throttle: list[str] = []
        self._stop_at_toolbox: set[str] = set()
        self._lock = threading.RLock()
        self._owner = f"{time.time():.0f}-{uuid.uuid4().hex[:12]}"
        probe = connect()  # skips (fails where Docker is required) without an engine
        self.image = ensure_image(probe)
        probe.close()
        # one client for every request thread (a client per thread leaks its sockets)
        self._docker = connect_engine(timeout=60)
        runtime = host_runtime()
        self.runtime = runtime.runtime
        """The argv prefix that runs this checkout's CLI inside a sandbox."""
        self._binds = {m.source: {"bind": m.target, "mode": "ro"} for m in runtime.mounts}
        self._env = {**runtime.env, "HOME": HOME}
        self._server: BaseWSGIServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- control ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start(self) -> DaytonaStandIn:
        api = self._api()
        for container in api.containers(all=True, filters={"label": OWNER_LABEL}):
            started = container["Labels"].get(OWNER_LABEL, "").split("-")[0]
            if started.isdigit() and time.time() - int(started) > LEAK_AGE:
                with contextlib.suppress(Exception):
                    api.remove_container(container["Id"], force=True, v=True)
        self._server = loopback_server(self)
        for target, name in ((self._server.serve_forever, "serve"), (self._reap, "auto-stop")):
            thread = threading.Thread(target=target, name=f"daytona-standin-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        api = self._api()
        for container in api.containers(
            all=True, filters={"label": f"{OWNER_LABEL}={self._owner}"}
        ):
            with contextlib.suppress(Exception):
                api.remove_container(container["Id"], force=True, v=True)
        api.close()

    def rate_limit(self, count: int, retry_after: str | None = "1") -> None:
        """Answer the next ``count`` control-plane requests with 429 (``Retry-After``, when
        given, as the header's value)."""
        with self._lock:
            self._throttle.extend([retry_after or ""] * count)

    def stop_at_next_toolbox_call(self, sandbox_id: str) -> None:
        """Stop the sandbox just before its toolbox's next request is served: an auto-stop (or
        a stop by another client) landing between two calls of a provider."""
        with self._lock:
            self._stop_at_toolbox.add(sandbox_id)

    def clear_rate_limit(self) -> None:
        with self._lock:
            self._throttle.clear()

    def state_of(self, sandbox_id: str) -> str | None:
        box = self.boxes.get(sandbox_id)
        return None if box is None else box.state

    def container_env(self, sandbox_id: str) -> list[str]:
        """The environment the sandbox's container was started with (to look for secrets)."""
        info = self._api().inspect_container(self.boxes[sandbox_id].container)
        return list(info["Config"]["Env"] or [])

    # -- plumbing --------------------------------------------------------------------------------

    def _api(self) -> Any:
        return self._docker

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "/")
        self.requests.append((method, path))
        try:
            if path.startswith("/api/"):
                return self._control(environ, method, path[len("/api") :], start_response)
            if path.startswith("/toolbox/"):
                return self._toolbox(environ, method, path[len("/toolbox") :], start_response)
        except _Answer as answer:
            return answer.send(start_response)
        return _Answer(404, {"message": f"no route {path}"}).send(start_response)

    def _reap(self) -> None:
        """Daytona's auto-stop: stop every started sandbox idle for its interval."""
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            with self._lock:
                idle = [
                    box
                    for box in self.boxes.values()
                    if box.state == "started"
                    and box.auto_stop
                    and now - box.last_activity > box.auto_stop * self.minute
                ]
            for box in idle:
                self._stop_box(box)

    # -- control plane ----------------------------------------------------------------------------

    def _control(
        self, environ: Environ, method: str, path: str, start_response: StartResponse
    ) -> Iterable[bytes]:
        if path.startswith("/socket.io"):
            raise _Answer(404, {"message": "no event stream here"})
        with self._lock:
            if self._throttle:
                retry = self._throttle.pop(0)
                self.throttled += 1
                headers = [("Retry-After", retry)] if retry else []
                raise _Answer(
                    429,
                    {"message": "ThrottlerException: Too Many Requests", "statusCode": 429},
                    headers,
                )
        if environ.get("HTTP_AUTHORIZATION") != f"Bearer {API_KEY}":
            raise _Answer(401, {"message": "Invalid API key", "statusCode": 401})
        parts = [p for p in path.split("/") if p]
        if parts[:1] != ["sandbox"]:
            raise _Answer(404, {"message": f"no route {path}"})
        if len(parts) == 1 and method == "POST":
            return _Answer(200, self._create(_body(environ))).send(start_response)
        if len(parts) == 1 and method == "GET":
            return _Answer(200, self._list(environ)).send(start_response)
        box = self._box(parts[1])
        action = parts[2] if len(parts) > 2 else None
        if action is None and method == "GET":
            return _Answer(200, self._dto(box)).send(start_response)
        if action is None and method == "DELETE":
            self._delete(box)
            return _Answer(200, {**self._dto(box), "state": "destroyed"}).send(start_response)
        if action == "start" and method == "POST":
            self._start_box(box)
        elif action == "stop" and method == "POST":
            self._stop_box(box)
        elif action == "last-activity" and method == "POST":
            box.last_activity = time.monotonic()
            return _Answer(201, None).send(start_response)
        elif action == "autostop" and method == "POST":
            box.auto_stop = int(parts[3])
        else:
            raise _Answer(404, {"message": f"no route {path}"})
        return _Answer(200, self._dto(box)).send(start_response)

    def _box(self, sandbox_id: str) -> _Box:
        box = self.boxes.get(sandbox_id)
        if box is None:
            raise _Answer(404, {"message": f"Sandbox with ID or name {sandbox_id} not found"})
        return box

    def _dto(self, box: _Box) -> dict[str, Any]:
        return {
            "id": box.id,
            "organizationId": "standin-org",
            "name": box.id,
            "snapshot": box.snapshot,
            "user": "daytona",
            "env": box.env,
            "labels": box.labels,
            "public": False,
            "networkBlockAll": False,
            "kvm": False,
            "target": "local",
            "cpu": 1,
            "gpu": 0,
            "memory": 1,
            "disk": 3,
            "state": box.state,
            "autoStopInterval": box.auto_stop,
            "autoDeleteInterval": box.auto_delete,
            "createdAt": box.created,
            "updatedAt": _now(),
            "toolboxProxyUrl": f"{self.url}/toolbox",
        }

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        snapshot = body.get("snapshot") or self.image
        build = body.get("buildInfo") or {}
        if build:
            match = re.search(r"^FROM\s+(\S+)", build.get("dockerfileContent", ""), re.M)
            snapshot = match[1] if match else ""
        if snapshot != self.image:
            raise _Answer(400, {"message": f"Snapshot {snapshot} not found", "statusCode": 400})
        sandbox_id = uuid.uuid4().hex
        env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
        labels = {str(k): str(v) for k, v in (body.get("labels") or {}).items()}
        api = self._api()
        container = api.create_container(
            self.image,
            command=["sleep", "infinity"],
            environment={**self._env, **env},
            labels={OWNER_LABEL: self._owner, "daytona.standin.sandbox": sandbox_id},
            host_config=api.create_host_config(binds=self._binds, network_mode="host"),
        )["Id"]
        box = _Box(
            sandbox_id,
            container,
            labels,
            env,
            snapshot,
            15 if body.get("autoStopInterval") is None else int(body["autoStopInterval"]),
            body.get("autoDeleteInterval"),
        )
        with self._lock:
            self.boxes[sandbox_id] = box
        self._start_box(box)
        return self._dto(box)

    def _start_box(self, box: _Box) -> None:
        with box.lifecycle:
            api = self._api()
            api.start(box.container)
            self._exec_quiet(box, ["mkdir", "-p", HOME])
            box.sessions.clear()  # the daemon starts afresh
            box.last_activity = time.monotonic()
            box.state = "started"

    def _stop_box(self, box: _Box) -> None:
        with box.lifecycle:
            if box.state != "started":
                return
            box.state = "stopping"
            self._api().stop(box.container, timeout=1)
            box.sessions.clear()
            box.state = "stopped"

    def _delete(self, box: _Box) -> None:
        with self._lock:
            self.boxes.pop(box.id, None)
        box.state = "destroyed"
        self._api().remove_container(box.container, force=True, v=True)

    def _list(self, environ: Environ) -> dict[str, Any]:
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        wanted = json.loads(query.get("labels", "{}"))
        with self._lock:
            boxes = list(self.boxes.values())
        items = [
            self._dto(box)
            for box in boxes
            if all(box.labels.get(k) == v for k, v in wanted.items())
        ]
        return {"items": items, "nextCursor": None}

    # -- toolbox -----------------------------------------------------------------------------------

    def _toolbox(
        self, environ: Environ, method: str, path: str, start_response: StartResponse
    ) -> Iterable[bytes]:
        sandbox_id, _, rest = path.lstrip("/").partition("/")
        box = self._box(sandbox_id)
        with self._lock:
            stop_now = sandbox_id in self._stop_at_toolbox
            self._stop_at_toolbox.discard(sandbox_id)
        if stop_now:
            self._stop_box(box)
        if box.state != "started":
            raise _Answer(
                400,
                {"message": f"sandbox {sandbox_id} is {box.state}. Is the Sandbox started?"},
            )
        box.last_activity = time.monotonic()
        parts = rest.split("/")
        if parts[:2] == ["process", "session"]:
            return self._session(environ, method, box, parts[2:], start_response)
        if rest == "process/execute" and method == "POST":  # one-shot, output merged
            body = _body(environ)
            command = self._run(box, "", str(body["command"]))
            while command.exit_code is None:
                time.sleep(0.02)
            result = command.output.decode(errors="replace")
            return _Answer(200, {"exitCode": command.exit_code, "result": result}).send(
                start_response
            )
        if rest == "files/bulk-upload" and method == "POST":
            self._upload(environ, box)
            return _Answer(200, None).send(start_response)
        if rest == "files/bulk-download" and method == "POST":
            return self._download(_body(environ), box, start_response)
        raise _Answer(404, {"message": f"no toolbox route {rest}"})

    def _session(
        self, environ: Environ, method: str, box: _Box, parts: list[str], start_response: Any
    ) -> Iterable[bytes]:
        if not parts and method == "POST":
            session = str(_body(environ)["sessionId"])
            if session in box.sessions:
                raise _Answer(409, {"message": f"session {session} already exists"})
            box.sessions[session] = {}
            return _Answer(201, None).send(start_response)
        if not parts and method == "GET":
            listing = [
                {"sessionId": sid, "commands": [_command_dto(c) for c in cmds.values()]}
                for sid, cmds in list(box.sessions.items())
            ]
            return _Answer(200, listing).send(start_response)
        session = parts[0]
        commands = box.sessions.get(session)
        if commands is None:
            raise _Answer(404, {"message": f"session {session} not found"})
        rest = parts[1:]
        if not rest and method == "DELETE":
            box.sessions.pop(session, None)
            self._exec_quiet(box, signal_argv(session, "kill", SESSION_VAR))
            return _Answer(204, None).send(start_response)
        if rest == ["exec"] and method == "POST":
            body = _body(environ)
            command = self._run(box, session, str(body["command"]))
            commands[command.id] = command
            if not (body.get("runAsync") or body.get("async")):
                while command.exit_code is None:
                    time.sleep(0.02)
            return _Answer(
                200,
                {
                    "cmdId": command.id,
                    "exitCode": command.exit_code,
                    "output": command.output.decode(errors="replace"),
                    "stdout": command.stdout.decode(errors="replace"),
                    "stderr": command.stderr.decode(errors="replace"),
                },
            ).send(start_response)
        if len(rest) >= 2 and rest[0] == "command" and method == "GET":
            command_ = commands.get(rest[1])
            if command_ is None:
                raise _Answer(404, {"message": f"command {rest[1]} not found"})
            if rest[2:] == ["logs"]:
                with command_.lock:
                    logs = {
                        "output": command_.output.decode(errors="replace"),
                        "stdout": command_.stdout.decode(errors="replace"),
                        "stderr": command_.stderr.decode(errors="replace"),
                    }
                return _Answer(200, logs).send(start_response)
            if not rest[2:]:
                return _Answer(200, _command_dto(command_)).send(start_response)
        raise _Answer(404, {"message": f"no session route {'/'.join(parts)}"})

    def _run(self, box: _Box, session: str, line: str) -> _Command:
        """Start ``line`` (under ``sh``) as a ``docker exec`` and pump its output."""
        command = _Command(uuid.uuid4().hex, line)
        self.command_lines.append(line)
        api = self._api()
        command.exec_id = api.exec_create(
            box.container,
            ["sh", "-c", line],
            environment={SESSION_VAR: session},
            workdir=HOME,
        )["Id"]
        with capturing_responses() as responses:
            stream = api.exec_start(command.exec_id, stream=True, demux=True)

        def pump() -> None:
            try:
                for out, err in stream:
                    with command.lock:
                        for chunk, sink in ((out, command.stdout), (err, command.stderr)):
                            if chunk:
                                sink.extend(chunk)
                                command.output.extend(chunk)
            except Exception:  # the container stopped under it
                pass
            finally:  # the stream's response owns its socket: close both
                with contextlib.suppress(OSError):
                    stream.close()
                for response in responses:
                    with contextlib.suppress(OSError):
                        response.close()
            code = self._api().exec_inspect(command.exec_id).get("ExitCode")
            command.exit_code = -1 if code is None else int(code)

        threading.Thread(target=pump, name="daytona-standin-exec", daemon=True).start()
        return command

    def _exec_quiet(self, box: _Box, argv: list[str]) -> None:
        api = self._api()
        exec_id = api.exec_create(box.container, argv)["Id"]
        api.exec_start(exec_id)

    def _upload(self, environ: Environ, box: _Box) -> None:
        _stream, form, files = parse_form_data(environ)
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            index = 0
            while f"files[{index}].path" in form:
                target = str(form[f"files[{index}].path"])
                upload = files[f"files[{index}].file"]
                data = upload.stream.read()
                info = tarfile.TarInfo(target.lstrip("/"))
                info.size = len(data)
                info.mode = 0o644
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
                index += 1
        for upload in files.values():
            upload.close()
        if not self._api().put_archive(box.container, "/", tar_bytes.getvalue()):
            raise _Answer(400, {"message": "upload failed"})

    def _download(
        self, body: dict[str, Any], box: _Box, start_response: StartResponse
    ) -> Iterable[bytes]:
        import docker.errors

        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        api = self._api()
        for path in body.get("paths", []):
            try:
                chunks, stat = api.get_archive(box.container, path)
            except docker.errors.NotFound:
                parts.append(_error_part(boundary, path, 404, "FILE_NOT_FOUND", "no such file"))
                continue
            if stat["mode"] & (1 << 31):  # os.ModeDir in the engine's stat
                parts.append(_error_part(boundary, path, 400, "INVALID_FILE_PATH", "a directory"))
                continue
            with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r|") as tar:
                member = next(iter(tar))
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{path}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            )
            parts.append(head.encode() + data + b"\r\n")
        payload = b"".join(parts) + f"--{boundary}--\r\n".encode()
        start_response(
            "200 OK",
            [
                ("Content-Type", f"multipart/form-data; boundary={boundary}"),
                ("Content-Length", str(len(payload))),
            ],
        )
        return [payload]


def _error_part(boundary: str, path: str, status: int, code: str, message: str) -> bytes:
    detail = json.dumps(
        {
            "message": f"{path}: {message}",
            "statusCode": status,
            "code": code,
            "source": "DAYTONA_DAEMON",
        }
    )
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="error"; '
        f'filename="{path}"\r\nContent-Type: application/json\r\n\r\n'
    )
    return head.encode() + detail.encode() + b"\r\n"


def _command_dto(command: _Command) -> dict[str, Any]:
    return {"id": command.id, "command": command.command, "exitCode": command.exit_code}


def _body(environ: Environ) -> dict[str, Any]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else b""
    return dict(json.loads(raw or b"{}"))


class _Answer(Exception):
    """An HTTP answer (raised from deep in a route, or returned)."""

    def __init__(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or []

    def send(self, start_response: StartResponse) -> list[bytes]:
        data = b"" if self.body is None else json.dumps(self.body).encode()
        reason = _REASONS.get(self.status, "No Content" if self.status == 204 else "Error")
        headers = [("Content-Length", str(len(data))), *self.headers]
        if self.body is not None:
            headers.append(("Content-Type", "application/json"))
        start_response(f"{self.status} {reason}", headers)
        return [data]
