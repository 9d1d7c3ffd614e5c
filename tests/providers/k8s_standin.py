"""A small stand-in for the Kubernetes API server and a test kubelet, for the ``k8s`` tests.

``kmock`` (checked first, as issue 17 asks) serves object CRUD, ``watch=true`` streams and merge
patches of ``/status``, but not label or field selectors, ``pods/exec``, graceful pod deletion
or the garbage collection of ``ownerReferences`` dependents, all of which the provider relies
on; so the tests run against this stand-in instead: a real HTTP server (aiohttp, in a thread)
speaking the part of the API the provider uses, through the official client, unmodified:

* create (every object validated against the Kubernetes schema with ``kubernetes-validate``,
  strict: an unknown field is refused), read, list and watch with ``labelSelector`` (equality)
  and ``fieldSelector=metadata.name=...``, JSON merge patch (``/status`` too), delete: a pod a
  kubelet runs gets a ``deletionTimestamp`` and is removed once the kubelet stopped it; other
  objects are removed at once, their dependents (``ownerReferences``) after them;
* ``pods/{name}/exec`` over a WebSocket (``v5.channel.k8s.io``: stdin closed by a close frame),
  run as a ``docker exec`` in the pod's container.

:class:`TestKubelet` watches pods through the official client and runs each as a container on
the private Docker engine (never pulling: a missing image is ``ErrImageNeverPull``), reporting
the pod's status back; volumes are host directories (a claim's survives its pods), a Secret
volume is projected and kept up to date from a watch. It enforces no NetworkPolicy and uses the
host's network namespace (loopback only, where the test hub listens). Nothing here is shipped.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import functools
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
from aiohttp import WSMsgType, web

SCHEMA_VERSION = "1.37.0"
_KINDS = {
    "pods": "Pod",
    "secrets": "Secret",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "networkpolicies": "NetworkPolicy",
}


@functools.cache
def _schema_validator(kind: str, api_version: str) -> Any:
    """The validator ``kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)`` builds,
    built once per kind: that function reads and parses the schema files on every call (~15
    ms), which made this stand-in, not the client under test, the bottleneck of fifty creates
    (a real API server validates in well under a millisecond)."""
    import referencing
    from kubernetes_validate.utils import schema_contents

    group = re.sub(
        r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version
    )  # networking.k8s.io/v1: networking-v1
    directory = f"kubernetes-json-schema/v{SCHEMA_VERSION}-local-strict"
    schema = schema_contents(f"{directory}/{kind.lower()}-{group}.json", SCHEMA_VERSION)
    definitions = schema_contents(f"{directory}/_definitions.json", SCHEMA_VERSION)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def _matches(obj: dict[str, Any], query: Any) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (query.get("labelSelector") or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, (query.get("fieldSelector") or "").split(",")):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
    return True


class StandinApiServer:
    """The API server stand-in; ``docker`` is a low-level Docker client for exec."""

    def __init__(self, docker: Any) -> None:
        self.docker = docker
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.kubelet_pods: set[str] = set()
        """Uids of the pods a kubelet runs (their deletion waits for it)."""
        self.containers: dict[str, str] = {}
        """Pod uid → its container id (set by the kubelet)."""
        self.created: list[dict[str, Any]] = []
        """Every object created, as sent (for schema assertions)."""
        self.exec_commands: list[list[str]] = []
        """The command line of every exec, in order."""
        self.requests: collections.Counter[str] = collections.Counter()
        """Requests served, by method and route (what a client's work costs the API server)."""
        self.exec_fails = False
        """Refuse every exec (500), as an overloaded API server might."""
        self._version = 0
        self._exec_sockets: dict[int, Any] = {}
        self._watch_tasks: set[asyncio.Task[Any]] = set()
        self._watchers: list[tuple[str, str, Any, asyncio.Queue[dict[str, Any]]]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="k8s-standin", daemon=True)

    # -- serving --------------------------------------------------------------------------------

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(30)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def shutdown() -> None:
            for task in list(self._watch_tasks):  # watches a client still holds open
                task.cancel()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def _serve(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        asyncio.set_event_loop(self.loop)
        self.loop.set_default_executor(ThreadPoolExecutor(64))

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            route = request.match_info.route.resource
            path = route.canonical if route else request.path
            plural = request.match_info.get("plural", "")
            self.requests[f"{request.method} {path.replace('{plural}', plural)}"] += 1
            return await handler(request)

        app = web.Application(client_max_size=1 << 30, middlewares=[count])
        for prefix in ("/api/v1", "/apis/networking.k8s.io/v1"):
            base = prefix + "/namespaces/{ns}/{plural}"
            app.router.add_route("GET", base, self.list_or_watch)
            app.router.add_route("POST", base, self.create)
            app.router.add_route("GET", base + "/{name}", self.read)
            app.router.add_route("PATCH", base + "/{name}", self.patch)
            app.router.add_route("PATCH", base + "/{name}/status", self.patch)
            app.router.add_route("DELETE", base + "/{name}", self.delete)
        app.router.add_route("GET", "/api/v1/namespaces/{ns}/pods/{name}/exec", self.exec)
        app.router.add_route("POST", "/api/v1/namespaces/{ns}/pods/{name}/exec", self.exec)
        runner = self._runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.SockSite(runner, self._listen())
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    def _listen(self) -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        return sock

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop (from another thread), returning its result."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    # -- events ---------------------------------------------------------------------------------

    def _emit(self, kind: str, plural: str, obj: dict[str, Any]) -> None:
        for w_plural, w_ns, query, queue in list(self._watchers):
            if w_plural == plural and w_ns == obj["metadata"]["namespace"] and _matches(obj, query):
                queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})

    def _bump(self, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    def remove(self, key: tuple[str, str, str]) -> None:
        """Remove an object for good, then its dependents (the garbage collector)."""
        obj = self.objects.pop(key, None)
        if obj is None:
            return
        self._bump(obj)
        self._emit("DELETED", key[0], obj)
        uid = obj["metadata"]["uid"]
        for other_key, other in list(self.objects.items()):
            owners = other["metadata"].get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                self._delete(other_key, None)

    def _delete(self, key: tuple[str, str, str], grace: int | None) -> dict[str, Any]:
        obj = self.objects[key]
        meta = obj["metadata"]
        graceful = key[0] == "pods" and meta["uid"] in self.kubelet_pods and grace != 0
        if not graceful:
            self.remove(key)
            return obj
        if not meta.get("deletionTimestamp"):
            default = obj["spec"].get("terminationGracePeriodSeconds", 30)
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = default if grace is None else grace
            self._bump(obj)
            self._emit("MODIFIED", key[0], obj)
        return obj

    # -- handlers -------------------------------------------------------------------------------

    @staticmethod
    def _key(request: web.Request, name: str | None = None) -> tuple[str, str, str]:
        info = request.match_info
        return info["plural"], info["ns"], name or info["name"]

    async def create(self, request: web.Request) -> web.Response:
        obj = await request.json()
        plural = request.match_info["plural"]
        if _KINDS.get(plural) != obj.get("kind"):
            return _status(400, "BadRequest", f"not a {plural} object")
        try:
            _schema_validator(obj["kind"], obj.get("apiVersion", "")).validate(obj)
        except jsonschema.ValidationError as exc:
            return _status(422, "Invalid", f"schema: {exc.message}")
        self.created.append(copy.deepcopy(obj))
        key = self._key(request, obj["metadata"]["name"])
        if key in self.objects:
            return _status(409, "AlreadyExists", f"{plural} {key[2]} already exists")
        meta = obj["metadata"]
        meta.update(namespace=key[1], uid=str(uuid.uuid4()), creationTimestamp=_now())
        if plural == "pods":
            obj["status"] = {"phase": "Pending"}
        self._bump(obj)
        self.objects[key] = obj
        self._emit("ADDED", plural, obj)
        return web.json_response(obj, status=201)

    async def read(self, request: web.Request) -> web.Response:
        obj = self.objects.get(self._key(request))
        if obj is None:
            return _status(404, "NotFound", f"{request.match_info['name']} not found")
        return web.json_response(obj)

    async def patch(self, request: web.Request) -> web.Response:
        key = self._key(request)
        obj = self.objects.get(key)
        if obj is None:
            return _status(404, "NotFound", f"{key[2]} not found")
        patch = await request.json()
        if not isinstance(patch, dict):
            return _status(415, "UnsupportedMediaType", "only merge patches are served")
        _merge(obj, patch)
        self._bump(obj)
        self._emit("MODIFIED", key[0], obj)
        return web.json_response(obj)

    async def delete(self, request: web.Request) -> web.Response:
        key = self._key(request)
        if key not in self.objects:
            return _status(404, "NotFound", f"{key[2]} not found")
        body = await request.json() if request.can_read_body else {}
        grace = (body or {}).get("gracePeriodSeconds", request.query.get("gracePeriodSeconds"))
        return web.json_response(self._delete(key, None if grace is None else int(grace)))

    async def list_or_watch(self, request: web.Request) -> web.StreamResponse:
        plural, ns = request.match_info["plural"], request.match_info["ns"]
        found = [
            o
            for (p, n, _), o in sorted(self.objects.items())
            if p == plural and n == ns and _matches(o, request.query)
        ]
        if request.query.get("watch") not in ("true", "1", "True"):
            meta = {"resourceVersion": str(self._version)}
            return web.json_response(
                {"kind": "List", "apiVersion": "v1", "metadata": meta, "items": found}
            )
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for obj in found:
            queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
        watcher = (plural, ns, request.query, queue)
        self._watchers.append(watcher)
        task = asyncio.current_task()
        assert task is not None
        self._watch_tasks.add(task)
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        end = self.loop.time() + timeout
        try:
            while (remaining := end - self.loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.remove(watcher)
            self._watch_tasks.discard(task)
        return response

    async def exec(self, request: web.Request) -> web.StreamResponse:
        pod = self.objects.get(("pods", request.match_info["ns"], request.match_info["name"]))
        container = self.containers.get(pod["metadata"]["uid"]) if pod else None
        if pod is None or container is None:
            return _status(404, "NotFound", f"pod {request.match_info['name']} not running")
        if self.exec_fails:
            return _status(500, "InternalError", "exec refused (a test asked for it)")
        command = request.query.getall("command")
        self.exec_commands.append(list(command))
        want_stdin = request.query.get("stdin", "").lower() == "true"
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        try:
            exec_id, raw = await loop.run_in_executor(
                None, self._docker_exec, container, command, want_stdin
            )
        except Exception as exc:  # the container is gone: the exec fails to start
            await ws.send_bytes(
                b"\x03"
                + json.dumps({"status": "Failure", "message": f"cannot exec: {exc}"}).encode()
            )
            await ws.close()
            return ws
        pump = loop.run_in_executor(None, self._pump, raw, ws, loop)
        reader = asyncio.ensure_future(self._stdin(ws, raw, loop))
        await pump
        code = await loop.run_in_executor(None, self._exit_code, exec_id)
        status: dict[str, Any] = {"status": "Success"}
        if code != 0:
            status = {
                "status": "Failure",
                "reason": "NonZeroExitCode",
                "message": f"command terminated with non-zero exit code {code}",
                "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
            }
        if not ws.closed:
            await ws.send_bytes(b"\x03" + json.dumps(status).encode())
            await ws.close()
        reader.cancel()
        self._exec_sockets.pop(id(raw)).close()
        raw.close()
        return ws

    def _docker_exec(self, container: str, command: list[str], stdin: bool) -> tuple[str, Any]:
        exec_id = self.docker.exec_create(
            container, command, stdin=stdin, stdout=True, stderr=True
        )["Id"]
        sock = self.docker.exec_start(exec_id, socket=True)
        raw = getattr(sock, "_sock", sock)
        raw.setblocking(True)
        if not stdin:
            raw.shutdown(socket.SHUT_WR)
        self._exec_sockets[id(raw)] = sock  # closed with the raw socket
        return exec_id, raw

    def _pump(self, raw: socket.socket, ws: web.WebSocketResponse, loop: Any) -> None:
        """Docker's multiplexed stream (8-byte headers) → channels 1 and 2."""

        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = raw.recv(n - len(data))
                if not chunk:
                    return b""
                data += chunk
            return data

        while True:
            header = read(8)
            if not header:
                return
            stream, size = header[0], struct.unpack(">I", header[4:])[0]
            payload = read(size)
            if not payload:
                return
            channel = 2 if stream == 2 else 1
            asyncio.run_coroutine_threadsafe(
                ws.send_bytes(bytes([channel]) + payload), loop
            ).result(60)

    async def _stdin(self, ws: web.WebSocketResponse, raw: socket.socket, loop: Any) -> None:
        async for message in ws:
            if message.type != WSMsgType.BINARY or not message.data:
                continue
            data = message.data
            if data[0] == 0:
                await loop.run_in_executor(None, raw.sendall, data[1:])
            elif data[0] == 255 and data[1:2] == b"\x00":
                await loop.run_in_executor(None, raw.shutdown, socket.SHUT_WR)

    def _exit_code(self, exec_id: str) -> int:
        for _ in range(200):
            info = self.docker.exec_inspect(exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            threading.Event().wait(0.02)
        return -1


class TestKubelet:
    """Runs the pods of the stand-in as containers on the private Docker engine."""

    __test__ = False  # not a pytest class

    def __init__(self, server: StandinApiServer, api_client: Any, docker: Any, label: str) -> None:
        from kubernetes import client

        self.server = server
        self.core = client.CoreV1Api(api_client)
        self.docker = docker
        self.label = label
        self.root = tempfile.mkdtemp(prefix="k8s-kubelet-")
        os.chmod(self.root, 0o755)
        self._stop = threading.Event()
        self._secret_dirs: dict[tuple[str, str], list[str]] = {}
        self._threads = [
            threading.Thread(target=self._loop, args=("pods",), daemon=True),
            threading.Thread(target=self._loop, args=("secrets",), daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.core.api_client.close()
        for container in list(self.server.containers.values()):
            self._remove_container(container)
        shutil.rmtree(self.root, ignore_errors=True)

    def _loop(self, plural: str) -> None:
        from kubernetes import watch

        lister = {
            "pods": self.core.list_namespaced_pod,
            "secrets": self.core.list_namespaced_secret,
        }[plural]
        while not self._stop.is_set():
            for event in watch.Watch().stream(lister, "default", timeout_seconds=1):
                obj = self.core.api_client.sanitize_for_serialization(event["object"])
                try:
                    if plural == "pods":
                        self._on_pod(event["type"], obj)
                    else:
                        self._on_secret(event["type"], obj)
                except Exception as exc:  # a test kubelet keeps going, as a real one does
                    print(f"test kubelet: {plural} {event['type']}: {exc!r}")

    # -- secrets --------------------------------------------------------------------------------

    def _project(self, directory: str, data: dict[str, str]) -> None:
        """Write a Secret's keys as files (readable by the pod's non-root user)."""
        present = set(os.listdir(directory))
        for key, value in data.items():
            tmp = os.path.join(directory, f".{key}.tmp")
            with open(tmp, "wb") as f:
                f.write(base64.b64decode(value))
            os.chmod(tmp, 0o444)
            os.replace(tmp, os.path.join(directory, key))
        for stale in present - set(data):
            os.unlink(os.path.join(directory, stale))

    def _on_secret(self, kind: str, secret: dict[str, Any]) -> None:
        key = (secret["metadata"]["namespace"], secret["metadata"]["name"])
        for directory in self._secret_dirs.get(key, []):
            if os.path.isdir(directory):
                self._project(directory, {} if kind == "DELETED" else secret.get("data") or {})

    # -- pods -----------------------------------------------------------------------------------

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if kind == "DELETED":
            container = self.server.containers.pop(uid, None)
            if container:
                self._remove_container(container)
            return
        if meta.get("deletionTimestamp"):
            container = self.server.containers.get(uid)
            if container:
                import docker.errors

                grace = int(meta.get("deletionGracePeriodSeconds") or 0)
                with contextlib.suppress(docker.errors.NotFound):  # removed behind our back
                    self.docker.stop(container, timeout=grace)
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0)
            return
        if uid in self.server.kubelet_pods:
            return
        self.server.kubelet_pods.add(uid)
        self._run(pod)

    def _volumes(self, pod: dict[str, Any]) -> dict[str, str]:
        meta = pod["metadata"]
        paths: dict[str, str] = {}
        for volume in pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                path = os.path.join(self.root, "claims", meta["namespace"], claim)
            else:
                path = os.path.join(self.root, "pods", meta["uid"], volume["name"])
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o777)
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                self._secret_dirs.setdefault((meta["namespace"], name), []).append(path)
                secret = self.server.objects.get(("secrets", meta["namespace"], name))
                self._project(path, (secret or {}).get("data") or {})
                os.chmod(path, 0o755)
            paths[volume["name"]] = path
        return paths

    def _run(self, pod: dict[str, Any]) -> None:
        import docker.errors

        from providers.docker.image import DEFAULT_IMAGE, host_runtime

        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        image = container["image"]
        try:
            self.docker.inspect_image(image)
        except docker.errors.ImageNotFound:
            waiting = {
                "reason": "ErrImageNeverPull",
                "message": f"image {image!r} is not present with pull policy Never",
            }
            self._status(pod, "Pending", waiting=waiting)
            return
        paths = self._volumes(pod)
        binds = [
            f"{paths[m['name']]}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"
            for m in container.get("volumeMounts") or []
        ]
        env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
        if image == DEFAULT_IMAGE:  # the offline skeleton image runs the host's /usr
            host = host_runtime()
            binds += [f"{m.source}:{m.target}:ro" for m in host.mounts]
            env = {**host.env, **env}
        security = container.get("securityContext") or {}
        dropped = (security.get("capabilities") or {}).get("drop", [])
        no_escalation = security.get("allowPrivilegeEscalation") is False
        user = security.get("runAsUser")
        group = security.get("runAsGroup", user)
        host_config = self.docker.create_host_config(
            binds=binds,
            network_mode="host",
            read_only=bool(security.get("readOnlyRootFilesystem")),
            cap_drop=["ALL"] if "ALL" in dropped else None,
            security_opt=["no-new-privileges"] if no_escalation else None,
            init=False,
        )
        created = self.docker.create_container(
            image,
            command=container.get("command"),
            working_dir=container.get("workingDir"),
            environment=env,
            user=f"{user}:{group}" if user is not None else None,
            labels={"narrative.owner": self.label, "k8s.pod": meta["name"]},
            host_config=host_config,
        )
        self.docker.start(created["Id"])
        self.server.containers[meta["uid"]] = created["Id"]
        self._status(pod, "Running")

    def _status(
        self, pod: dict[str, Any], phase: str, waiting: dict[str, str] | None = None
    ) -> None:
        state = {"waiting": waiting} if waiting else {"running": {"startedAt": _now()}}
        ready = "True" if phase == "Running" else "False"
        status = {
            "phase": phase,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": ready},
            ],
            "containerStatuses": [
                {
                    "name": "env",
                    "ready": ready == "True",
                    "state": state,
                    "image": pod["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "restartCount": 0,
                }
            ],
        }
        meta = pod["metadata"]
        self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})

    def _remove_container(self, container: str) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.APIError):
            self.docker.remove_container(container, force=True, v=True)


def write_kubeconfig(path: str, server: str) -> str:
    """A kubeconfig naming ``server`` (plain HTTP on loopback) as context ``standin``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": server}}],
        "users": [{"name": "standin", "user": {"token": "standin"}}],
        "contexts": [
            {
                "name": "standin",
                "context": {"cluster": "standin", "user": "standin", "namespace": "default"},
            }
        ],
        "current-context": "standin",
    }
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def standin_cluster(
    docker_api: Any, directory: str, label: str
) -> Iterator[tuple[str, StandinApiServer]]:
    """Serve the stand-in with a kubelet; yields a kubeconfig path for it and the server."""
    from kubernetes import config

    server = StandinApiServer(docker_api)
    url = server.start()
    kubeconfig = write_kubeconfig(os.path.join(directory, "kubeconfig"), url)
    kubelet = TestKubelet(
        server, config.new_client_from_config(config_file=kubeconfig), docker_api, label
    )
    kubelet.start()
    try:
        yield kubeconfig, server
    finally:
        kubelet.stop()
        server.stop()
