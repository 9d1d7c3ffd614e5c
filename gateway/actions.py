"""What the gateway's protocol state asks its I/O shell to do: the :class:`Outcome` of a call and
the actions (:class:`Send`, :class:`RunLocal`, :class:`Deliver`, ...) that
:class:`~gateway.state.GatewayState` returns for every event.

Keys: a call is known by ``(peer, requestId)`` (:data:`Key`), where ``peer`` is the environment
it came from, or ``""`` when it was made in this process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import GatewayError, error_from_wire
from .protocol import Cancel, ErrorBody, Notification, Partial, Reply, Request

__all__ = [
    "Action",
    "CancelLocal",
    "Deliver",
    "DeliverNotification",
    "DeliverPartial",
    "Key",
    "NotifyLocal",
    "Outcome",
    "RunLocal",
    "Send",
]

#: ``(peer environment or "" for this process, request id)``.
Key = tuple[str, str]


@dataclass(slots=True)
class Outcome:
    """The result of a call: success with a result, or an error.

    Attributes:
        success: Whether the call succeeded.
        result: Its result (or the gathered list for a fan-out).
        error: The error when it failed.
        environment_id: Where the outcome was produced.
    """

    success: bool
    result: Any = None
    error: ErrorBody | None = None
    environment_id: str | None = None

    @classmethod
    def failure(cls, exc: GatewayError, environment_id: str | None) -> Outcome:
        return cls(False, None, ErrorBody(code=exc.code, message=str(exc)), environment_id)

    def unwrap(self) -> Any:
        """The result, or raise the error as its :mod:`gateway.errors` class."""
        if self.success:
            return self.result
        error = self.error or ErrorBody(code="internal", message="failed without an error")
        raise error_from_wire(error.code, error.message, self.environment_id)

    def as_dict(self) -> dict[str, Any]:
        """The per-target entry of a gathered fan-out result."""
        return {
            "environmentId": self.environment_id,
            "success": self.success,
            "result": self.result,
            "error": self.error.model_dump() if self.error else None,
        }


# ----------------------------------------------------------------------------- actions


@dataclass(slots=True)
class Send:
    """Send ``message`` to ``peer`` (dropped by the shell if the peer is not connected)."""

    peer: str
    message: Request | Reply | Partial | Notification | Cancel


@dataclass(slots=True)
class RunLocal:
    """Run the handler for ``request`` here; report back with ``local_*`` calls using ``key``."""

    key: Key
    request: Request


@dataclass(slots=True)
class CancelLocal:
    """Stop the handler running for ``key``."""

    key: Key


@dataclass(slots=True)
class NotifyLocal:
    """Hand a notification from the caller to the handler running for ``key``."""

    key: Key
    notification: Notification


@dataclass(slots=True)
class Deliver:
    """Complete the call this process made under ``request_id``."""

    request_id: str
    outcome: Outcome


@dataclass(slots=True)
class DeliverPartial:
    """A streamed partial result for the call this process made under ``request_id``."""

    request_id: str
    partial: Partial


@dataclass(slots=True)
class DeliverNotification:
    """A notification for this process: about its call ``request_id``, or (None) from ``peer``."""

    request_id: str | None
    peer: str | None
    notification: Notification


Action = (
    Send | RunLocal | CancelLocal | NotifyLocal | Deliver | DeliverPartial | DeliverNotification
)
