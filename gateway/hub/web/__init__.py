"""The hub's web view (``narrative serve`` prints its URL; ``narrative hub ui`` a login URL):
overview, runs, a run's live event log and diff, environments and routes. See :mod:`.app`."""

from __future__ import annotations

from .app import WebView
from .login import web_login_url

__all__ = ["WebView", "web_login_url"]
