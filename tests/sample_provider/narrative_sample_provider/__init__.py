"""``sample``: a provider from outside the project, as a third party would write one.

It inherits the directory machinery (a checkout per environment, exec in a sandbox, restore,
collect, spawn) from :class:`providers.worktree.WorktreeProvider`; what makes it a provider of
its own is its name, its config model and the entry point in ``pyproject.toml`` that registers
it (group ``narrative.providers``: ``sample = "narrative_sample_provider:SampleProvider"``).
"""

from __future__ import annotations

from typing import Literal

from providers.worktree import WorktreeConfig, WorktreeProvider

__all__ = ["SampleConfig", "SampleProvider"]


class SampleConfig(WorktreeConfig):
    type: Literal["sample"] = "sample"  # type: ignore[assignment]


class SampleProvider(WorktreeProvider):
    name = "sample"
    config_model = SampleConfig
    preference = 90  # never picked unless asked for by name
