"""The sans-I/O protocol state: every hop, reply match, stream, notification, fan-out,
timeout, resend and cancellation decision, driven by hand with a fake clock and no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.actions import (
    CancelLocal,
    Deliver,
    DeliverNotification,
    DeliverPartial,
    NotifyLocal,
    Outcome,
    RunLocal,
    Send,
)
from gateway.config import parse_config
from gateway.limits import Limits
from gateway.protocol import Cancel, Notification, Partial, Reply, Request
from gateway.router import Router
from gateway.state import GatewayState


def node(env: str, rules: dict[str, Any] | None = None, **limits: Any) -> GatewayState:
    state = GatewayState(
        env, f"rt-{env}", Router(parse_config({"rules": rules or {}})), Limits(**limits)
    )
    state.proxying = True
    return state


def req(rid: str = "r1", path: list[str] | None = None, **kw: Any) -> Request:
    return Request(
        requestId=rid, originalType="fs", originalAction="readFile", routePath=path or ["x"], **kw
    )


def only(actions: list[Any], kind: type) -> Any:
    assert len(actions) == 1 and isinstance(actions[0], kind), actions
    return actions[0]


def test_local_request_runs_and_replies_once() -> None:
    a = node("a")
    run = only(a.receive_request("x", req(timeoutMs=5000), 0.0), RunLocal)
    assert run.key == ("x", "r1")
    assert a.receive_request("x", req(), 0.1) == []  # resend while running: not run twice
    send = only(a.local_done(run.key, Outcome(True, {"ok": 1}, None, "a")), Send)
    assert send.peer == "x" and isinstance(send.message, Reply)
    assert send.message.replyRequestId == "r1" and send.message.result == {"ok": 1}
    # a resend after completion is answered from the cache, not run again
    again = only(a.receive_request("x", req(), 0.2), Send)
    assert again.message == send.message
    assert a.local_done(run.key, Outcome(True, 2, None, "a")) == []  # late duplicate ignored


def test_proxy_leg_reply_matched_by_id_and_peer_only() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}})
    a.peer_up("b", [])
    send = only(a.receive_request("x", req(), 0.0), Send)
    leg = send.message
    assert send.peer == "b" and isinstance(leg, Request)
    assert leg.routePath == ["x", "a"] and leg.parentEnvironmentId == "a"
    assert leg.requestId != "r1"  # legs get fresh ids
    ok = Reply(requestId="z", replyRequestId=leg.requestId, success=True, result=7)
    assert a.receive_reply("c", ok) == []  # from a peer the leg was not sent to
    stray = Reply(requestId="z", replyRequestId="nope", success=True)
    assert a.receive_reply("b", stray) == []
    back = only(a.receive_reply("b", ok), Send)
    assert back.peer == "x" and back.message.replyRequestId == "r1" and back.message.result == 7
    assert back.message.environmentId == "b"
    assert a.receive_reply("b", ok) == []  # answered once


def test_three_hop_chain_with_stream_and_notifications_both_ways() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}})
    b = node("b", {"*": {"mode": "proxy", "environment": "c"}})
    c = node("c")
    a.peer_up("b", []), b.peer_up("a", []), b.peer_up("c", []), c.peer_up("b", [])
    rid, acts = a.call("fs", "readFile", {"path": "x"}, 0.0, timeout=10)
    to_b = only(acts, Send).message
    to_c = only(b.receive_request("a", to_b, 0.0), Send).message
    run = only(c.receive_request("b", to_c, 0.0), RunLocal)
    assert run.request.routePath == ["a", "b"] and run.request.originEnvironmentId == "a"
    assert run.request.originalMessage == {"path": "x"}

    # streamed partials flow back, renumbered per hop
    for i in range(3):
        p = only(c.local_partial(run.key, {"i": i}), Send).message
        p = only(b.receive_partial("c", p), Send).message
        assert isinstance(p, Partial) and p.seq == i
        got = only(a.receive_partial("b", p), DeliverPartial)
        assert got.request_id == rid and got.partial.result == {"i": i}
        assert got.partial.environmentId == "c"

    # progress up ...
    n = only(c.local_notify(run.key, "progress", 50), Send).message
    n = only(b.receive_notification("c", n), Send).message
    up = only(a.receive_notification("b", n), DeliverNotification)
    assert up.request_id == rid and up.notification.result == 50
    assert up.notification.environmentId == "c"
    # ... and down to the running handler
    d = only(a.notify_down(rid, "input", "y"), Send).message
    d = only(b.receive_notification("a", d), Send).message
    down = only(c.receive_notification("b", d), NotifyLocal)
    assert down.key == run.key and down.notification.result == "y"
    # a neighbour-only notification is for this process
    hello = Notification(originalType="log", result="hi")
    assert only(a.receive_notification("b", hello), DeliverNotification).peer == "b"

    r = only(c.local_done(run.key, Outcome(True, "done", None, "c")), Send).message
    r = only(b.receive_reply("c", r), Send).message
    final = only(a.receive_reply("b", r), Deliver)
    assert final.request_id == rid and final.outcome.result == "done"
    assert final.outcome.environment_id == "c"
    assert a.inflight == b.inflight == c.inflight == 0


def test_fan_out_gathers_in_rule_order_with_failures() -> None:
    a = node("a", {"*": {"mode": "proxy", "environments": ["d", "b", "c"]}})
    for p in "bcd":
        a.peer_up(p, [])
    sends = a.receive_request("x", req(), 0.0)
    assert [s.peer for s in sends] == ["d", "b", "c"]
    legs = {s.peer: s.message.requestId for s in sends}
    assert (
        a.receive_reply(
            "b", Reply(requestId="1", replyRequestId=legs["b"], success=True, result="B")
        )
        == []
    )
    err = {"code": "not_found", "message": "nope"}
    assert (
        a.receive_reply(
            "c", Reply(requestId="2", replyRequestId=legs["c"], success=False, error=err)
        )
        == []
    )  # type: ignore[arg-type]
    out = only(
        a.receive_reply(
            "d", Reply(requestId="3", replyRequestId=legs["d"], success=True, result="D")
        ),
        Send,
    )
    gathered = out.message.result
    assert [g["environmentId"] for g in gathered] == ["d", "b", "c"]
    assert [g["result"] for g in gathered] == ["D", "B", None]
    assert gathered[2]["error"]["code"] == "not_found" and not gathered[2]["success"]


def test_execution_timeout_cancels_local_and_downstream() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}})
    a.peer_up("b", [])
    leg = only(a.receive_request("x", req(timeoutMs=1500), 0.0), Send).message
    assert leg.timeoutMs == 1500
    assert a.next_deadline() == 1.5
    assert a.tick(1.4) == []
    acts = a.tick(1.5)
    cancel = next(x for x in acts if isinstance(x.message, Cancel))
    assert cancel.peer == "b" and cancel.message.requestId == leg.requestId
    reply = next(x for x in acts if isinstance(x.message, Reply)).message
    assert reply.error.code == "timeout"
    # local handler: cancelled too
    c = node("c")
    run = only(c.receive_request("x", req(timeoutMs=100), 0.0), RunLocal)
    acts = c.tick(0.2)
    assert any(isinstance(x, CancelLocal) and x.key == run.key for x in acts)
    assert c.next_deadline() is None


def test_budget_shrinks_along_the_path() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}})
    a.peer_up("b", [])
    leg = only(a.receive_request("x", req(timeoutMs=2000), 10.0), Send).message
    assert leg.timeoutMs == 2000
    a2 = node("a2", {"*": {"mode": "proxy", "environment": "b"}})
    a2.peer_up("b", [])
    _rid, acts = a2.call("fs", "readFile", {}, 5.0, timeout=1.25)
    assert only(acts, Send).message.timeoutMs == 1250


def test_lost_hop_resend_on_reconnect_or_unavailable_after_grace() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}}, transport_timeout=2.0)
    a.peer_up("b", [])
    leg = only(a.receive_request("x", req(timeoutMs=60_000), 0.0), Send).message
    assert a.peer_down("b", 1.0) == []
    # back within the grace: the unanswered request is resent with the same id
    resent = only(a.peer_up("b", []), Send)
    assert resent.message == leg
    assert a.tick(3.5) == []  # the old grace timer is stale
    # lost again and not back in time: unavailable
    a.peer_down("b", 4.0)
    assert a.tick(5.9) == []
    out = only(a.tick(6.0), Send).message
    assert out.error.code == "unavailable" and "b disconnected" in out.error.message
    # the peer is forgotten after the grace: new calls are refused, not held
    err = only(a.receive_request("x", req("r2"), 7.0), Send).message
    assert err.error.code == "no_route"


def test_request_to_a_lost_peer_is_held_then_sent() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}}, transport_timeout=5.0)
    a.peer_up("b", [])
    a.peer_down("b", 0.0)
    assert a.receive_request("x", req(timeoutMs=60_000), 1.0) == []  # held
    sent = only(a.peer_up("b", []), Send)
    assert sent.message.originalType == "fs"


def test_cancel_propagates_and_caches_cancelled() -> None:
    a = node("a", {"*": {"mode": "proxy", "environments": ["b", "c"]}})
    a.peer_up("b", []), a.peer_up("c", [])
    legs = a.receive_request("x", req(), 0.0)
    acts = a.receive_cancel("x", Cancel(requestId="r1"))
    assert sorted((s.peer, s.message.requestId) for s in acts) == sorted(
        (s.peer, s.message.requestId) for s in legs
    )
    assert all(isinstance(s.message, Cancel) for s in acts)
    assert a.inflight == 0
    cached = only(a.receive_request("x", req(), 1.0), Send).message
    assert cached.error.code == "cancelled"
    # local call by this process
    b = node("b")
    rid, acts = b.call("fs", "readFile", {}, 0.0)
    run = only(acts, RunLocal)
    assert only(b.cancel(rid), CancelLocal).key == run.key
    assert b.local_done(run.key, Outcome(True)) == []


def test_refusals_reply_with_codes() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}}, max_inflight=1)
    a.peer_up("b", [])
    looped = req("loop", path=["a", "x"])  # came back to a
    assert only(a.receive_request("x", looped, 0), Send).message.error.code == "loop"
    assert (
        only(a.receive_request("b", req("back", path=["b"]), 0), Send).message.error.code == "loop"
    )
    only(a.receive_request("x", req("first"), 0), Send)
    busy = only(a.receive_request("x", req("second"), 0), Send).message
    assert busy.error.code == "busy"
    limited = GatewayState("z", "rt", Router(parse_config({"hopLimit": 2})))
    hop = only(limited.receive_request("q", req("h", path=["p", "q"]), 0), Send).message
    assert hop.error.code == "hop_limit"


def test_unclaimed_gateway_runs_everything_locally() -> None:
    a = node("a", {"*": {"mode": "proxy", "environment": "b"}})
    a.peer_up("b", [])
    a.proxying = False
    only(a.receive_request("x", req(), 0), RunLocal)


def test_done_cache_and_timer_heap_stay_bounded() -> None:
    a = node("a", done_cache=10)
    for i in range(5000):
        run = only(a.receive_request("x", req(f"r{i}", timeoutMs=60_000), float(i)), RunLocal)
        a.local_done(run.key, Outcome(True))
    assert a.remembered_replies == 10
    assert a.armed_timers <= 1024 + 1
    assert a.next_deadline() is None


def test_call_via_bypasses_rules() -> None:
    a = node("a")  # rules say local
    a.peer_up("hub", [])
    _rid, acts = a.call("fs", "readFile", {}, 0.0, via="hub", target="far")
    msg = only(acts, Send).message
    assert msg.target == "far" and msg.routePath == ["a"]
    with pytest.raises(AssertionError):
        only(a.call("fs", "readFile", {}, 0.0, via="nobody")[1], Send)


@pytest.mark.parametrize(
    "spoof",
    [
        {"routePath": []},
        {"routePath": ["y"]},  # does not end with the sender
        {"routePath": ["x"], "originEnvironmentId": "admin"},
        {"routePath": ["o", "x"], "parentEnvironmentId": "o"},
    ],
)
def test_a_peer_cannot_spoof_the_path(spoof: dict[str, Any]) -> None:
    a = node("a")
    fields = {"requestId": "s1", "originalType": "fs", "originalAction": "readFile", **spoof}
    out = only(a.receive_request("x", Request(**fields), 0), Send).message
    assert out.error.code == "bad_request" and a.inflight == 0


@pytest.mark.parametrize(
    ("kind", "action", "kw"),
    [
        ("a b", "x", {}),
        ("fs", "", {}),
        ("fs", "x", {"target": "../etc"}),
        ("fs", "x", {"timeout": 1e9}),
    ],
)
def test_bad_call_arguments_are_refused_before_anything_is_sent(
    kind: str, action: str, kw: dict[str, Any]
) -> None:
    from gateway.errors import ProtocolError

    a = node("a")
    with pytest.raises(ProtocolError, match="invalid call"):
        a.call(kind, action, {}, 0.0, **kw)
    assert a.inflight == 0


def test_rules_of_one_peer_route_only_that_peers_calls() -> None:
    """A hub routes one runtime's calls by rules of their own (a hybrid run's): its fs calls
    go on to the tools node, every other peer's and every other kind keep the node's rules."""
    hub = node("hub", {"exec": {"mode": "proxy", "environment": "elsewhere"}})
    for peer in ("run-env", "other-env", "tools", "elsewhere"):
        hub.peer_up(peer, [])
    hub.peer_routers["run-env"] = Router(
        parse_config(
            {
                "rules": {
                    "exec": {"mode": "proxy", "environment": "elsewhere"},
                    "fs": {"mode": "proxy", "environment": "tools"},
                }
            }
        )
    )
    to_tools = only(hub.receive_request("run-env", req("r1", ["agent", "run-env"]), 0.0), Send)
    assert to_tools.peer == "tools" and to_tools.message.routePath == ["agent", "run-env", "hub"]
    only(hub.receive_request("other-env", req("r2", ["other-env"]), 0.0), RunLocal)
    exec_call = Request(
        requestId="r3", originalType="exec", originalAction="run", routePath=["run-env"]
    )
    ran = only(hub.receive_request("run-env", exec_call, 0.0), Send)
    assert ran.peer == "elsewhere"
    # the peer's rules are checked like the node's: a loop back to the caller is refused
    hub.peer_routers["run-env"] = Router(
        parse_config({"rules": {"fs": {"mode": "proxy", "environment": "run-env"}}})
    )
    refused = only(hub.receive_request("run-env", req("r4", ["run-env"]), 0.0), Send)
    assert isinstance(refused.message, Reply) and refused.message.error is not None
    assert refused.message.error.code == "loop"
    del hub.peer_routers["run-env"]
    only(hub.receive_request("run-env", req("r5", ["run-env"]), 0.0), RunLocal)


def test_calls_with_names_seen_before_are_still_checked() -> None:
    """A second call with the same names is validated like the first (payload, budget)."""
    from gateway.errors import ProtocolError as _ProtocolError

    st = GatewayState("a", "rt-a")
    for _ in range(2):
        rid, _actions = st.call("fs", "read", {"p": 1}, 0.0)
        assert rid
    payload = {"p": [1]}
    _, actions = st.call("fs", "read", payload, 0.0)
    run = actions[0]
    assert isinstance(run, RunLocal)
    assert run.request.originalMessage == payload
    assert run.request.originalMessage is not payload  # copied, as validation does
    for bad in ({1: "x"}, ["not", "a", "dict"]):
        with pytest.raises(_ProtocolError, match="invalid call fs:read"):
            st.call("fs", "read", bad, 0.0)  # type: ignore[arg-type]
    with pytest.raises(_ProtocolError, match="timeoutMs"):
        st.call("fs", "read", {}, 0.0, timeout=10**9)
    with pytest.raises(_ProtocolError, match="invalid call"):
        st.call("fs", "bad name!", {}, 0.0)
