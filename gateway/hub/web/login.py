"""``narrative hub ui``: a one-time login URL for the web view of the store's serving hub,
asked for with the owner's control token (``hub:webLogin``)."""

from __future__ import annotations

import os

from narrative.store import Store

from ...errors import Unavailable
from ..client import hub_client
from ..server import control_token, find_hub

__all__ = ["web_login_url"]


async def web_login_url(store: Store) -> str:
    """A URL that logs a browser in to the web view of ``store``'s serving hub, once.

    Raises:
        Unavailable: no hub serves the store, or it serves no web view.
    """
    info = find_hub(store)
    if info is None:
        raise Unavailable("no hub serves this store: start one with 'narrative serve'")
    if not info.get("web"):
        raise Unavailable("the store's hub serves no web view (it was started with --no-web)")
    token = control_token(store, f"cli-{os.getpid()}")
    async with hub_client(info, token) as client:
        answer = await client.call("hub", "webLogin", {}, target=info["environment"])
    return str(answer["url"])
