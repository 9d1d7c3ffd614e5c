"""The sans-I/O router, without sockets: precedence, wildcards, loops, hop limit, targets."""

from __future__ import annotations

import itertools

import pytest

from gateway.config import ProxyExecutionConfig, parse_config
from gateway.errors import HopLimitExceeded, RouteLoop, RoutingError
from gateway.router import Router, specificity

KEYS = ["fs:readFile", "fs", "*:readFile", "*"]


def _router(keys: list[str], **extra: object) -> Router:
    rules = {k: {"mode": "proxy", "environment": f"env-{i}"} for i, k in enumerate(keys)}
    return Router(parse_config({"rules": rules, **extra}))


@pytest.mark.parametrize("subset", [s for n in range(5) for s in itertools.combinations(KEYS, n)])
def test_most_specific_rule_wins_for_every_subset(subset: tuple[str, ...]) -> None:
    router = _router(list(subset))
    expected_order = sorted(subset, key=specificity, reverse=True)
    calls = {
        ("fs", "readFile"): [k for k in expected_order],
        ("fs", "writeFile"): [k for k in expected_order if k in ("fs", "*")],
        ("git", "readFile"): [k for k in expected_order if k in ("*:readFile", "*")],
        ("git", "push"): [k for k in expected_order if k == "*"],
    }
    for (kind, action), candidates in calls.items():
        found = router.match(kind, action)
        assert found.key == (candidates[0] if candidates else None), (subset, kind, action)
        if found.key is None:
            assert found.rule.mode == "local"


def test_type_star_is_the_same_as_type() -> None:
    router = Router(parse_config({"rules": {"fs:*": {"mode": "proxy", "environment": "b"}}}))
    assert router.match("fs", "anything").key == "fs:*"
    assert router.match("fsx", "anything").key is None
    assert specificity("fs:*") == specificity("fs") == 2
    assert specificity("*:*") == specificity("*") == 0


def test_explain_lists_by_precedence_then_default() -> None:
    keys = [m.key for m in _router(["*", "fs", "fs:readFile", "*:readFile", "git"]).explain()]
    assert keys == ["fs:readFile", "fs", "git", "*:readFile", "*", None]


PEERS = {"b": frozenset({"llm"}), "c": frozenset({"llm", "gpu"}), "d": frozenset()}


def _decide(router: Router, path: list[str], **kw: object) -> tuple[str, ...]:
    return router.decide("x", "y", path, "a", PEERS, **kw).targets  # type: ignore[arg-type]


def test_default_is_local_and_unclaimed_never_proxies() -> None:
    assert _decide(Router(), []) == ()
    router = _router(["*"])  # env-0, not connected
    with pytest.raises(RoutingError, match="env-0"):
        _decide(router, [])
    assert _decide(router, [], proxying=False) == ()
    with pytest.raises(RoutingError, match="no plugin claims"):
        _decide(router, [], proxying=False, target="b")


def test_named_fan_out_and_capability_targets() -> None:
    cfg = {
        "rules": {
            "x:y": {"mode": "proxy", "environments": ["d", "b"]},
            "cap": {"mode": "proxy", "capability": "llm"},
            "all": {"mode": "proxy", "capability": "llm", "fanout": True},
            "gpu": {"mode": "proxy", "capability": "gpu"},
            "none": {"mode": "proxy", "capability": "tpu"},
        }
    }
    router = Router(parse_config(cfg))
    fan = router.decide("x", "y", [], "a", PEERS)
    assert fan.targets == ("d", "b") and fan.gather and fan.rule_key == "x:y"
    assert router.decide("cap", "q", [], "a", PEERS).targets == ("b",)  # first by id
    # b is on the path already: the next one that declares the capability
    assert router.decide("cap", "q", ["b"], "a", PEERS).targets == ("c",)
    both = router.decide("all", "q", [], "a", PEERS)
    assert both.targets == ("b", "c") and both.gather
    assert router.decide("gpu", "q", [], "a", PEERS).targets == ("c",)
    with pytest.raises(RoutingError, match="none connected"):
        router.decide("none", "q", [], "a", PEERS)
    with pytest.raises(RoutingError, match="only on the path"):
        router.decide("gpu", "q", ["c"], "a", PEERS)


def test_loops_are_refused() -> None:
    router = Router(parse_config({"rules": {"*": {"mode": "proxy", "environment": "b"}}}))
    with pytest.raises(RouteLoop, match="b -> a"):
        router.decide("x", "y", ["b"], "a", PEERS)  # would go back to b
    with pytest.raises(RouteLoop, match="a -> c -> a"):
        router.decide("x", "y", ["a", "c"], "a", PEERS)  # arrived here twice
    with pytest.raises(RouteLoop):
        router.decide("x", "y", ["c"], "a", PEERS, target="c")


@pytest.mark.parametrize("limit", [1, 2, 5, 8])
def test_hop_limit(limit: int) -> None:
    router = Router(ProxyExecutionConfig(hopLimit=limit))
    ok_path = [f"n{i}" for i in range(limit - 1)]
    assert router.decide("x", "y", ok_path, "a", PEERS).local
    with pytest.raises(HopLimitExceeded, match=f"hop limit {limit}"):
        router.decide("x", "y", [*ok_path, "extra"], "a", PEERS)


def test_explicit_target() -> None:
    router = Router(parse_config({"rules": {"*": {"mode": "proxy", "environment": "b"}}}))
    assert router.decide("x", "y", [], "a", PEERS, target="a").local
    assert router.decide("x", "y", [], "a", PEERS, target="c").targets == ("c",)
    # not a neighbour: follow the rules towards it (the next hop carries the target on)
    assert router.decide("x", "y", [], "a", PEERS, target="far").targets == ("b",)
    with pytest.raises(RoutingError, match="not reachable"):
        Router().decide("x", "y", [], "a", PEERS, target="far")
