"""A handler plugin for the hybrid tests, loaded by the tools node of a hybrid environment
(``--config handlers=...``): an ``llm:complete`` that says where it ran."""

from __future__ import annotations

import os
from typing import Any

from gateway.handlers import HandlerContext, HandlerRegistry


async def complete(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
    return {"completion": "4", "servedBy": ctx.environment_id, "cwd": os.getcwd()}


def register(registry: HandlerRegistry) -> None:
    registry.register("llm", "complete", complete)
