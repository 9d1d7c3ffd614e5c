"""CLI start-up stays light: the everyday read-only commands load none of the heavy libraries
that only some commands need (fsspec and asyncio for transfers and hubs, websockets, pydantic
for providers, rich for progress, dulwich and pygit2 for packs). bench/ measures the time;
this catches the import that would quietly add a tenth of a second to every command."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli

HEAVY = ("fsspec", "asyncio", "websockets", "pydantic", "rich", "dulwich", "pygit2", "s3fs")
#: What a store opens without (~3-8 ms each): logging is imported when something is logged,
#: the lock stamp's host name comes from os.uname(), the data directory from $XDG_DATA_HOME or
#: $HOME (platformdirs only in the unusual cases).
STORE_UNNEEDED = ("logging", "socket", "platformdirs")

_PROBE = """
import json, sys
sys.argv = ["narrative", *json.loads(sys.argv[1])]
from cli.main import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def _loaded_after(args: list[str], cwd: Path, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` are imported once ``narrative ARGS`` has run (in a fresh process)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=names), json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    loaded: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("args", [["info"], ["status"], ["log"], ["--help"]], ids=" ".join)
def test_everyday_commands_load_no_heavy_library(
    cli: Cli, workspace: Path, args: list[str]
) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("snapshot", "-m", "one")
    loaded = _loaded_after(args, workspace, HEAVY + STORE_UNNEEDED)
    assert loaded == [], f"narrative {' '.join(args)} imported {loaded}"


#: What a watched no-op snapshot does without: OpenSSL's hashlib (it hashes nothing), ISA-L (its
#: one read is a small commit), tempfile (no large file is stored), unicodedata (no odd name),
#: dataclasses (the snapshot path's records are plain classes: the decorator costs ~1 ms a class).
WATCHED_NO_OP_UNNEEDED = ("hashlib", "isal", "tempfile", "unicodedata", "ctypes", "dataclasses")


def test_a_snapshot_of_a_change_builds_no_dataclass(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("snapshot", "-m", "one")
    (workspace / "a.txt").write_text("b\n")
    loaded = _loaded_after(["snapshot", "-m", "two"], workspace, ("dataclasses",))
    assert loaded == [], "a snapshot imported dataclasses"


@pytest.mark.skipif(not os.path.isdir("/proc/sys/fs/inotify"), reason="no inotify")
def test_a_watched_no_op_snapshot_loads_only_what_it_needs(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    for base, _dirs, files in os.walk(workspace):  # none racy: every record trusted next time
        for name in files:
            os.utime(os.path.join(base, name), (1_000_000_000, 1_000_000_000))
    cli.run("watch", "--background")
    try:
        cli.run("snapshot", "-m", "full scan, records the journal mark")
        loaded = _loaded_after(["snapshot", "-m", "nothing"], workspace, WATCHED_NO_OP_UNNEEDED)
        assert loaded == [], f"a watched no-op snapshot imported {loaded}"
    finally:
        cli.run("watch", "--stop")


def _command_modules() -> tuple[str, ...]:
    import cli

    return tuple(
        f"cli.{info.name}"
        for info in pkgutil.iter_modules(cli.__path__)
        if info.name not in ("main", "__main__")  # the latter runs the command line
    )


@pytest.mark.parametrize("args", [["info"], ["status"], ["log"]], ids=" ".join)
def test_a_command_imports_its_own_command_module_only(
    cli: Cli, workspace: Path, args: list[str]
) -> None:
    """Commands load on demand: ``narrative info`` pays for no other command's module."""
    cli.run("init")
    loaded = _loaded_after(args, workspace, _command_modules())
    commands = [m for m in loaded if m.endswith("_commands")]
    assert commands == ["cli.core_commands"], f"narrative {args[0]} imported {commands}"


def test_the_command_map_names_every_command_and_its_module() -> None:
    """A command missing from :data:`cli.main.COMMAND_MODULES` (or under the wrong module)
    would be 'No such command'; every module of ``cli`` with COMMANDS is in the map, whole."""
    from cli.main import COMMAND_MODULES

    found = {}
    for name in _command_modules():
        for command in getattr(importlib.import_module(name), "COMMANDS", ()):
            found[command.name] = name.removeprefix("cli.")
    assert found == COMMAND_MODULES


#: What a runtime never needs at start-up (fifty pods at once on a fan-out each pay for it): the
#: team client (only a runtime that delegates its agent to another hub), fsspec and the archive
#: reader (a runtime takes bundles from a stream), the run driver and the merge code (a hub
#: with runs to adopt), the other commands' modules.
RUNTIME_NEVER = (
    "gateway.hub.team_client",
    "gateway.hub.runs",
    "gateway.hub.tools_node",
    "narrative.merge",
    "providers.hybrid",
    "fsspec",
    "transfer.verified",
    "transfer.archive_import",
    "tarfile",
    "zstandard",
    "cli.core_commands",
    "cli.env_commands",
    "cli.run_commands",
    "cli.transfer_commands",
)


def test_a_runtime_loads_nothing_it_does_not_need() -> None:
    """Every run starts a runtime in its environment: ``narrative runtime`` imports the hub
    commands' module, the runtime and what its start imports (adoption), and none of
    :data:`RUNTIME_NEVER`."""
    code = (
        "import sys; sys.argv = ['narrative', 'runtime', '--help']\n"
        "from cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "import json, gateway.hub.runtime, gateway.hub.adoption\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert {"cli.hub_commands", "gateway.hub.runtime"} <= loaded
    assert sorted(loaded & set(RUNTIME_NEVER)) == []


_MODEL_PROBE = """
import json
import gateway.hub.runtime, gateway.hub.adoption
from pydantic import BaseModel

def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)

builtin_factories = (list, dict, set, tuple)
print(json.dumps({
    "docstrings": sorted({f"{c.__module__}.{c.__qualname__}" for c in subclasses(BaseModel)
                          if c.model_config.get("use_attribute_docstrings")}),
    "builtin_factories": sorted({f"{c.__module__}.{c.__qualname__}.{n}"
                                 for c in subclasses(BaseModel) if c.__module__ != "pydantic.main"
                                 for n, f in c.model_fields.items()
                                 if f.default_factory in builtin_factories}),
}))
"""


def test_the_runtimes_models_are_cheap_to_build() -> None:
    """No pydantic model a runtime loads has pydantic read source at import: attribute
    docstrings (finding a class's source scans every loaded module) or a builtin
    default_factory (its signature is read through inspect, compiling tokenize's regex)."""
    done = subprocess.run(
        [sys.executable, "-c", _MODEL_PROBE], capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    assert found == {"docstrings": [], "builtin_factories": []}
