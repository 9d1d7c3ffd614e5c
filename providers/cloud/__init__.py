"""Cloud machines for the ``cloud-vm`` provider: a small driver interface that launches,
describes, lists and terminates VMs labelled with a store's owner, with a cap on their count and
an idle time-to-live, and an EC2 driver behind it (:mod:`providers.cloud.ec2`, needs the
``cloud`` extra). The machine side (SSH into the VM) is the ``ssh`` provider's, which
:mod:`providers.cloud.provider` (the ``cloud-vm`` provider) points at each machine it launches.

* :mod:`providers.cloud.driver`: :class:`~providers.cloud.driver.MachineDriver`, the records
  it returns and its configuration.
* :mod:`providers.cloud.drivers`: :func:`~providers.cloud.drivers.open_driver`, the driver a
  configuration names.
* :mod:`providers.cloud.provider`: the ``cloud-vm`` provider and its configuration.
"""

from __future__ import annotations

from .driver import CloudMachineConfig, LaunchSpec, Machine, MachineDriver

__all__ = ["CloudMachineConfig", "LaunchSpec", "Machine", "MachineDriver"]
