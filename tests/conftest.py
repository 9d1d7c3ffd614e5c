"""Shared fixtures: isolated HOME and git config, workspaces, stores, and CLI runners."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import is_hypothesis_test, settings

from narrative.store import Store
from providers.gitoracle import git_tree_of  # noqa: F401  (the tests import it from here)
from tests.properties import PROFILE

settings.load_profile(PROFILE)

NARRATIVE = str(Path(sys.executable).with_name("narrative"))


@pytest.fixture(scope="session", autouse=True)
def isolated_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same isolation for fixtures wider than one test, set up before them: a
    module-scoped store used to land in the developer's own data directory."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(tmp_path_factory.mktemp("session-home"), monkeypatch)
        yield


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's HOME, data directory, git config or store variables; no
    two tests share a data directory (where stores live by default)."""
    isolate(tmp_path_factory.mktemp("home"), monkeypatch)


def isolate(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point HOME, the data directory and git's configuration into ``home`` (also for fixtures
    wider than one test, which the function-scoped ``isolated_env`` cannot serve)."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.invalid")
    for var in ("NARRATIVE_STORE", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)


def git(
    *args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None, check: bool = True
) -> str:
    """Run stock git (the oracle) and return stdout."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def store_dir_of(workspace: Path) -> Path:
    """The store directory of ``workspace`` (found through its marker, as the CLI finds it)."""
    from narrative.store import discover_store

    found = discover_store(str(workspace))
    assert found is not None, f"no store for {workspace}"
    return Path(found)


def call_in_own_process(function: str, *args: Any) -> Any:
    """Call `module:function(*args)` in a fresh interpreter and return its JSON result.

    Memory tests need this: tracemalloc counts every thread of the process, and earlier tests
    leave some running (the in-process moto server, hub loops) whose allocations would count."""
    module, name = function.split(":")
    script = (
        "import importlib, json, sys\n"
        f"fn = getattr(importlib.import_module({module!r}), {name!r})\n"
        "print(json.dumps(fn(*json.loads(sys.argv[1]))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(args))],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kill_after(args: list[str], cwd: Path, delay: float) -> int:
    """Start ``narrative ARGS``, SIGKILL it after ``delay`` seconds; returns its exit status
    (``-SIGKILL`` when the kill interrupted it)."""
    import signal

    proc = subprocess.Popen(
        [NARRATIVE, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return proc.wait(timeout=delay)  # done before its kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


class Killer:
    """SIGKILLs commands at random moments within how long they take on this machine.

    A fixed range of delays lets a fast machine finish most commands before their kill, and a
    test guarding that its kills interrupted real work then fails for no fault of the code. The
    delay is drawn as a fraction (``low``..``high``) of the expected duration, which starts at
    ``guess`` seconds and becomes the duration of the last command that finished before its
    kill."""

    def __init__(
        self, rng: random.Random, guess: float, low: float = 0.05, high: float = 0.9
    ) -> None:
        self.rng = rng
        self.expected = guess
        self.low, self.high = low, high

    def kill(self, args: list[str], cwd: Path) -> int:
        """Start ``narrative ARGS`` and SIGKILL it; its exit status (``-SIGKILL`` when the kill
        interrupted it)."""
        import signal
        import time

        start = time.monotonic()
        status = kill_after(args, cwd, self.rng.uniform(self.low, self.high) * self.expected)
        if status != -signal.SIGKILL:
            self.expected = time.monotonic() - start  # done before its kill: aim within that
        return status


class Cli:
    """Runs the real ``narrative`` executable in a workspace."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def run(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [NARRATIVE, *args],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"narrative {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
            )
        return proc

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.run(*args, "--json", **kwargs).stdout)

    def items(self, *args: str, **kwargs: Any) -> list[Any]:
        """The items of a list command's ``--json`` document (``{"kind": "..._list",
        "items": [...]}``)."""
        doc = self.json(*args, **kwargs)
        assert doc["kind"].endswith("_list"), doc
        return list(doc["items"])


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README.md").write_text("# demo\n")
    (ws / "src").mkdir()
    (ws / "src" / "app.py").write_text("print('hello')\n")
    return ws


@pytest.fixture
def store(workspace: Path) -> Iterator[Store]:
    yield Store.init(str(workspace))


@pytest.fixture
def cli(workspace: Path) -> Cli:
    return Cli(workspace)


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its content (symlinks as their target), for equality."""
    out: dict[str, bytes] = {}
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = b"link:" + os.readlink(full).encode()
            else:
                with open(full, "rb") as f:
                    out[rel] = f.read() + b"|mode:" + oct(os.stat(full).st_mode & 0o777).encode()
    return out


def two_machines(
    tmp_path: Path, names: tuple[str, str] = ("alice", "bob")
) -> tuple[Path, Cli, Cli]:
    """A remote directory and two empty workspaces (not yet initialised) with their CLIs: the
    two-machine setup of the transfer tests."""
    remote = tmp_path / "remote"
    remote.mkdir()
    clis = []
    for name in names:
        ws = tmp_path / name
        ws.mkdir()
        clis.append(Cli(ws))
    return remote, clis[0], clis[1]


#: fixtures shared across folders (the Docker engine and test image)
pytest_plugins = ["tests.providers.fixtures"]


def start_watcher(store_dir: str, workspace: str) -> subprocess.Popen[bytes]:
    """A real ``narrative watch`` on ``workspace``, returned once its watches are in place."""
    import time

    from narrative.watch import watcher_pid

    proc = subprocess.Popen(
        [NARRATIVE, "--store", store_dir, "watch"],
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while watcher_pid(store_dir, workspace) != proc.pid:
        if proc.poll() is not None:
            raise AssertionError(f"narrative watch exited: {proc.communicate()[1].decode()}")
        assert time.monotonic() < deadline, "the watcher did not get ready"
        time.sleep(0.01)
    return proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every property test (``@given``, or a state machine's case) ``property``: ``make
    soak`` runs them all with the ``soak`` profile, however many are added later."""
    for item in items:
        if is_hypothesis_test(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.property)
