"""Timeouts and bounds of one gateway node (:class:`Limits`), shared by its protocol state, its
connections and the servers and links that carry them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Timeouts and bounds of one gateway.

    Attributes:
        execution_timeout: Seconds a call may run when its caller set no budget.
        transport_timeout: Seconds for connecting, the hello exchange and pings, and how long a
            lost hop may take to come back before the calls it carries fail as unavailable.
        max_frame: Largest frame accepted, in bytes (larger ones close the connection).
        max_queue: Frames buffered per connection before reading pauses (backpressure).
        max_inflight: Calls from peers running or proxied at once; more are refused as busy.
        max_pending: Calls this process may have outstanding; more wait for a slot.
        done_cache: Replies kept to answer resent requests without running them again.
        max_bad_frames: Malformed frames tolerated per connection before it is closed.
    """

    execution_timeout: float = 300.0
    transport_timeout: float = 10.0
    max_frame: int = 1 << 20
    max_queue: int = 64
    max_inflight: int = 1024
    max_pending: int = 1024
    done_cache: int = 4096
    max_bad_frames: int = 64

    def websocket_options(self) -> dict[str, Any]:
        """The websockets settings both ends of a gateway connection use (server and link)."""
        return {
            "compression": None,
            "open_timeout": self.transport_timeout,
            "ping_interval": self.transport_timeout,
            "ping_timeout": self.transport_timeout,
            "close_timeout": 1,
            "max_size": self.max_frame,
            "max_queue": self.max_queue,
        }
