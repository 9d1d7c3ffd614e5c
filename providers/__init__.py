"""Providers: environments a snapshot is restored into and run in, behind one interface.

``EnvironmentManager`` persists environment records and drives their lifecycle; providers
(``local``, ``worktree``, ``docker``, ``e2b``, or third-party ones from the entry-point group
``narrative.providers``) are imported only when used. Nothing here knows about the gateway:
runs, the hub that coordinates them and the in-environment runtime are :mod:`gateway.hub`.
"""

from .base import BaseProvider, ExecResult, Health, ProviderConfig, ProviderContext, SpawnLog
from .errors import (
    EnvironmentExists,
    EnvironmentNotFound,
    IllegalTransition,
    ImageNotFound,
    MissingDependency,
    NoProviderAvailable,
    ProviderError,
    ProviderNotFound,
    ProviderUnavailable,
    ResourceGone,
)
from .lifecycle import EnvState
from .manager import EnvironmentManager, HealthReport
from .records import EnvironmentRecord
from .registry import available, get_provider_class, pick_provider, register

__all__ = [
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
]
