"""The suite's hypothesis settings are chosen in one place (``tests/properties.py``): a run's
property tests behave the same whichever modules it collects, and ``make soak`` scales them all.

Before, the store model's module loaded its own profile for the whole process when imported:
a full run drew every property test's examples one way (derandomized, no database) and a run of
one module another, so a failure seen locally did not repeat in CI, or the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import settings

from tests.properties import SOAK, SOAK_FACTOR, examples

TESTS = Path(__file__).parent


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(TESTS.rglob("*.py"))]


def test_the_suite_profile_is_loaded() -> None:
    assert settings.default.derandomize is not SOAK
    assert settings.default.database is None or SOAK
    assert examples(10) == (10 * SOAK_FACTOR if SOAK else 10)


def test_no_module_loads_a_profile_for_the_whole_process() -> None:
    offenders = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load_profile"
                and path != TESTS / "conftest.py"
            ):
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert offenders == [], "set a machine's profile on its TestCase instead"


def test_every_example_count_scales_with_soak() -> None:
    """A ``@settings(max_examples=N)`` with a literal N would not grow under ``make soak``."""
    offenders = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and _named(decorator.func, "settings")):
                    continue
                for keyword in decorator.keywords:
                    if keyword.arg == "max_examples" and isinstance(keyword.value, ast.Constant):
                        offenders.append(f"{path.relative_to(TESTS)}:{node.lineno} {node.name}")
    assert offenders == [], "use tests.properties.examples(N)"


def _named(func: ast.expr, name: str) -> bool:
    return (isinstance(func, ast.Name) and func.id == name) or (
        isinstance(func, ast.Attribute) and func.attr == name
    )
