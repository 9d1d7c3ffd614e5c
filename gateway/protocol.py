"""Wire messages of the gateway: pydantic models discriminated on ``type``, JSON over WebSocket.

Gateway-to-gateway messages:

* ``executionGateway.hello`` / ``executionGateway.welcome`` — who is on each end of a fresh
  connection and which capabilities it declares (the token says who may connect; hello says what
  the peer offers).
* ``executionGateway.request`` — one capability call, carrying its ``routePath``.
* ``executionGateway.partial`` — a streamed partial result of a request, before its reply.
* ``executionGateway.reply`` — the final answer, matched to its request by ``replyRequestId``.
* ``executionGateway.notification`` — progress and logs, in either direction along a request's
  path (``requestId`` set) or to the neighbour only (``requestId`` null).
* ``executionGateway.cancel`` — the caller gives up on a request.

Provider-facing messages (``providerStart``, ``providerAgentStart``, ``providerStop``,
``providerReadFile``, ``providerWriteFile``, ``providerDeleteFile``, ``heartbeat``) are each
answered by ``<type>Response``.

Every model forbids extra fields; errors travel as ``{code, message}`` with a code from
:data:`gateway.errors.ERROR_CODES`. :func:`parse_message` turns any frame into a message or a
:class:`~gateway.errors.ProtocolError` that still knows the ``requestId`` when it could be read,
so the caller can answer with an error reply instead of dropping the frame.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from narrative.errors import validation_problem
from narrative.jsonio import parse_json

from .errors import ErrorCode, ProtocolError, UnknownMessageType

__all__ = [
    "ENV_ID_PATTERN",
    "PROVIDER_TYPES",
    "Cancel",
    "ErrorBody",
    "Heartbeat",
    "HeartbeatResponse",
    "Hello",
    "Message",
    "Notification",
    "Partial",
    "ProviderAgentStart",
    "ProviderAgentStartResponse",
    "ProviderDeleteFile",
    "ProviderDeleteFileResponse",
    "ProviderMessage",
    "ProviderReadFile",
    "ProviderReadFileResponse",
    "ProviderResponse",
    "ProviderStart",
    "ProviderStartResponse",
    "ProviderStop",
    "ProviderStopResponse",
    "ProviderWriteFile",
    "ProviderWriteFileResponse",
    "Reply",
    "Request",
    "Welcome",
    "check_sender",
    "dump",
    "parse_message",
    "trusted",
]

#: Environment and runtime ids: short, printable, safe in logs and file names.
ENV_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_PATTERN = r"^[A-Za-z0-9_*][A-Za-z0-9._-]{0,63}$"
_REQ_ID_PATTERN = r"^[A-Za-z0-9._:/-]{1,128}$"

EnvId = Annotated[str, Field(pattern=ENV_ID_PATTERN)]
ReqId = Annotated[str, Field(pattern=_REQ_ID_PATTERN)]
Name = Annotated[str, Field(pattern=_NAME_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    """An error as it crosses the wire: a closed code and a human message."""

    code: ErrorCode
    """One of :data:`gateway.errors.ERROR_CODES`."""
    message: Annotated[str, Field(max_length=4096)]
    """One line for a human; never a traceback or a class path."""


class Hello(_Model):
    """First message of a connection, from the side that dialled."""

    type: Literal["executionGateway.hello"] = "executionGateway.hello"
    environmentId: EnvId
    """The dialling environment; must equal the environment in its token."""
    runtimeId: EnvId
    """The process (gateway runtime) within that environment."""
    capabilities: Annotated[list[Name], Field(max_length=256)] = []
    """Capabilities the environment declares (targets of capability rules)."""


class Welcome(_Model):
    """The accepting side's answer to :class:`Hello`."""

    type: Literal["executionGateway.welcome"] = "executionGateway.welcome"
    environmentId: EnvId
    runtimeId: EnvId
    capabilities: Annotated[list[Name], Field(max_length=256)] = []


class Request(_Model):
    """One capability call on its way to where it runs."""

    type: Literal["executionGateway.request"] = "executionGateway.request"
    requestId: ReqId
    """Unique per hop; a resend with the same id is answered once (idempotent)."""
    originalType: Name
    """Capability family, e.g. ``fs``."""
    originalAction: Name
    """Action within it, e.g. ``readFile``."""
    originalMessage: dict[str, Any] = {}
    """The call's payload, passed to the handler untouched."""
    routePath: Annotated[list[EnvId], Field(max_length=64)] = []
    """Environments the call went through so far, origin first; each hop appends itself."""
    originRuntimeId: EnvId | None = None
    originEnvironmentId: EnvId | None = None
    parentRuntimeId: EnvId | None = None
    """The runtime of the previous hop."""
    parentEnvironmentId: EnvId | None = None
    """The environment of the previous hop."""
    timeoutMs: Annotated[int, Field(gt=0, le=86_400_000)] | None = None
    """Execution budget left, in milliseconds; each hop passes on what remains."""
    target: EnvId | None = None
    """Run in exactly this environment (bypasses the routing rules), when set."""


class Reply(_Model):
    """The final answer to a request."""

    type: Literal["executionGateway.reply"] = "executionGateway.reply"
    requestId: ReqId
    """This reply's own id."""
    replyRequestId: ReqId | None
    """The request answered; null only for a frame too broken to name its request."""
    success: bool
    result: Any = None
    error: ErrorBody | None = None
    environmentId: EnvId | None = None
    """The environment that produced the outcome."""

    @model_validator(mode="after")
    def _error_iff_failure(self) -> Self:
        if self.success == (self.error is not None):
            raise ValueError("a reply has an error exactly when success is false")
        return self


class Partial(_Model):
    """A streamed partial result of a request; zero or more come before its reply."""

    type: Literal["executionGateway.partial"] = "executionGateway.partial"
    replyRequestId: ReqId
    seq: Annotated[int, Field(ge=0)]
    """Position in the producer's stream, from 0."""
    result: Any = None
    environmentId: EnvId | None = None


class Notification(_Model):
    """Progress or logs; both directions."""

    type: Literal["executionGateway.notification"] = "executionGateway.notification"
    originalType: Name
    """What kind of notification (``progress``, ``log``, ...)."""
    result: Any = None
    requestId: ReqId | None = None
    """The request it concerns (routed along its path), or null for the neighbour only."""
    environmentId: EnvId | None = None


class Cancel(_Model):
    """The caller gives up on a request; the callee stops work and sends nothing more."""

    type: Literal["executionGateway.cancel"] = "executionGateway.cancel"
    requestId: ReqId


# ----------------------------------------------------------------------------- provider-facing


class ProviderStart(_Model):
    """Start (or resume) the provider's environment."""

    type: Literal["providerStart"] = "providerStart"
    requestId: ReqId
    options: dict[str, Any] = {}


class ProviderAgentStart(_Model):
    """Start an agent inside the environment."""

    type: Literal["providerAgentStart"] = "providerAgentStart"
    requestId: ReqId
    agent: Annotated[str, Field(max_length=256)]
    options: dict[str, Any] = {}


class ProviderStop(_Model):
    """Stop the provider's environment."""

    type: Literal["providerStop"] = "providerStop"
    requestId: ReqId


class ProviderReadFile(_Model):
    """Read one file below the root."""

    type: Literal["providerReadFile"] = "providerReadFile"
    requestId: ReqId
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    encoding: Literal["utf-8", "base64"] = "utf-8"


class ProviderWriteFile(_Model):
    """Write one file below the root (parents created)."""

    type: Literal["providerWriteFile"] = "providerWriteFile"
    requestId: ReqId
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    content: str
    encoding: Literal["utf-8", "base64"] = "utf-8"


class ProviderDeleteFile(_Model):
    """Delete one file below the root."""

    type: Literal["providerDeleteFile"] = "providerDeleteFile"
    requestId: ReqId
    path: Annotated[str, Field(min_length=1, max_length=4096)]


class Heartbeat(_Model):
    """Liveness probe; answered at once without touching any handler."""

    type: Literal["heartbeat"] = "heartbeat"
    requestId: ReqId
    timestamp: float | None = None


class _ResponseBase(_Model):
    requestId: ReqId
    """The id of the provider message answered."""
    success: bool
    result: Any = None
    error: ErrorBody | None = None

    @model_validator(mode="after")
    def _error_iff_failure(self) -> Self:
        if self.success == (self.error is not None):
            raise ValueError("a response has an error exactly when success is false")
        return self


class ProviderStartResponse(_ResponseBase):
    """Answer to :class:`ProviderStart`."""

    type: Literal["providerStartResponse"] = "providerStartResponse"


class ProviderAgentStartResponse(_ResponseBase):
    """Answer to :class:`ProviderAgentStart`."""

    type: Literal["providerAgentStartResponse"] = "providerAgentStartResponse"


class ProviderStopResponse(_ResponseBase):
    """Answer to :class:`ProviderStop`."""

    type: Literal["providerStopResponse"] = "providerStopResponse"


class ProviderReadFileResponse(_ResponseBase):
    """Answer to :class:`ProviderReadFile`."""

    type: Literal["providerReadFileResponse"] = "providerReadFileResponse"


class ProviderWriteFileResponse(_ResponseBase):
    """Answer to :class:`ProviderWriteFile`."""

    type: Literal["providerWriteFileResponse"] = "providerWriteFileResponse"


class ProviderDeleteFileResponse(_ResponseBase):
    """Answer to :class:`ProviderDeleteFile`."""

    type: Literal["providerDeleteFileResponse"] = "providerDeleteFileResponse"


class HeartbeatResponse(_ResponseBase):
    """Answer to :class:`Heartbeat`."""

    type: Literal["heartbeatResponse"] = "heartbeatResponse"


ProviderMessage = (
    ProviderStart
    | ProviderAgentStart
    | ProviderStop
    | ProviderReadFile
    | ProviderWriteFile
    | ProviderDeleteFile
    | Heartbeat
)
ProviderResponse = (
    ProviderStartResponse
    | ProviderAgentStartResponse
    | ProviderStopResponse
    | ProviderReadFileResponse
    | ProviderWriteFileResponse
    | ProviderDeleteFileResponse
    | HeartbeatResponse
)
#: Provider message type -> its response class.
PROVIDER_TYPES: dict[str, type[_ResponseBase]] = {
    "providerStart": ProviderStartResponse,
    "providerAgentStart": ProviderAgentStartResponse,
    "providerStop": ProviderStopResponse,
    "providerReadFile": ProviderReadFileResponse,
    "providerWriteFile": ProviderWriteFileResponse,
    "providerDeleteFile": ProviderDeleteFileResponse,
    "heartbeat": HeartbeatResponse,
}

Message = Annotated[
    Hello
    | Welcome
    | Request
    | Reply
    | Partial
    | Notification
    | Cancel
    | ProviderMessage
    | ProviderResponse,
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
_VALIDATE_JSON = _ADAPTER.validator.validate_json
_KNOWN_TYPES = frozenset(
    {"executionGateway." + t for t in ("hello", "welcome", "request", "reply", "partial")}
    | {"executionGateway.notification", "executionGateway.cancel"}
    | set(PROVIDER_TYPES)
    | {t + "Response" for t in PROVIDER_TYPES}
)


def parse_message(frame: str | bytes) -> Message:
    """Parse and validate one frame.

    Raises:
        UnknownMessageType: the frame is a JSON object whose ``type`` is not spoken here.
        ProtocolError: anything else wrong (not JSON, not an object, invalid fields); its
            ``request_id`` is set when the frame named one.
    """
    try:
        # the core validator itself: TypeAdapter.validate_json's Python wrapper costs as much
        # again per frame (same defaults, same result)
        return _VALIDATE_JSON(frame)  # type: ignore[no-any-return]
    except ValidationError as exc:
        # The fast path failed; look again, slowly, to say precisely what is wrong.
        raise _diagnose(frame, exc) from None


def _diagnose(frame: str | bytes, exc: ValidationError) -> ProtocolError:
    try:
        data = parse_json(frame)
    except ValueError:
        return ProtocolError("frame is not valid JSON")
    if not isinstance(data, dict):
        return ProtocolError("frame is not a JSON object")
    rid = data.get("requestId")
    request_id = rid if isinstance(rid, str) and len(rid) <= 128 else None
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _KNOWN_TYPES:
        shown = repr(kind)[:80]
        return UnknownMessageType(f"unknown message type {shown}", request_id=request_id)
    problem = validation_problem(exc, "message", skip=1)
    return ProtocolError(f"invalid {kind}: {problem}", request_id=request_id)


M = TypeVar("M", bound=BaseModel)

#: model class -> its fields in order, each with its default and whether that default must be
#: made afresh for each message (a factory or a mutable container, as pydantic does)
_PLANS: dict[type[BaseModel], tuple[tuple[str, Any, bool], ...]] = {}


def _plan(cls: type[BaseModel]) -> tuple[tuple[str, Any, bool], ...]:
    plan = tuple(
        (
            name,
            info.get_default(call_default_factory=True),
            info.default_factory is not None or isinstance(info.default, list | dict | set),
        )
        for name, info in cls.model_fields.items()
    )
    _PLANS[cls] = plan
    return plan


def trusted(cls: type[M], **fields: Any) -> M:
    """Build a message from values this process already holds validated, without validating
    again (what ``model_construct`` does, at a fraction of its cost: a reply per call is the hot
    path). Never use it for data that came from outside.
    """
    plan = _PLANS.get(cls) or _plan(cls)
    data = {
        name: fields[name]
        if name in fields
        else (cls.model_fields[name].get_default(call_default_factory=True) if fresh else default)
        for name, default, fresh in plan
    }
    message = cls.__new__(cls)
    object.__setattr__(message, "__dict__", data)
    object.__setattr__(message, "__pydantic_fields_set__", set(fields))
    object.__setattr__(message, "__pydantic_extra__", None)
    object.__setattr__(message, "__pydantic_private__", None)
    return message


def check_sender(peer: str, request: Request) -> None:
    """Check that a request received from the neighbour ``peer`` names it as its sender.

    Raises:
        ProtocolError: ``routePath`` does not end with ``peer``, or the origin/parent ids
            disagree with it.
    """
    # Each hop appends itself before forwarding, so the path must end with the sender and
    # start with the origin: a peer cannot hide a loop or speak for another environment.
    path = request.routePath
    if not path or path[-1] != peer:
        raise ProtocolError(
            f"routePath must end with the sending environment {peer!r}",
            request_id=request.requestId,
        )
    if request.originEnvironmentId not in (
        None,
        path[0],
    ) or request.parentEnvironmentId not in (
        None,
        peer,
    ):
        raise ProtocolError(
            "originEnvironmentId/parentEnvironmentId disagree with routePath",
            request_id=request.requestId,
        )


def dump(message: BaseModel) -> str:
    """Serialize a message to its JSON frame (defaults included, so every field is explicit)."""
    # what model_dump_json does with its defaults, without its wrapper (once per frame sent)
    return type(message).__pydantic_serializer__.to_json(message).decode()
