"""Sweeping: deleting the resources a provider holds for a store that no environment record
knows (leaked by a crash between making a resource and recording it, or by a lost record)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from pydantic import ValidationError

from narrative.store import Store

from .base import ProviderConfig, ProviderContext
from .records import EnvironmentStore
from .registry import get_provider_class

__all__ = ["sweep_leaked"]

log = logging.getLogger(__name__)


def sweep_leaked(
    store: Store, owner: str, records: EnvironmentStore, providers: Iterable[str] | None = None
) -> list[str]:
    """Delete the resources labelled with ``owner`` that no live record of ``records`` knows,
    of ``providers`` (default: every provider an environment of the store ever used)."""
    live = records.live()
    known = {r.resource_id for r in live if r.resource_id}
    live_ids = {r.id for r in live}
    names = set(providers) if providers is not None else {r.provider for r in records.load()}
    swept: list[str] = []
    for name in sorted(names):
        cls = get_provider_class(name)
        context = ProviderContext(store, owner, "env-sweep", "sweep")
        for config in _sweep_configs(records, name, cls.config_model):
            instance = cls(context, config)
            for resource in instance.list_resources():
                if resource not in known and resource not in swept:
                    log.info("sweeping leaked %s resource %s", name, resource)
                    # deleted as the environment it was made for, so that its processes are
                    # found by that environment's marker; never as a live one (whose marker
                    # its own processes carry)
                    made_for = instance.environment_of(resource)
                    if made_for is not None and made_for not in live_ids:
                        as_made = ProviderContext(store, owner, made_for, "sweep")
                        cls(as_made, config).delete(resource)
                    else:
                        instance.delete(resource)
                    swept.append(resource)
    return swept


def _sweep_configs(
    records: EnvironmentStore, provider: str, model: type[ProviderConfig]
) -> list[ProviderConfig]:
    """Where to look for leaked resources of ``provider``: its default configuration, and
    every distinct one an environment of the store had (an ``ssh`` host, a daemon
    address), archived environments included."""
    configs: list[ProviderConfig] = []
    with contextlib.suppress(ValidationError):  # no default: the host is required, say
        configs.append(model())
    for record in records.load():
        if record.provider != provider:
            continue
        try:
            config = model.model_validate(record.config)
        except ValidationError:
            continue
        if config not in configs:
            configs.append(config)
    return configs
