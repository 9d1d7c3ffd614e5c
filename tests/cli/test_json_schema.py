"""Every ``--json`` document matches the hand-written JSON Schema of its ``kind``
(``docs/schema/<kind>.json``), run through the real CLI; every command that takes ``--json``
is driven here and every schema is used, so a new command without a schema fails."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from cli.main import cli as root_command
from tests.conftest import NARRATIVE, Cli, isolate
from tests.gateway.hub.hub_support import serve, wait_for_output
from tests.providers.docker_support import docker_reachable

SCHEMAS = Path(__file__).parents[2] / "docs" / "schema"
#: Schema files that describe no command's output kind by themselves.
SHARED = {"error", "defs"}
#: Commands that need a Docker engine, and the kind they print.
NEEDS_DOCKER = {"env image build": "image"}

pytestmark = pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else []


def _schemas() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}


def _registry() -> Registry:
    resources = [(s["$id"], Resource.from_contents(s)) for s in _schemas().values()]
    return Registry().with_resources(resources)


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_schemas()[name], registry=_registry())


def _json_commands(group: click.Group = root_command, prefix: str = "") -> list[str]:
    """The path of every command that takes ``--json`` (``run list``, ``env create`` ...)."""
    found = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found += _json_commands(command, path + " ")
        elif any("--json" in p.opts for p in command.params):
            found.append(path)
    return found


def _command_path(args: tuple[str, ...]) -> str:
    group: click.Command = root_command
    path = []
    for arg in args:
        if not isinstance(group, click.Group) or arg not in group.commands:
            break
        path.append(arg)
        group = group.commands[arg]
    return " ".join(path)


class Recorder:
    """Runs commands with ``--json`` and keeps each document under its command's path."""

    def __init__(self) -> None:
        self.documents: dict[str, list[dict[str, Any]]] = {}

    def keep(self, args: tuple[str, ...], stdout: str) -> dict[str, Any]:
        doc = json.loads(stdout)
        assert isinstance(doc, dict), (args, doc)
        self.documents.setdefault(_command_path(args), []).append(doc)
        return doc

    def json(self, cli: Cli, *args: str, check: bool = True, **kwargs: Any) -> dict[str, Any]:
        before = args.index("--") if "--" in args else len(args)
        full = (*args[:before], "--json", *args[before:])
        proc = cli.run(*full, check=False, **kwargs)
        assert proc.returncode == 0 or not check, (args, proc.stdout, proc.stderr)
        return self.keep(args, proc.stdout)


def _scenario(tmp: Path) -> dict[str, list[dict[str, Any]]]:
    ws = tmp / "ws"
    ws.mkdir()
    (ws / "README.md").write_text("# demo\n")
    (ws / "notes.txt").write_text("one\n")
    cli, rec = Cli(ws), Recorder()
    j = rec.json

    # store and snapshots
    j(cli, "init")
    j(cli, "info")
    first = j(cli, "snapshot", "-m", "first")
    (ws / "notes.txt").write_text("two\n")
    second = j(cli, "snapshot", "-m", "second")
    j(cli, "status")
    j(cli, "log")
    j(cli, "show", first["id"])
    j(cli, "diff", first["id"], second["id"])
    j(cli, "restore", first["id"], "--to", str(tmp / "copy"))
    j(cli, "restore", second["id"])
    j(cli, "config")
    j(cli, "config", "max_file_size", "50M")
    j(cli, "fsck")
    # hierarchy
    objective = j(cli, "objective", "create", "ship it")
    j(cli, "objective", "list")
    j(cli, "objective", "show", objective["id"])
    j(cli, "objective", "set-status", objective["id"], "done")
    j(cli, "thread", "create", "side", "--from", first["id"])
    j(cli, "thread", "list")
    j(cli, "thread", "show", "main")
    j(cli, "thread", "reset", "main", first["id"], "--force")
    j(cli, "thread", "reset", "main", "main@{1}", "--force")
    manual = j(cli, "run", "start", "--manual")
    j(cli, "run", "finish", manual["id"])
    j(cli, "run", "list")
    # environments and isolated runs
    j(cli, "env", "create", "box", "--no-start")
    j(cli, "env", "start", "box")
    j(cli, "env", "create", "other")
    j(cli, "env", "list")
    j(cli, "env", "exec", "box", "--", "true")
    j(cli, "env", "logs", "box")
    j(cli, "env", "health")
    direct = j(cli, "run", "start", "--env", "box", "--direct", "--", "sh", "-c", "echo x > x.txt")
    j(cli, "run", "show", direct["id"])
    j(cli, "diff", direct["id"])
    j(cli, "run", "start", "--env", "box", "--", "true")
    j(cli, "run", "start", "--env", "box", "--env", "other", "--", "true")
    j(cli, "merge", direct["id"], "--no-commit")
    j(cli, "merge")
    j(cli, "merge", "--abort")
    j(cli, "merge", direct["id"], "--no-commit")
    j(cli, "merge", "--continue")
    j(cli, "merge", direct["id"])
    j(cli, "env", "show", "box")
    j(cli, "env", "stop", "box")
    j(cli, "env", "restart", "box")
    # stopping and killing a run the hub drives
    (ws / "patient.sh").write_text("echo started\nwhile true; do sleep 0.1; done\n")
    with serve(cli, ws) as ready:
        rec.keep(("serve",), json.dumps(ready))
        for action in ("stop", "kill"):
            starter = subprocess.Popen(
                [NARRATIVE, "run", "start", "--env", "box", "--json", "--", "sh", "patient.sh"],
                cwd=ws,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            j(cli, "run", action, wait_for_output(ws, "started"))
            starter.communicate(timeout=60)
        # a team hub: a developer with their own home logs in and runs there
        dev_ws, home = tmp / "dev", tmp / "dev-home"
        dev_ws.mkdir()
        dev = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "c"), "XDG_DATA_HOME": str(home)}
        Cli(dev_ws).run("init", env=dev)
        code = j(cli, "hub", "invite", "dev")["code"]
        j(Cli(dev_ws), "hub", "login", ready["url"], code, env=dev)
        j(Cli(dev_ws), "run", "start", "--hub", "default", "--env", "box", "--", "true", env=dev)
        j(Cli(dev_ws), "run", "list", "--hub", "default", env=dev)
        j(cli, "hub", "users")
        j(Cli(dev_ws), "hub", "logout", env=dev)
        j(cli, "hub", "revoke", "dev")
        j(cli, "hub", "audit")
        j(cli, "hub", "ui")
    j(cli, "env", "delete", "other")
    j(cli, "env", "sweep")
    if docker_reachable():  # else the command's check skips, or fails where Docker is required
        j(cli, "env", "image", "build", "--tag", "narrative-host-schema:1")
    j(cli, "gc", "--keep-last", "50", "--dry-run")
    # transfer
    remote = tmp / "remote"
    remote.mkdir()
    j(cli, "export", str(tmp / "all.bundle"))
    j(cli, "import", str(tmp / "all.bundle"))
    j(cli, "remote", "add", "origin", str(remote))
    j(cli, "remote", "add", "spare", str(tmp / "spare"))
    j(cli, "remote", "list")
    j(cli, "remote", "remove", "spare")
    j(cli, "push", "origin")
    j(cli, "fetch", "origin")
    j(cli, "pull", "origin")
    # gateway
    j(cli, "gateway", "routes")
    j(cli, "gateway", "routes", "fs", "readFile")
    token = j(cli, "gateway", "token", "--run", "r", "--env", "agent")["token"]
    server = subprocess.Popen(
        [NARRATIVE, "gateway", "serve", "--port", "0", "--json", "--env", "gw"],
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = rec.keep(("gateway", "serve"), server.stdout.readline())["url"]
        call = ("gateway", "call", "fs", "readFile", "--payload", '{"path": "README.md"}')
        j(cli, *call, "--url", url, env={"NARRATIVE_TOKEN": token})
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    # errors: one envelope for a narrative error and for a usage error
    failed = cli.run("show", "no-such-snapshot", "--json", check=False)
    usage = cli.run("log", "--no-such-option", "--json", check=False)
    assert (failed.returncode, usage.returncode) == (1, 2)
    rec.documents["(error)"] = [json.loads(failed.stdout), json.loads(usage.stdout)]
    return rec.documents


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Any]]]:
    """The documents of one scenario that drives every ``--json`` command, by command path."""
    with pytest.MonkeyPatch.context() as patch:
        isolate(tmp_path_factory.mktemp("home"), patch)
        yield _scenario(tmp_path_factory.mktemp("scenario"))


def _objects(schema: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema that describes an object, with where it is."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            yield where, schema
        for key, value in schema.items():
            yield from _objects(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _objects(value, f"{where}/{i}")


@pytest.mark.parametrize("name", sorted(_schemas()))
def test_schema_is_strict(name: str) -> None:
    """A valid draft 2020-12 schema whose every object lists its required fields and allows no
    others (a free-form map says so with additionalProperties being a schema, never true)."""
    schema = _schemas()[name]
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/{name}.json")
    for where, sub in _objects(schema):
        if where.endswith("/$defs") or where.endswith("/properties"):
            continue  # a map of names to schemas, not an object schema
        assert "additionalProperties" in sub and sub["additionalProperties"] is not True, where
        if sub.get("properties"):
            assert sub["additionalProperties"] is False, where
            assert "required" in sub, where
    if name not in SHARED:
        assert schema["properties"]["kind"] == {"const": name}
        assert "kind" in schema["required"]


@pytest.mark.parametrize("command", _json_commands())
def test_output_matches_schema(documents: dict[str, list[dict[str, Any]]], command: str) -> None:
    """Each command's documents validate against the schema of their kind (and the command is
    driven by the scenario at all: a new ``--json`` command fails here until it is)."""
    if command in NEEDS_DOCKER and command not in documents:
        pytest.skip("no Docker engine reachable (NARRATIVE_REQUIRE_DOCKER=1 makes this fail)")
    assert command in documents, f"the scenario does not run '{command} --json'"
    for doc in documents[command]:
        kind = doc.get("kind")
        assert kind in _schemas(), f"'{command}' printed kind {kind!r}, which has no schema"
        errors = [e.message for e in _validator(kind).iter_errors(doc)]
        assert not errors, (command, errors, doc)


def test_errors_match_the_envelope(documents: dict[str, list[dict[str, Any]]]) -> None:
    for doc in documents["(error)"]:
        assert not list(_validator("error").iter_errors(doc)), doc


def test_every_schema_is_used(documents: dict[str, list[dict[str, Any]]]) -> None:
    printed = {doc["kind"] for docs in documents.values() for doc in docs if "kind" in doc}
    unreached = {kind for command, kind in NEEDS_DOCKER.items() if command not in documents}
    assert printed == set(_schemas()) - SHARED - unreached
    listed = (SCHEMAS / "README.md").read_text()
    assert all(f"`{kind}`" in listed for kind in printed), "docs/schema/README.md misses a kind"
