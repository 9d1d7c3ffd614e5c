"""Long-running commands (``serve``, ``gateway serve``): announce readiness, then wait."""

from __future__ import annotations

import signal
import sys

__all__ = ["announce_and_wait"]


async def announce_and_wait(line: str) -> None:
    """Print ``line`` (one line, flushed: whoever started the server waits for it as the ready
    signal), then wait for SIGINT or SIGTERM."""
    import asyncio  # running already (this is a coroutine); not imported by every command

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # handlers first: a SIGTERM sent as soon as the line is read still ends the server cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    await stop.wait()
