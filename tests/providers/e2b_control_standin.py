"""A local stand-in for E2B's control plane (the REST API at ``E2B_API_URL``), for tests only.

The e2b SDK outside debug mode asks the control plane to create, list, look up, connect to
(resume), pause and kill sandboxes, then talks to each sandbox's envd. This module is that
control plane: a real threaded HTTP server on 127.0.0.1 serving the routes the SDK calls for
what :class:`providers.e2b_provider.E2BProvider` does, with the JSON shapes of the SDK's own
models (``e2b/api/client/models``). Each sandbox it creates is added to an
:class:`~tests.providers.envd_standin.EnvdStandIn` under its id (``E2B_SANDBOX_URL`` points
the SDK there), so commands and files work.

What it imitates of E2B:

* every request needs the API key in ``X-API-KEY`` (401 otherwise);
* ``GET /v2/sandboxes`` filters by ``metadata`` (URL-encoded ``key=value`` pairs, themselves
  URL-encoded as one query parameter; all must match) and ``state`` (comma-separated; default
  running and paused), and pages: ``limit`` (1..:attr:`ControlPlaneStandIn.page_size`) and an
  opaque ``nextToken``, the next page's token in the ``x-next-token`` response header;
* a sandbox lives until its end time (start + ``timeout``); a running one past it is killed.
  ``connect`` resumes a paused sandbox and never shortens the end time. Time is the host's
  plus :attr:`ControlPlaneStandIn.skew` (tests :meth:`~ControlPlaneStandIn.advance` it);
* ``pause`` stops the sandbox's processes (SIGSTOP) and makes envd unreachable (502), 409 when
  already paused; unknown or killed ids answer 404 on get, connect, pause and delete.

Not implemented: templates (any name is accepted), fork, snapshots, metrics, logs, network
and timeout updates, auto-pause and auto-resume; a sandbox's ``envVars`` are not applied to
its commands (the provider passes its variables with every command anyway).
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

from werkzeug.wrappers import Request, Response

from tests.providers.envd_standin import EnvdStandIn, LoopbackServing, signal_group

API_KEY = "e2b_standin_0123456789abcdef0123456789abcdef"
"""The key the stand-in accepts (a test value, never a real one)."""
ENVD_VERSION = "0.6.4"
"""Reported for every sandbox: at least every version the SDK gates a feature on."""
DEFAULT_TIMEOUT = 15
"""Seconds a sandbox lives when created without a timeout (E2B's default)."""


@dataclass
class ControlSandbox:
    id: str
    template: str
    metadata: dict[str, str]
    started_at: float
    end_at: float
    seq: int
    """Creation order: what pages are cut by."""
    state: str = "running"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _error(code: int, message: str) -> Response:
    return Response(
        json.dumps({"code": code, "message": message}), code, mimetype="application/json"
    )


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, mimetype="application/json")


class ControlPlaneStandIn(LoopbackServing):
    """The server: sandboxes by id, each served by ``envd`` while it exists."""

    def __init__(self, envd: EnvdStandIn) -> None:
        super().__init__()
        self.envd = envd
        self.sandboxes: dict[str, ControlSandbox] = {}
        self.page_size = 100
        """The largest (and default) page of ``GET /v2/sandboxes``, as E2B's 100."""
        self.skew = 0.0
        self.requests: list[tuple[str, str]] = []
        """``(method, path)`` of every authenticated request, in order."""
        self._seq = 0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() + self.skew

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for end times (sandboxes past theirs die at the next request)."""
        with self._lock:
            self.skew += seconds
            self._expire()

    def add(
        self, metadata: dict[str, str] | None = None, template: str = "base", timeout: int = 300
    ) -> ControlSandbox:
        """A running sandbox, as another client of the account would create it."""
        with self._lock:
            return self._create(template, metadata or {}, timeout)

    def _create(self, template: str, metadata: dict[str, str], timeout: int) -> ControlSandbox:
        self._seq += 1
        now = self.now()
        sandbox = ControlSandbox(
            id=f"i{secrets.token_hex(10)}",
            template=template,
            metadata=dict(metadata),
            started_at=now,
            end_at=now + timeout,
            seq=self._seq,
        )
        self.sandboxes[sandbox.id] = sandbox
        self.envd.add_sandbox(sandbox.id)
        return sandbox

    def _kill(self, sandbox_id: str) -> None:
        self.sandboxes.pop(sandbox_id)
        self.envd.kill(sandbox_id)

    def _expire(self) -> None:
        now = self.now()
        for sandbox in list(self.sandboxes.values()):
            if sandbox.state == "running" and sandbox.end_at <= now:
                self._kill(sandbox.id)

    def _freeze(self, sandbox_id: str, paused: bool) -> None:
        """A paused sandbox's processes stop and its envd does not answer; resuming undoes it."""
        envd_sandbox = self.envd.sandboxes[sandbox_id]
        envd_sandbox.alive = not paused
        with envd_sandbox.lock:
            procs = list(envd_sandbox.procs.values())
        for proc in procs:
            signal_group(proc.popen, signal.SIGSTOP if paused else signal.SIGCONT)

    # -- the API --------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        if request.headers.get("X-API-KEY") != API_KEY:
            response = _error(401, "Invalid API key")
        else:
            with self._lock:
                self.requests.append((request.method, request.path))
                self._expire()
                response = self._route(request)
        result: Iterable[bytes] = response(environ, start_response)
        return result

    def _route(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")
        if parts[0] == "v2":
            parts = parts[1:]
        match request.method, parts:
            case "POST", ["sandboxes"]:
                return self._post_sandbox(request.get_json(silent=True))
            case "GET", ["sandboxes"]:
                return self._list(request)
            case method, ["sandboxes", sandbox_id, *action]:
                sandbox = self.sandboxes.get(sandbox_id)
                if sandbox is None:
                    return _error(
                        404,
                        f"sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it",
                    )
                return self._one(method, sandbox, action, request)
        return _error(404, f"no route {request.method} {request.path}")

    def _post_sandbox(self, body: Any) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("templateID"), str):
            return _error(400, "templateID is required")
        metadata = body.get("metadata") or {}
        timeout = body.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(metadata, dict) or not isinstance(timeout, int) or timeout < 0:
            return _error(400, "invalid metadata or timeout")
        sandbox = self._create(body["templateID"], metadata, timeout)
        return _json(self._created(sandbox), 201)

    def _one(
        self, method: str, sandbox: ControlSandbox, action: list[str], request: Request
    ) -> Response:
        match method, action:
            case "GET", []:
                return _json({**self._listed(sandbox), "domain": None})
            case "DELETE", []:
                self._kill(sandbox.id)
                return Response(status=204)
            case "POST", ["pause"]:
                if sandbox.state == "paused":
                    return _error(409, f"sandbox {sandbox.id} is already paused")
                sandbox.state = "paused"
                self._freeze(sandbox.id, paused=True)
                return Response(status=204)
            case "POST", ["connect"]:
                body = request.get_json(silent=True) or {}
                timeout = body.get("timeout", DEFAULT_TIMEOUT)
                resumed = sandbox.state == "paused"
                if resumed:
                    sandbox.state = "running"
                    self._freeze(sandbox.id, paused=False)
                sandbox.end_at = max(sandbox.end_at, self.now() + timeout)
                return _json(self._created(sandbox), 201 if resumed else 200)
        return _error(404, f"no route {method} {request.path}")

    def _list(self, request: Request) -> Response:
        wanted: dict[str, str] = {}
        for key, value in parse_qsl(request.args.get("metadata", ""), keep_blank_values=True):
            wanted[unquote(key)] = unquote(value)
        states = set(request.args.get("state", "running,paused").split(","))
        if not states <= {"running", "paused"}:
            return _error(400, f"invalid state {request.args['state']!r}")
        try:
            limit = int(request.args.get("limit", self.page_size))
            after = int(base64.urlsafe_b64decode(request.args.get("nextToken", "MA==")))
        except ValueError:
            return _error(400, "invalid limit or nextToken")
        if not 1 <= limit <= self.page_size:
            return _error(400, f"limit must be between 1 and {self.page_size}")
        matching = sorted(
            (
                s
                for s in self.sandboxes.values()
                if s.seq > after
                and s.state in states
                and all(s.metadata.get(k) == v for k, v in wanted.items())
            ),
            key=lambda s: s.seq,
        )
        page = matching[:limit]
        response = _json([self._listed(s) for s in page])
        if len(matching) > limit:
            response.headers["x-next-token"] = base64.urlsafe_b64encode(
                str(page[-1].seq).encode()
            ).decode()
        return response

    # -- the SDK's models -----------------------------------------------------------------------

    def _created(self, sandbox: ControlSandbox) -> dict[str, Any]:
        """A ``Sandbox`` (what create and connect answer)."""
        return {
            "templateID": sandbox.template,
            "sandboxID": sandbox.id,
            "clientID": "standin",
            "envdVersion": ENVD_VERSION,
            "domain": None,
        }

    def _listed(self, sandbox: ControlSandbox) -> dict[str, Any]:
        """A ``ListedSandbox`` (also the required part of a ``SandboxDetail``)."""
        return {
            "templateID": sandbox.template,
            "sandboxID": sandbox.id,
            "clientID": "standin",
            "startedAt": _iso(sandbox.started_at),
            "endAt": _iso(sandbox.end_at),
            "cpuCount": 2,
            "memoryMB": 512,
            "diskSizeMB": 1024,
            "state": sandbox.state,
            "envdVersion": ENVD_VERSION,
            "metadata": sandbox.metadata,
        }

    # -- the server -----------------------------------------------------------------------------

    def start(self) -> ControlPlaneStandIn:
        self.serve("e2b-control-standin")
        return self

    def stop(self) -> None:
        self.stop_serving()
