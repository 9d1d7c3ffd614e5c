"""The error subtree of the gateway, and the closed set of codes that cross the wire.

Everything here derives from :class:`narrative.errors.NarrativeError`, so the CLI prints one
clear line and exits 1. Each class carries a wire ``code`` (one of :data:`ERROR_CODES`); across
a connection only ``{code, message}`` travels, never a class path or a traceback, and the
receiving side turns the code back into the class below (:func:`error_from_wire`)::

    NarrativeError
    └── GatewayError(code)                         code "internal"
        ├── ProtocolError (+ValueError)            "bad_request": malformed frame or message
        │   ├── UnknownMessageType                 "unknown_type"
        │   └── FrameTooLarge                      "too_large"
        ├── ConfigError(path, reason) (+ValueError) an invalid proxyExecution.json (never sent)
        ├── AuthError                              "unauthorized"
        │   ├── TokenMissing
        │   ├── TokenInvalid                       forged, malformed, or for another run
        │   │   └── WrongAudience                  "wrong_audience": a hub token at a gateway
        │   ├── TokenExpired
        │   ├── TokenRevoked                       "revoked": its run ended, or revoked
        │   └── OutOfScope                         "out_of_scope": not what the token allows
        ├── AccessDenied (+PermissionError)        "forbidden": a path escapes the root
        ├── TargetNotFound (+LookupError)          "not_found": no such file or resource
        ├── RoutingError                           "no_route": no environment can take the call
        │   ├── NoHandler                          "no_handler"
        │   ├── RouteLoop                          "loop": the call came back to a hop
        │   └── HopLimitExceeded                   "hop_limit"
        ├── ClaimError                             "claimed": the gateway is claimed already
        ├── GatewayTimeout (+TimeoutError)         "timeout": the execution deadline passed
        ├── Cancelled                              "cancelled"
        ├── Unavailable (+ConnectionError)         "unavailable": a hop went away
        │   └── TlsError                           a certificate not verified or not the pinned one
        ├── Busy                                   "busy": too many calls in flight
        └── HandlerFailed                          "handler_error": the handler raised
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from narrative.errors import NarrativeError

__all__ = [
    "ERROR_CODES",
    "AccessDenied",
    "AuthError",
    "Busy",
    "Cancelled",
    "ClaimError",
    "ConfigError",
    "ErrorCode",
    "FrameTooLarge",
    "GatewayError",
    "GatewayTimeout",
    "HandlerFailed",
    "HopLimitExceeded",
    "NoHandler",
    "OutOfScope",
    "ProtocolError",
    "RouteLoop",
    "RoutingError",
    "TargetNotFound",
    "TlsError",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "TokenRevoked",
    "Unavailable",
    "UnknownMessageType",
    "WrongAudience",
    "error_from_wire",
]

ErrorCode = Literal[
    "bad_request",
    "unknown_type",
    "too_large",
    "unauthorized",
    "wrong_audience",
    "revoked",
    "out_of_scope",
    "forbidden",
    "not_found",
    "no_route",
    "no_handler",
    "loop",
    "hop_limit",
    "claimed",
    "timeout",
    "cancelled",
    "unavailable",
    "busy",
    "handler_error",
    "internal",
]
#: Every code that may appear in an ``error`` object on the wire.
ERROR_CODES: Final[frozenset[str]] = frozenset(get_args(ErrorCode))


class GatewayError(NarrativeError):
    """Root of the errors raised by the gateway package.

    Attributes:
        code: The wire code for this error.
        environment_id: The environment that reported it, when it came over the wire.
    """

    code: ErrorCode = "internal"

    def __init__(self, message: str, *, environment_id: str | None = None) -> None:
        super().__init__(message)
        self.environment_id = environment_id


class ProtocolError(GatewayError, ValueError):
    """A frame or message that is not valid protocol.

    Attributes:
        request_id: The ``requestId`` of the offending message when it could be read.
    """

    code: ErrorCode = "bad_request"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class UnknownMessageType(ProtocolError):
    """A message whose ``type`` this gateway does not speak."""

    code: ErrorCode = "unknown_type"


class FrameTooLarge(ProtocolError):
    """A frame over the configured maximum size."""

    code: ErrorCode = "too_large"


class ConfigError(GatewayError, ValueError):
    """An invalid ``proxyExecution.json``, refused at load.

    Attributes:
        path: The file (or ``<config>`` for in-memory data).
        reason: What is wrong, naming the offending field.
    """

    code: ErrorCode = "bad_request"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"invalid gateway config {path}: {reason}")
        self.path = path
        self.reason = reason


class AuthError(GatewayError):
    """A connection without a valid run-scoped token."""

    code: ErrorCode = "unauthorized"


class TokenMissing(AuthError):
    """No token was presented."""


class TokenInvalid(AuthError):
    """The token is malformed, its signature does not verify, or it is for another run."""


class WrongAudience(TokenInvalid):
    """A token for the other audience (a gateway token at a hub, or the reverse)."""

    code: ErrorCode = "wrong_audience"


class TokenExpired(AuthError):
    """The token's expiry has passed."""


class TokenRevoked(AuthError):
    """The token was revoked: its run ended (or it was revoked by id)."""

    code: ErrorCode = "revoked"


class OutOfScope(AuthError):
    """The token is valid, but not for this: another run's or thread's data, another
    environment, or a write it does not allow."""

    code: ErrorCode = "out_of_scope"


class AccessDenied(GatewayError, PermissionError):
    """A path or command that would leave the handler's root."""

    code: ErrorCode = "forbidden"


class TargetNotFound(GatewayError, LookupError):
    """The file or resource a call names does not exist."""

    code: ErrorCode = "not_found"


class RoutingError(GatewayError):
    """No environment can take this call."""

    code: ErrorCode = "no_route"


class NoHandler(RoutingError):
    """The call was routed here but no handler is registered for it."""

    code: ErrorCode = "no_handler"


class RouteLoop(RoutingError):
    """The call's route path already contains the hop it would go to."""

    code: ErrorCode = "loop"


class HopLimitExceeded(RoutingError):
    """The call's route path is longer than the hop limit allows."""

    code: ErrorCode = "hop_limit"


class ClaimError(GatewayError):
    """The gateway is claimed by another plugin (or not by the one relinquishing it)."""

    code: ErrorCode = "claimed"


class GatewayTimeout(GatewayError, TimeoutError):
    """The call's execution deadline passed before its final reply."""

    code: ErrorCode = "timeout"


class Cancelled(GatewayError):
    """The call was cancelled by its caller."""

    code: ErrorCode = "cancelled"


class Unavailable(GatewayError, ConnectionError):
    """A hop the call depends on disconnected and did not come back in time."""

    code: ErrorCode = "unavailable"


class TlsError(Unavailable):
    """The TLS handshake with a server failed: its certificate does not verify, or is not the
    one pinned. Never retried (the same server would present the same certificate)."""


class Busy(GatewayError):
    """Too many calls are in flight on this gateway; retry later."""

    code: ErrorCode = "busy"


class HandlerFailed(GatewayError):
    """The handler that ran the call raised (details stay in that environment's log)."""

    code: ErrorCode = "handler_error"


_BY_CODE: dict[str, type[GatewayError]] = {
    "bad_request": ProtocolError,
    "unknown_type": UnknownMessageType,
    "too_large": FrameTooLarge,
    "unauthorized": AuthError,
    "wrong_audience": WrongAudience,
    "revoked": TokenRevoked,
    "out_of_scope": OutOfScope,
    "forbidden": AccessDenied,
    "not_found": TargetNotFound,
    "no_route": RoutingError,
    "no_handler": NoHandler,
    "loop": RouteLoop,
    "hop_limit": HopLimitExceeded,
    "claimed": ClaimError,
    "timeout": GatewayTimeout,
    "cancelled": Cancelled,
    "unavailable": Unavailable,
    "busy": Busy,
    "handler_error": HandlerFailed,
    "internal": GatewayError,
}


def error_from_wire(code: str, message: str, environment_id: str | None = None) -> GatewayError:
    """The exception for an error that arrived as ``{code, message}``.

    Args:
        code: The wire code; unknown codes become a plain :class:`GatewayError`.
        message: The human message sent with it.
        environment_id: The environment that produced the error, when known.
    """
    cls = _BY_CODE.get(code, GatewayError)
    text = f"{environment_id}: {message}" if environment_id else message
    exc = cls(text)
    exc.environment_id = environment_id
    return exc
