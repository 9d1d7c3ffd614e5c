"""Each test's environments have ids of their own.

An environment's id names the marker that every process started in it carries, and ending an
environment's leftovers (a reset, a stop, a delete) kills whatever carries that marker on the
machine. Two tests with the same literal id, running at once on two workers, would kill each
other's processes: a flaky failure of the one whose processes vanished, far from the cause.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _literal_names(tree: ast.Module) -> set[str]:
    """Module-level names bound to a string literal."""
    return {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _env_id_argument(call: ast.Call) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "env_id":
            return keyword.value
    return call.args[2] if len(call.args) > 2 else None


def test_no_test_gives_an_environment_a_literal_id() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        literals = _literal_names(tree)
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "ProviderContext"
            ):
                continue
            arg = _env_id_argument(node)
            fixed = isinstance(arg, ast.Constant) or (
                isinstance(arg, ast.Name) and arg.id in literals
            )
            if fixed:
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert offenders == [], "give each environment new_id('environment')"
