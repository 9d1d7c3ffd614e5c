"""Wire messages: every frame becomes a message or a ProtocolError naming what is wrong (and
the request id when it could be read); errors cross the wire as codes only."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from gateway import errors
from gateway.protocol import Reply, Request, dump, parse_message


def test_roundtrip() -> None:
    msg = Request(requestId="r1", originalType="fs", originalAction="readFile", routePath=["a"])
    assert parse_message(dump(msg)) == msg
    assert parse_message(dump(msg).encode()) == msg


@pytest.mark.parametrize(
    ("frame", "cls", "text", "rid"),
    [
        ("not json", errors.ProtocolError, "not valid JSON", None),
        (b"\xff\xfe", errors.ProtocolError, "not valid JSON", None),
        ("[1, 2]", errors.ProtocolError, "not a JSON object", None),
        ('{"type": "rm -rf", "requestId": "q1"}', errors.UnknownMessageType, "unknown", "q1"),
        ('{"requestId": "q2"}', errors.UnknownMessageType, "None", "q2"),
        (
            '{"type": "executionGateway.request", "requestId": "q3", "originalType": "fs"}',
            errors.ProtocolError,
            "originalAction",
            "q3",
        ),
        (
            json.dumps(
                {
                    "type": "executionGateway.request",
                    "requestId": "q4",
                    "originalType": "fs",
                    "originalAction": "x",
                    "sneaky": 1,
                }
            ),
            errors.ProtocolError,
            "sneaky",
            "q4",
        ),
        (
            json.dumps(
                {
                    "type": "executionGateway.request",
                    "requestId": "q5",
                    "originalType": "fs",
                    "originalAction": "x",
                    "routePath": ["../../etc"],
                }
            ),
            errors.ProtocolError,
            "routePath",
            "q5",
        ),
        (
            '{"type": "heartbeat", "requestId": "' + "x" * 500 + '"}',
            errors.ProtocolError,
            "requestId",
            None,
        ),
    ],
)
def test_bad_frames(frame: str | bytes, cls: type, text: str, rid: str | None) -> None:
    with pytest.raises(cls, match=text) as info:
        parse_message(frame)
    assert info.value.request_id == rid
    assert isinstance(info.value, errors.GatewayError)


def test_reply_error_iff_failure() -> None:
    with pytest.raises(ValidationError):
        Reply(
            requestId="a", replyRequestId="b", success=True, error={"code": "busy", "message": ""}
        )  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Reply(requestId="a", replyRequestId="b", success=False)
    with pytest.raises(ValidationError):  # only codes of the closed set
        Reply(
            requestId="a",
            replyRequestId="b",
            success=False,
            error={"code": "os.error", "message": ""},
        )  # type: ignore[arg-type]


def test_every_code_maps_back_to_its_class() -> None:
    assert {c.code for c in _subclasses(errors.GatewayError)} | {"internal"} == errors.ERROR_CODES
    for code in errors.ERROR_CODES:
        exc = errors.error_from_wire(code, "boom", "env-b")
        assert exc.code == code or code in ("bad_request",)
        assert exc.environment_id == "env-b" and str(exc) == "env-b: boom"
    assert isinstance(errors.error_from_wire("timeout", "x"), TimeoutError)
    assert isinstance(errors.error_from_wire("not_found", "x"), LookupError)
    assert type(errors.error_from_wire("made-up", "x")) is errors.GatewayError


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def test_trusted_construction_equals_validated() -> None:
    from gateway.protocol import Partial, trusted

    fields = {"requestId": "a-1", "replyRequestId": "b-2", "success": True, "result": {"x": [1]}}
    assert trusted(Reply, **fields) == Reply(**fields)
    assert dump(trusted(Reply, **fields)) == dump(Reply(**fields))
    leg = {"requestId": "c", "originalType": "fs", "originalAction": "readFile", "routePath": ["a"]}
    assert dump(trusted(Request, **leg)) == dump(Request(**leg))
    assert trusted(Partial, replyRequestId="r", seq=2) == Partial(replyRequestId="r", seq=2)


def test_package_exports_resolve() -> None:
    import gateway

    for name in gateway.__all__:
        assert getattr(gateway, name) is not None
    with pytest.raises(AttributeError):
        _ = gateway.nothing_here
