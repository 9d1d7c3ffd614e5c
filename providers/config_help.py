"""``narrative env create --provider P --help``: each setting of a provider's configuration
model with its type, default and help (the field's attribute docstring, read from the source
only when asked)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["config_help"]


def _type_name(annotation: Any) -> str:
    """``bool | 'host'``, ``list[str]``, ``int | str | None``: how a value is written."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    if annotation is type(None):
        return "None"
    return str(getattr(annotation, "__name__", annotation))


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of ``cls`` itself (name → text); empty when
    its source cannot be read."""
    import ast
    import inspect
    import itertools
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Each field's attribute docstring, from the nearest class of ``model``'s MRO that has one."""
    docs: dict[str, str] = {}
    for cls in model.__mro__:
        if issubclass(cls, BaseModel) and cls is not BaseModel:
            for name, text in _attribute_docstrings(cls).items():
                docs.setdefault(name, text)
    return docs


def config_help(model: type[BaseModel]) -> list[tuple[str, str]]:
    """``(key=TYPE [default], description)`` for every settable field of a config model (its
    description: the field's ``description``, else its attribute docstring)."""
    docs = _field_docs(model)
    rows = []
    for name, field in model.model_fields.items():
        if name == "type":
            continue  # the discriminator, not a setting
        annotation = _type_name(field.annotation)
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = f"default {value!r}" if value not in (None, [], {}) else "optional"
        text = " ".join((field.description or docs.get(name, "")).replace("``", "").split())
        rows.append((f"{name}={annotation}", f"[{default}] {text}".strip()))
    return rows
