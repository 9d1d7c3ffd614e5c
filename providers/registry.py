"""Provider registry: name → ``"module:Class"``, imported only when used (fsspec's pattern).

Built-in providers are listed here; third-party ones register through the entry-point group
``narrative.providers`` (``name = "package.module:Class"``). A provider whose optional
dependency is missing fails with an install hint rather than an ``ImportError``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from narrative.entrypoints import entry_points_in

from .base import BaseProvider
from .errors import MissingDependency, NoProviderAvailable, ProviderError, ProviderNotFound

__all__ = [
    "ENTRY_POINT_GROUP",
    "available",
    "get_provider_class",
    "pick_provider",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "narrative.providers"

_BUILTIN: dict[str, tuple[str, str | None]] = {
    # name: (import path, pip extra that provides its dependency)
    "local": ("providers.local:LocalProvider", None),
    "worktree": ("providers.worktree:WorktreeProvider", None),
    "docker": ("providers.docker.provider:DockerProvider", "docker"),
    "e2b": ("providers.e2b_provider:E2BProvider", "e2b"),
    "daytona": ("providers.daytona_provider:DaytonaProvider", "daytona"),
    "ssh": ("providers.ssh.provider:SSHProvider", "ssh"),
    "cloud-vm": ("providers.cloud.provider:CloudVMProvider", "cloud"),
    "hybrid": ("providers.hybrid:HybridProvider", None),
    "k8s": ("providers.k8s.provider:K8sProvider", "k8s"),
}
_KNOWN_PREFERENCE: dict[str, int] = {
    "providers.worktree:WorktreeProvider": 10,
    "providers.local:LocalProvider": 20,
    "providers.docker.provider:DockerProvider": 50,
    "providers.e2b_provider:E2BProvider": 50,
    "providers.daytona_provider:DaytonaProvider": 50,
    "providers.ssh.provider:SSHProvider": 70,
    "providers.k8s.provider:K8sProvider": 70,
    "providers.cloud.provider:CloudVMProvider": 90,
    "providers.hybrid:HybridProvider": 1000,
    # this project's own entry point (the team hub's environments)
    "gateway.hub.remote_provider:RemoteProvider": 90,
}
"""The ``preference`` of this project's provider classes by import path, known without
importing them, so that :func:`pick_provider` tries them in that order and stops at the first
that fits instead of importing every SDK (those of e2b and daytona take seconds). A test checks
them against the classes."""
_EXTRA: dict[str, tuple[str, str | None]] = {}
_LOADED: dict[str, type[BaseProvider]] = {}


def register(name: str, target: str | type[BaseProvider], extra: str | None = None) -> None:
    """Register a provider under ``name`` (a class or a ``"module:Class"`` string)."""
    if isinstance(target, str):
        _EXTRA[name] = (target, extra)
        _LOADED.pop(name, None)
    else:
        _LOADED[name] = target


def unregister(name: str) -> None:
    """Forget a provider registered with :func:`register` (nothing for an unknown name)."""
    _EXTRA.pop(name, None)
    _LOADED.pop(name, None)


def _known() -> dict[str, tuple[str, str | None]]:
    known = dict(_BUILTIN)
    for ep in entry_points_in(ENTRY_POINT_GROUP):
        known.setdefault(ep.name, (ep.value, None))
    known.update(_EXTRA)
    return known


def available() -> list[str]:
    """Every registered provider name (nothing is imported)."""
    return sorted(set(_known()) | set(_LOADED))


def get_provider_class(name: str) -> type[BaseProvider]:
    """Import and return the provider class registered as ``name``."""
    if name in _LOADED:
        return _LOADED[name]
    known = _known()
    if name not in known:
        raise ProviderNotFound(name, available())
    target, extra = known[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or str(exc)
        if module_name.startswith("providers.") and missing.split(".")[0] != "providers":
            raise MissingDependency(name, extra or name, f"cannot import {missing}") from exc
        raise ProviderError(f"provider {name!r} cannot be imported: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseProvider)):
        raise ProviderError(f"provider {name!r}: {target} is not a BaseProvider subclass")
    _LOADED[name] = cls
    return cls


def _known_preference(name: str, known: dict[str, tuple[str, str | None]]) -> float:
    """A provider's ``preference`` when it is known without importing it, else -inf (a
    provider that must be imported to be ranked is tried first)."""
    if name in _LOADED:
        return _LOADED[name].preference
    target = known.get(name)
    if target is not None and target[0] in _KNOWN_PREFERENCE:
        return _KNOWN_PREFERENCE[target[0]]
    return float("-inf")


def pick_provider(requirements: Iterable[str], candidates: Iterable[str] | None = None) -> str:
    """The preferred provider (lowest ``preference``, then name) that declares every required
    capability. Providers are imported in the order of their known preference, and no further
    once none left can be preferred to one that fits."""
    wanted = sorted({r.strip() for r in requirements if r.strip()})
    known = _known()
    names = sorted(
        set(candidates if candidates is not None else available()),
        key=lambda n: (_known_preference(n, known), n),
    )
    missing: dict[str, list[str]] = {}
    best: tuple[int, str] | None = None
    for name in names:
        if best is not None and (_known_preference(name, known), name) > best:
            break  # this one and every later one rank after the fit already found
        try:
            cls = get_provider_class(name)
        except MissingDependency:
            missing[name] = ["(not installed)"]
            continue
        except ProviderError:
            missing[name] = ["(cannot be imported)"]
            continue
        lacking = [cap for cap in wanted if cap not in cls.capabilities]
        if lacking:
            missing[name] = lacking
        elif best is None or (cls.preference, name) < best:
            best = (cls.preference, name)
    if best is None:
        raise NoProviderAvailable(wanted, missing)
    return best[1]
