"""A provider from outside the project (``tests/sample_provider``) installs through the
``narrative.providers`` entry point and passes the contract suite; and the suite can fail:
providers that break one promise each are caught by the check for it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from narrative.models import Snapshot
from narrative.store import Store
from providers import registry
from providers.base import ExecResult, OutputFn, Signal
from providers.contract import (
    CHECKS,
    ContractTarget,
    check_delete,
    check_exec,
    check_labels_and_sweep,
    check_lifecycle,
    check_reconnect,
    check_restore_and_collect,
    check_spawn_signal_alive,
    check_stop_ends_processes,
)
from providers.directory_processes import kill_marked, marked_processes
from providers.manager import EnvironmentManager
from providers.proctree import environment_marker
from providers.worktree import WorktreeProvider
from tests.conftest import Cli
from tests.providers.contract_targets import sandbox_or_skip

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_provider"
REPO = str(Path(__file__).resolve().parents[2])


def install(project: Path, site: Path) -> None:
    """Install ``project`` into the ``site`` directory as pip lays out a pure-Python package:
    its package, and a dist-info whose ``entry_points.txt`` is written from its pyproject.toml
    (done here by hand: no build backend is installed offline)."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    meta = pyproject["project"]
    for package in pyproject["tool"]["setuptools"]["packages"]:
        shutil.copytree(project / package, site / package)
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    lines = []
    for group, entries in meta["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that has the sample provider installed."""
    sandbox_or_skip()
    site = tmp_path / "site"
    site.mkdir()
    install(SAMPLE, site)
    return {"PYTHONPATH": os.pathsep.join([str(site), REPO])}


def test_the_sample_provider_passes_the_contract(site: dict[str, str], tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from providers.contract import ContractTarget, run_contract\n"
        "from providers.registry import available, get_provider_class\n"
        "assert 'sample' in available(), available()\n"
        "print(get_provider_class('sample').__module__)\n"
        "run_contract(ContractTarget('sample'), Path(sys.argv[1]))\n"
        "print('contract kept')\n"
    )
    scratch = tmp_path / "scratch"
    done = subprocess.run(
        [sys.executable, "-c", script, str(scratch)],
        env={**os.environ, **site},
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["narrative_sample_provider", "contract kept"]
    assert sorted(p.name for p in scratch.iterdir()) == sorted(CHECKS)


def test_the_cli_creates_an_environment_of_the_sample_provider(
    site: dict[str, str], cli: Cli
) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "sample", env=site)
    shown = cli.run("env", "exec", "box", "--", "sh", "-c", "echo from-sample", env=site)
    assert shown.stdout == "from-sample\n"
    assert "sample" in cli.run("env", "show", "box", env=site).stdout
    cli.run("env", "delete", "box", env=site)


# -- the suite can fail: one broken promise each ------------------------------------------------


class DropsVariables(WorktreeProvider):
    """Runs commands without the variables it is given."""

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        return super().exec(resource_id, argv, timeout=timeout, on_output=on_output)


class RestoresTooMuch(WorktreeProvider):
    """Leaves a file of its own beside the snapshot it restores."""

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        super().restore(resource_id, snapshot)
        self.write_file(resource_id, "extra.txt", b"not in the snapshot")


class NeverDeletes(WorktreeProvider):
    """Keeps the resource when asked to delete it."""

    def delete(self, resource_id: str) -> None:
        return None


class ForgetsGone(WorktreeProvider):
    """Reconnects to anything, even a resource that is gone."""

    def reconnect(self, resource_id: str) -> None:
        return None


class SignalsTheLeaderOnly(WorktreeProvider):
    """Signals the spawned process but not its children."""

    def signal(self, resource_id: str, handle: str, sig: Signal) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(handle.split(":")[1]), signal.SIGKILL)


class StopsNothing(WorktreeProvider):
    """Leaves the environment's processes running when it is stopped."""

    def stop(self, resource_id: str) -> None:
        return None


class DeletesFilesOnly(WorktreeProvider):
    """Removes the checkout but leaves the environment's processes running."""

    def delete(self, resource_id: str) -> None:
        shutil.rmtree(resource_id, ignore_errors=True)


class ListsNothing(WorktreeProvider):
    """Cannot find its resources, so leaked ones are never swept."""

    def list_resources(self) -> list[str]:
        return []


class SweepsAsNobody(WorktreeProvider):
    """Cannot tell which environment a resource was made for, so a sweep deletes a leaked
    checkout as no environment and leaves its processes running."""

    def environment_of(self, resource_id: str) -> str | None:
        return None


BREACHES = [
    (DropsVariables, check_exec, "output"),
    (RestoresTooMuch, check_restore_and_collect, "differs from the snapshot"),
    (NeverDeletes, check_lifecycle, "outlived its delete"),
    (ForgetsGone, check_reconnect, "did not raise ResourceGone"),
    (SignalsTheLeaderOnly, check_spawn_signal_alive, "a child outlived term"),
    (StopsNothing, check_stop_ends_processes, "outlived the stop"),
    (DeletesFilesOnly, check_delete, "outlived the delete"),
    (ListsNothing, check_labels_and_sweep, "is not listed"),
    (SweepsAsNobody, check_labels_and_sweep, "outlived the sweep"),
]


@pytest.mark.parametrize(
    ("broken", "check", "breach"), BREACHES, ids=[cls.__name__ for cls, _, _ in BREACHES]
)
def test_each_check_catches_its_breach(
    broken: type[WorktreeProvider],
    check: Callable[[ContractTarget, Path], None],
    breach: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox_or_skip()
    name = f"broken-{broken.__name__.lower()}"
    # registered for this test only (as test_registry does), so no later pick finds it
    monkeypatch.setitem(registry._LOADED, name, broken)
    # unsandboxed: bwrap's pid namespace would end the children with their leader
    try:
        with pytest.raises(AssertionError, match=breach):
            check(ContractTarget(name, {"sandbox": "none"}), tmp_path)
    finally:
        left = _end_processes_of_stores_in(tmp_path)
    # the failed check deleted its environments, which ended their processes, unless the
    # breach is in how they end
    assert left == [] or check in (check_stop_ends_processes, check_delete), left
    # and the unbroken provider passes the same check
    check(ContractTarget("worktree"), tmp_path / "unbroken")
    assert _end_processes_of_stores_in(tmp_path / "unbroken") == []


def _end_processes_of_stores_in(scratch: Path) -> list[str]:
    """Kill what still runs in an environment of a store under ``scratch``; the environments
    it ran in."""
    left = []
    for workspace in scratch.glob("ws-*"):
        manager = EnvironmentManager(Store.open(workspace=str(workspace)))
        for record in manager.environments(include_archived=True):
            var, value = environment_marker(record.id)
            if marked_processes(value, var):
                left.append(record.name)
                kill_marked(var, value)
    return left
