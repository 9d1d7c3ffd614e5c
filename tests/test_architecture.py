"""The shape of the code (issue 15), checked over the source: no import cycles between modules
(imports inside functions included), no module touching another module's underscore names,
modules short enough to hold in mind, one error tree per package, the gateway's core apart from
environments, each package's public API pinned, and docs/architecture.md naming real modules."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("narrative", "transfer", "providers", "gateway", "cli")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:`` (never imported at run time)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for sub in ast.walk(node))
    return skipped


def _imported(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in module ``name`` reads from."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if not str(MODULES[name]).endswith("__init__.py"):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of ours it imports, at any depth of the code, at run time."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        tree = _tree(name)
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                source = _imported(name, node)
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if target in MODULES:
                        graph[name].add(target)
                    elif source in MODULES:
                        graph[name].add(source)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root, imports in graph.items():
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(imports)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules() -> None:
    assert cycles(import_graph()) == []


def _own_private_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines itself (functions, classes, attributes it assigns)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_access(name: str, tree: ast.Module) -> list[str]:
    """Where module ``name`` uses an underscore name it does not define: imported from a
    module of ours, or read as an attribute of anything but ``self``/``cls``. ``os._exit``
    is documented public API of the standard library (the exit of a forked child)."""
    own = _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").split(".")[0] in PACKAGES
        ):
            found += [
                f"{name}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Name) and owner.id == "os" and node.attr == "_exit":
                continue
            found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_the_private_access_finder_finds_one() -> None:
    source = "from .odb import _pack\nimport x\nx.store._index\nself._mine\nos._exit(0)\n"
    assert private_access("m", ast.parse(source)) == ["m:1 imports _pack", "m:3 x.store._index"]


def test_no_module_touches_another_modules_underscore_names() -> None:
    found = [hit for name in MODULES for hit in private_access(name, _tree(name))]
    assert found == []


def test_modules_fit_in_mind() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines"


#: The root of each package's error tree (every public exception class of it derives from it).
ERROR_ROOTS = {
    "narrative": "narrative.errors.NarrativeError",
    "transfer": "transfer.errors.TransferError",
    "providers": "providers.errors.ProviderError",
    "gateway": "gateway.errors.GatewayError",
}


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    found: type = getattr(importlib.import_module(module), name)
    return found


@pytest.mark.parametrize("package", sorted(ERROR_ROOTS))
def test_each_package_has_one_error_tree(package: str) -> None:
    root = _class(ERROR_ROOTS[package])
    narrative_root = _class(ERROR_ROOTS["narrative"])
    assert issubclass(root, narrative_root)  # and the CLI maps NarrativeError in one place
    strays = []
    for name in MODULES:
        if name.split(".")[0] != package:
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
                and not issubclass(value, root)
            ):
                strays.append(f"{name}.{attr}")
    assert strays == [], f"exceptions outside {ERROR_ROOTS[package]}"


def test_the_gateway_core_contract_names_every_core_module() -> None:
    """import-linter's forbidden contract lists the gateway's core modules by name: a new one
    must join it (else it could import providers unnoticed)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    core = {
        name
        for name in MODULES
        if name.startswith("gateway.") and not name.startswith("gateway.hub")
    }
    assert set(forbidden["source_modules"]) == core
    assert set(forbidden["forbidden_modules"]) == {"providers", "gateway.hub"}


#: Each package's public API. A change here is deliberate: update it with the move.
PUBLIC_API = {
    "narrative": [
        "AgentRun",
        "Conflict",
        "DiffResult",
        "GcReport",
        "MergeResult",
        "NarrativeError",
        "Objective",
        "RestoreResult",
        "RetentionPolicy",
        "Snapshot",
        "SnapshotResult",
        "Store",
        "Thread",
        "TreeMerge",
        "abort_merge",
        "all_snapshots",
        "collect_garbage",
        "continue_merge",
        "create_objective",
        "create_thread",
        "diff_snapshots",
        "finish_run",
        "list_objectives",
        "list_runs",
        "list_threads",
        "materialize",
        "merge_base",
        "merge_state",
        "merge_text",
        "merge_trees",
        "merge_workspace",
        "resolve_snapshot",
        "resolve_thread",
        "restore_workspace",
        "start_run",
        "take_snapshot",
        "thread_snapshots",
    ],
    "transfer": [
        "ExportResult",
        "ImportResult",
        "TransferError",
        "add_remote",
        "export",
        "fetch",
        "import_",
        "list_remotes",
        "push",
        "remove_remote",
    ],
    "providers": [
        "BaseProvider",
        "EnvState",
        "EnvironmentExists",
        "EnvironmentManager",
        "EnvironmentNotFound",
        "EnvironmentRecord",
        "ExecResult",
        "Health",
        "HealthReport",
        "IllegalTransition",
        "ImageNotFound",
        "MissingDependency",
        "NoProviderAvailable",
        "ProviderConfig",
        "ProviderContext",
        "ProviderError",
        "ProviderNotFound",
        "ProviderUnavailable",
        "ResourceGone",
        "SpawnLog",
        "available",
        "get_provider_class",
        "pick_provider",
        "register",
    ],
    "gateway": [
        "CallStream",
        "Confined",
        "Gateway",
        "GatewayClient",
        "GatewayError",
        "HandlerContext",
        "Limits",
        "Link",
        "ProviderServer",
        "ProxyExecutionConfig",
        "RemoteExecutionPlugin",
        "RouteRecord",
        "Router",
        "TokenClaims",
        "TokenSigner",
        "install_builtins",
        "load_config",
        "load_or_create_key",
    ],
    "gateway.hub": [
        "Hub",
        "IsolatedRun",
        "RunEventLog",
        "RunRequest",
        "pick_base",
        "run_isolated",
        "run_through_hub",
    ],
    "cli": ["cli", "main"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_public_api_is_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == PUBLIC_API[package]
    for name in module.__all__:
        getattr(module, name)  # every exported name resolves


def test_architecture_doc_names_only_real_modules() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(
        re.findall(r"`((?:narrative|transfer|providers|gateway|cli)(?:\.[a-z_0-9]+)+)`", text)
    )
    assert named, "docs/architecture.md names no module"
    missing = sorted(n for n in named if n not in MODULES and not _attribute_of_module(n))
    assert missing == []


def _attribute_of_module(dotted: str) -> bool:
    """Whether ``dotted`` is ``module.name`` of one of our modules (a class or function)."""
    module, _, attr = dotted.rpartition(".")
    return module in MODULES and hasattr(importlib.import_module(module), attr)
