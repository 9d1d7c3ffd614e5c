"""The provider registry: lazy imports, entry points, install hints, capability routing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from providers import registry
from providers.errors import MissingDependency, NoProviderAvailable, ProviderNotFound
from providers.worktree import WorktreeProvider


def test_builtins_are_listed_without_importing_them() -> None:
    for name in ("docker", "e2b"):
        registry._LOADED.pop(name, None)
    before = set(sys.modules)
    names = registry.available()
    assert {"local", "worktree", "docker", "e2b"} <= set(names)
    assert not {m for m in set(sys.modules) - before if m.startswith("providers.docker")}


def test_unknown_provider() -> None:
    with pytest.raises(ProviderNotFound, match=r"known: .*worktree"):
        registry.get_provider_class("nope")


@pytest.mark.parametrize(("provider", "module"), [("docker", "docker"), ("e2b", "e2b")])
def test_missing_optional_dependency_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, provider: str, module: str
) -> None:
    monkeypatch.delitem(registry._LOADED, provider, raising=False)
    # every module of the provider, so that importing it needs the SDK again
    for name in [m for m in sys.modules if m.startswith(f"providers.{provider}")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingDependency) as info:
        registry.get_provider_class(provider)
    assert f"pip install 'narrative-engine[{provider}]'" in str(info.value)


def test_entry_point_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party package registers a provider through ``narrative.providers``."""
    (tmp_path / "thirdparty_env.py").write_text(
        "from providers.worktree import WorktreeProvider\n"
        "class GpuBox(WorktreeProvider):\n"
        "    name = 'gpubox'\n"
        "    capabilities = WorktreeProvider.capabilities | {'gpu'}\n"
    )
    dist = tmp_path / "thirdparty_env-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-env\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[narrative.providers]\ngpubox = thirdparty_env:GpuBox\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(registry._LOADED, "gpubox", raising=False)
    assert "gpubox" in registry.available()
    cls = registry.get_provider_class("gpubox")
    assert issubclass(cls, WorktreeProvider) and cls.__name__ == "GpuBox"
    assert registry.pick_provider(["gpu", "python"]) == "gpubox"
    registry._LOADED.pop("gpubox")


def test_pick_prefers_the_worktree_and_explains_misses() -> None:
    assert registry.pick_provider([]) == "worktree"
    assert registry.pick_provider(["python", "git"]) == "worktree"
    with pytest.raises(NoProviderAvailable) as info:
        registry.pick_provider(["gpu", "python"], candidates=["worktree", "local"])
    assert info.value.missing == {"worktree": ["gpu"], "local": ["gpu"]}
    assert "worktree lacks gpu" in str(info.value)


def test_non_provider_target_is_refused() -> None:
    registry.register("bogus", "json:dumps")
    try:
        with pytest.raises(Exception, match="not a BaseProvider subclass"):
            registry.get_provider_class("bogus")
    finally:
        registry._EXTRA.pop("bogus")


def test_picking_the_default_provider_imports_no_other_provider() -> None:
    """``env create`` without ``--provider`` imported every provider to rank them, the e2b and
    daytona SDKs included (seconds of a run's start): the ranking is known without them."""
    script = (
        "import sys\n"
        "from providers.registry import pick_provider\n"
        "assert pick_provider([]) == 'worktree'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'e2b', 'daytona', 'docker'}"
        " or m.startswith(('providers.e2b', 'providers.daytona', 'providers.docker',"
        " 'gateway'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_the_known_preferences_are_those_of_the_classes() -> None:
    for target, preference in registry._KNOWN_PREFERENCE.items():
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional SDK that is not installed
            continue
        assert getattr(module, attr).preference == preference, target
    known = {target for target, _extra in registry._known().values()}
    assert {target for target, _extra in registry._BUILTIN.values()} <= set(
        registry._KNOWN_PREFERENCE
    )
    assert set(registry._KNOWN_PREFERENCE) <= known


def test_pick_ranks_an_imported_provider_by_its_class() -> None:
    """A registered class that is preferred to the worktree wins without anything else."""

    class Favourite(WorktreeProvider):
        name = "favourite"
        preference = 1

    registry.register("favourite", Favourite)
    try:
        assert registry.pick_provider([]) == "favourite"
        assert registry.pick_provider(["python"], candidates=["local", "worktree"]) == "worktree"
    finally:
        registry.unregister("favourite")
