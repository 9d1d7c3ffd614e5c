"""Sweeping: deleting the resources a provider holds for a store that no environment record
knows (leaked by a crash between making a resource and recording it, or by a lost record)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from pydantic import ValidationError

from narrative.store import Store

from .base import ProviderConfig, ProviderContext
from .records import EnvironmentStore, being_created
from .registry import get_provider_class

__all__ = ["sweep_leaked"]

log = logging.getLogger(__name__)


def sweep_leaked(
    store: Store, owner: str, records: EnvironmentStore, providers: Iterable[str] | None = None
) -> list[str]:
    """Delete the resources labelled with ``owner`` that no live record of ``records`` knows,
    of ``providers`` (default: every provider an environment of the store ever used).

    An environment's record is written before its resource is made and names it only once
    made (:meth:`EnvironmentManager.create`, which holds :func:`~providers.records.creating`
    meanwhile): a resource whose environment is being created is left alone, and so is every
    resource that does not say which environment it was made for while one of its provider is
    being created (the next sweep takes it, if leaked)."""
    live = records.live()
    known = {r.resource_id for r in live if r.resource_id}
    placed = {r.id for r in live if r.resource_id}  # environments with a resource recorded
    names = set(providers) if providers is not None else {r.provider for r in records.load()}
    swept: list[str] = []
    for name in sorted(names):
        cls = get_provider_class(name)
        context = ProviderContext(store, owner, "env-sweep", "sweep")
        coming = {
            r.id
            for r in live
            if r.provider == name and not r.resource_id and being_created(store, r.id)
        }
        for config in _sweep_configs(records, name, cls.config_model):
            instance = cls(context, config)
            for resource in instance.list_resources():
                if resource in known or resource in swept:
                    continue
                made_for = instance.environment_of(resource)
                if made_for in coming or (made_for is None and coming):
                    log.info("leaving %s: an environment is being created", resource)
                    continue
                log.info("sweeping leaked %s resource %s", name, resource)
                # deleted as the environment it was made for, so that its processes are found
                # by that environment's marker; never as one with a resource of its own
                # (whose processes carry the same marker)
                if made_for is not None and made_for not in placed:
                    cls(ProviderContext(store, owner, made_for, "sweep"), config).delete(resource)
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
