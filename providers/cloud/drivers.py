"""The driver a :class:`~providers.cloud.driver.CloudMachineConfig` names, imported only when
asked for, so that configurations load without any cloud SDK installed."""

from __future__ import annotations

from narrative.errors import InvalidInput

from ..errors import MissingDependency
from .driver import CloudMachineConfig, MachineDriver

__all__ = ["open_driver"]


def open_driver(config: CloudMachineConfig, provider: str = "cloud-vm") -> MachineDriver:
    """A driver for ``config`` (no network until its first call).

    Raises:
        MissingDependency: the cloud's SDK is not installed (the ``cloud`` extra), named on
            behalf of ``provider``.
        InvalidInput: no driver has that name (a config made without validation).
    """
    # One branch per cloud: a GCP or Azure driver adds its own here.
    if config.driver == "ec2":
        try:
            from .ec2 import Ec2Driver
        except ImportError as exc:
            raise MissingDependency(provider, "cloud", f"cannot import {exc.name or exc}") from exc
        return Ec2Driver(config)
    raise InvalidInput(f"unknown cloud driver {config.driver!r}")
