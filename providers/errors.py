"""The error subtree of the providers package (registry, environments, isolated runs).

Everything derives from :class:`narrative.errors.NarrativeError`, so the CLI prints one clear
line and exits 1::

    NarrativeError
    └── ProviderError
        ├── ProviderNotFound(name) (+LookupError)        no provider registered under a name
        ├── MissingDependency(provider, extra)            optional package not installed
        ├── NoProviderAvailable(requirements, missing)    nothing satisfies ``--require``
        ├── ProviderUnavailable                           daemon / API unreachable
        │   └── SandboxUnavailable                        bwrap missing, or a setting refused
        ├── ImageNotFound(image) (+LookupError)           a Docker image is absent (never pulled)
        ├── ResourceGone(resource_id) (+LookupError)      the resource behind it no longer exists
        ├── EnvironmentNotFound(name) (+LookupError)
        ├── EnvironmentExists(name)
        ├── IllegalTransition(name, current, target)      refused by the lifecycle table
        ├── EnvironmentStateError                         environment records unreadable
        ├── ExecFailed                                    a command could not be started at all
        ├── RuntimeBroken                                 the runtime's import check failed
        ├── ResultTooLarge                                a run's result is over its cap
        └── QuotaExceeded(limit, live)                    a cloud machine past max_machines

Errors of the Docker SDK, the e2b SDK and botocore are translated into this tree in one place
each (``providers.docker.client.translate_error``, ``providers.e2b_calls.translate_error`` and
``providers.cloud.ec2.api_errors``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from narrative.errors import NarrativeError

__all__ = [
    "EnvironmentExists",
    "EnvironmentNotFound",
    "EnvironmentStateError",
    "ExecFailed",
    "IllegalTransition",
    "ImageNotFound",
    "MissingDependency",
    "NoProviderAvailable",
    "ProviderError",
    "ProviderNotFound",
    "ProviderUnavailable",
    "QuotaExceeded",
    "ResourceGone",
    "ResultTooLarge",
    "RuntimeBroken",
    "SandboxUnavailable",
]


class ProviderError(NarrativeError):
    """Root of the errors raised by the providers package."""


class ProviderNotFound(ProviderError, LookupError):
    """No provider is registered under ``name``."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown provider {name!r} (known: {', '.join(known) or 'none'})")
        self.name = name


class MissingDependency(ProviderError):
    """A provider needs an optional package that is not installed."""

    def __init__(self, provider: str, extra: str, cause: str) -> None:
        super().__init__(
            f"provider {provider!r} needs an optional dependency ({cause}); "
            f"install it with: pip install 'narrative-engine[{extra}]'"
        )
        self.provider = provider
        self.extra = extra


class NoProviderAvailable(ProviderError):
    """No registered provider declares every required capability."""

    def __init__(self, requirements: Sequence[str], missing: Mapping[str, Sequence[str]]) -> None:
        detail = "; ".join(f"{name} lacks {', '.join(caps)}" for name, caps in missing.items())
        super().__init__(
            f"no provider offers {', '.join(requirements)}" + (f" ({detail})" if detail else "")
        )
        self.requirements = list(requirements)
        self.missing = {name: list(caps) for name, caps in missing.items()}


class ProviderUnavailable(ProviderError):
    """The provider's backend (a daemon, an API) cannot be reached."""


class ImageNotFound(ProviderError, LookupError):
    """A container image is not present locally; it is never pulled implicitly."""

    def __init__(self, image: str) -> None:
        super().__init__(
            f"docker image {image!r} is not present locally and is never pulled; "
            f"build or load it first ('docker build' / 'docker load'), or leave out "
            f"--config image to use the default image"
        )
        self.image = image


class ResourceGone(ProviderError, LookupError):
    """The resource behind an environment (container, sandbox, directory) no longer exists."""

    def __init__(self, resource_id: str) -> None:
        super().__init__(f"resource {resource_id} no longer exists")
        self.resource_id = resource_id


class EnvironmentNotFound(ProviderError, LookupError):
    """No environment has this name or id."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no environment named {name!r}")
        self.name = name


class EnvironmentExists(ProviderError):
    """An environment with this name exists already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"an environment named {name!r} exists already")
        self.name = name


class IllegalTransition(ProviderError):
    """The lifecycle table does not allow this state change."""

    def __init__(self, name: str, current: str, target: str) -> None:
        super().__init__(f"environment {name!r} cannot go from {current} to {target}")
        self.name = name
        self.current = current
        self.target = target


class EnvironmentStateError(ProviderError):
    """The environment records on disk are unreadable or invalid."""


class ExecFailed(ProviderError):
    """A command could not be started in the environment (not: it exited non-zero)."""


class SandboxUnavailable(ProviderUnavailable):
    """An environment's sandbox cannot be set up (``bwrap`` missing, or a setting it cannot
    honour)."""


class RuntimeBroken(ProviderError):
    """The runtime of an environment does not start as it should (e.g. a module of the
    environment's workspace shadows one of the runtime's)."""


class ResultTooLarge(ProviderError):
    """A run's result is over the environment's ``max_result_bytes``: nothing of it is taken
    in (it stays in the environment)."""


class QuotaExceeded(ProviderError):
    """Launching another cloud machine would pass the configured cap on live machines of this
    store (``max_machines``): nothing was created."""

    def __init__(self, limit: int, live: Sequence[str]) -> None:
        super().__init__(
            f"{len(live)} cloud machines of this store are live already (max_machines={limit}: "
            f"{', '.join(live)}); delete an environment, or raise max_machines"
        )
        self.limit = limit
        self.live = list(live)
