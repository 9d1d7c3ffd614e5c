"""Shared pieces of the hub tests: agents, routing rules, a background ``narrative serve``, and
readers of run event logs and snapshots."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

from gateway.hub.agent_output import output_bytes
from gateway.hub.events import RunEventLog
from narrative.history import resolve_snapshot
from narrative.store import Store
from providers.manager import EnvironmentManager
from tests.conftest import NARRATIVE, Cli, store_dir_of, tree_bytes

#: An agent that talks to its runtime through gateway.client (env set by the runtime).
AGENT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from gateway.client import GatewayClient

    async def main():
        url, token = os.environ["NARRATIVE_GATEWAY_URL"], os.environ["NARRATIVE_GATEWAY_TOKEN"]
        async with GatewayClient(url, token) as client:
            readme = await client.call("fs", "readFile", {"path": "README.md"})
            ran = await client.call("exec", "run", {"argv": ["sh", "-c", "echo local; pwd"]})
            with open("progress.txt", "w") as f:
                f.write("half way\\n")  # so a snapshot taken now differs from the base
            extra = {}
            for spec in sys.argv[1:]:
                kind, action = spec.split(":")
                extra[spec] = await client.call(kind, action, {"prompt": "2+2"})
        with open("agent-result.json", "w") as f:
            json.dump({"readme": readme["content"], "exec": ran, "extra": extra}, f)
        print("agent done", flush=True)

    asyncio.run(main())
    """
)

#: Routing rules the agent's environment uses: files from the hub, commands where it runs.
ROUTING = {
    "rules": {
        "fs": {"mode": "proxy", "environment": "hub"},
        "exec": {"mode": "local"},
        "inference": {"mode": "proxy", "environment": "hub"},
    }
}

#: A handler plugin only the hub serves.
PLUGIN = textwrap.dedent(
    """
    async def complete(ctx, payload):
        return {"completion": "4", "servedBy": ctx.environment_id, "prompt": payload["prompt"]}

    def register(registry):
        registry.register("inference", "complete", complete)
    """
)


def start(cli: Cli, *args: str, env: dict[str, str] | None = None) -> Any:
    """``narrative run start --json ARGS`` (``--json`` before the command's ``--``): the run,
    or the list of runs of a fan-out."""
    doc = json.loads(cli.run("run", "start", "--json", *args, env=env).stdout)
    return doc["items"] if doc["kind"] == "run_result_list" else doc


def events(store_dir: Path, run_id: str) -> list[dict[str, Any]]:
    return RunEventLog(Store.open(str(store_dir)), run_id).read()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def user_files(ws: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(ws).items() if not k.startswith(".narrative")}


def file(store: Store, snapshot: str, path: str) -> str:
    repo = store.odb.repo()
    tree = repo[resolve_snapshot(store, snapshot).tree]
    return str(repo[tree[path].id].data.decode())


def wait_for_output(workspace: Path, text: str, timeout: float = 60) -> str:
    store = Store.open(str(store_dir_of(workspace)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in store.meta.all("runs"):
            if run["status"] != "running":
                continue
            for event in RunEventLog(store, run["id"]).read():
                if event["type"] == "agent.output" and text.encode() in output_bytes(event):
                    return str(run["id"])
        time.sleep(0.05)
    raise AssertionError(f"no running run printed {text!r}")


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class serve:
    """``narrative serve`` in the background for the duration of a with block."""

    def __init__(self, cli: Cli, workspace: Path, *args: str, env: dict[str, str] | None = None):
        self.cmd = [NARRATIVE, "serve", "--port", "0", "--json", *args]
        self.workspace = workspace
        self.env = {**os.environ, **(env or {})}

    def __enter__(self) -> dict[str, Any]:
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.workspace, env=self.env, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "narrative serve exited before announcing itself"
        return dict(json.loads(line))

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def output(events: list[dict[str, Any]], stream: str | None = None) -> str:
    """What the agent wrote (to ``stream``, or to both), decoded as UTF-8."""
    return output_raw(events, stream).decode()


def output_raw(events: list[dict[str, Any]], stream: str | None = None) -> bytes:
    return b"".join(
        output_bytes(e)
        for e in events
        if e["type"] == "agent.output" and stream in (None, e.get("stream"))
    )


def counting_agent(n: int, pause: float) -> list[str]:
    return ["sh", "-c", f"for i in $(seq 1 {n}); do echo line-$i; sleep {pause}; done"]


def routes(store_dir: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """The ``call.routed`` events of a run, by call name."""
    return {e["call"]: e for e in events(store_dir, run_id) if e["type"] == "call.routed"}


#: A ``runtime`` command that fails at once, saying why on stderr (the literal text
#: ``boom-marker`` is in its output only, not in its command line).
FAILING_RUNTIME = ["sh", "-c", "printf 'boom-%s\\n' marker >&2; exit 3"]


def check_failing_runtime(cli: Cli, workspace: Path, env: str) -> None:
    """A run in ``env``, whose runtime is :data:`FAILING_RUNTIME`: the run fails, and what the
    runtime printed reaches the user through ``run start``, the event log, ``run show`` and
    ``env logs --runtime`` (exactly once in the host's runtime.log, however often asked)."""
    proc = cli.run("run", "start", "--env", env, "--json", "--", "true", check=False)
    assert proc.returncode == 1, proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "failed"
    assert "| boom-marker" in proc.stderr
    history = events(store_dir_of(workspace), run["id"])
    kinds = types(history)
    assert "exited before connecting" in history[kinds.index("run.error")]["reason"]
    logged = history[kinds.index("runtime.log")]
    assert logged["lines"] == ["boom-marker"] and logged["handle"]
    assert kinds.index("runtime.log") < kinds.index("run.finished")
    assert "| boom-marker" in cli.run("run", "show", run["id"]).stdout
    # on the host already: written there, or copied when the runtime was retired
    store = Store.open(str(store_dir_of(workspace)))
    host_log = EnvironmentManager(store).logs.runtime_path(env)
    with open(host_log) as f:
        assert f.read().count("boom-marker") == 1
    for _ in range(2):
        lines = cli.items("env", "logs", env, "--runtime")
        assert lines[-1] == "boom-marker" and "\n".join(lines).count("boom-marker") == 1
    assert cli.run("env", "logs", env, "--runtime", "--tail", "1").stdout == "boom-marker\n"
    assert "boom-marker" not in "\n".join(cli.items("env", "logs", env))  # the lifecycle log


#: An agent that dials ``127.0.0.1:<port>`` (its first argument) and writes what it got, or
#: why it got nothing, to ``probe.txt`` in its workspace (so the result snapshot carries it).
LOOPBACK_PROBE = textwrap.dedent(
    """
    import socket, sys
    try:
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as conn:
            got = conn.recv(64).decode()
    except OSError as exc:
        got = f"unreachable: {exc}"
    with open("probe.txt", "w") as f:
        f.write(got)
    """
)


class LoopbackServer:
    """A TCP server on the host's ``127.0.0.1`` that greets every connection with
    :attr:`SECRET` and counts them: what an agent must not reach without a network."""

    SECRET = "LOOPBACK-SECRET"

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            with conn:
                conn.sendall(self.SECRET.encode())

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import socket

        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def check_loopback_isolation(cli: Cli, workspace: Path, isolated: str, control: str) -> Any:
    """Run :data:`LOOPBACK_PROBE` in environment ``isolated`` (no network) and ``control``
    (with one) against a :class:`LoopbackServer`: the first reaches nothing and its run still
    succeeds through the hub, the second reads the server's secret. Returns the isolated run's
    ``runtime.spawned`` event (how its runtime dialled the hub)."""
    import sys

    (workspace / "probe.py").write_text(LOOPBACK_PROBE)
    cli.run("snapshot", "-m", "probe")
    store = Store.open(str(store_dir_of(workspace)))
    with LoopbackServer() as server:
        port = str(server.port)
        run = start(cli, "--env", isolated, "--", sys.executable, "probe.py", port)
        assert run["status"] == "succeeded", run
        probe = file(store, run["result_snapshot"], "probe.txt")
        assert probe.startswith("unreachable") and server.connections == 0, probe
        history = events(store_dir_of(workspace), run["id"])
        spawned = history[types(history).index("runtime.spawned")]
        reached = start(cli, "--env", control, "--", sys.executable, "probe.py", port)
        assert reached["status"] == "succeeded", reached
        assert file(store, reached["result_snapshot"], "probe.txt") == LoopbackServer.SECRET
        assert server.connections == 1
    return spawned
