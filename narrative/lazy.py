"""Lazy package exports (PEP 562): a package names its public API in ``__all__`` and imports each
name from its home module on first use, so that importing one submodule stays cheap (the CLI's
fast paths import ``narrative.x`` and must not pay for the whole package)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from the submodule
    ``homes[name]`` names (relative to the package) when it is first read."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return __getattr__
