"""Routing decisions, free of I/O: which rule applies to a call and where it goes next.

Everything here is a pure function of the configuration, the call's ``type``/``action``/
``routePath`` and the set of connected peers, so every precedence, wildcard, loop and hop-limit
case is testable without a socket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from .config import LocalRule, ProxyExecutionConfig, ProxyRule, Rule
from .errors import HopLimitExceeded, RouteLoop, RoutingError

__all__ = ["DEFAULT_RULE", "Decision", "RouteMatch", "Router", "specificity"]

DEFAULT_RULE = LocalRule(mode="local")


def specificity(key: str) -> int:
    """How specific a rule key is: ``type:action`` 3, ``type`` / ``type:*`` 2, ``*:action`` 1,
    ``*`` 0."""
    kind, _, action = key.partition(":")
    if kind == "*":
        return 1 if action not in ("", "*") else 0
    return 3 if action not in ("", "*") else 2


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The rule that applies to a call.

    Attributes:
        key: The matching rule key, or None for the built-in default (local).
        rule: The rule itself.
    """

    key: str | None
    rule: Rule

    @property
    def specificity(self) -> int:
        return -1 if self.key is None else specificity(self.key)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a call goes from this hop.

    Attributes:
        targets: Environments to send it to; empty means run it here.
        gather: Whether the results of all targets are gathered into one list (fan-out).
        rule_key: The rule that decided (None: the default, an explicit target, or no claim).
    """

    targets: tuple[str, ...]
    gather: bool = False
    rule_key: str | None = None

    @property
    def local(self) -> bool:
        return not self.targets


_LOCAL = Decision(())


class Router:
    """Matches calls against a :class:`ProxyExecutionConfig`.

    Args:
        config: The routing rules (default: everything local).
    """

    def __init__(self, config: ProxyExecutionConfig | None = None) -> None:
        self.config = config or ProxyExecutionConfig()
        self.hop_limit = self.config.hopLimit
        # One dict per specificity level, so a lookup is at most four dict probes.
        self._exact: dict[tuple[str, str], str] = {}
        self._by_type: dict[str, str] = {}
        self._by_action: dict[str, str] = {}
        self._star: str | None = None
        for key in self.config.rules:
            kind, _, action = key.partition(":")
            level = specificity(key)
            if level == 3:
                self._exact[kind, action] = key
            elif level == 2:
                self._by_type[kind] = key
            elif level == 1:
                self._by_action[action] = key
            else:
                self._star = key

    def match(self, kind: str, action: str) -> RouteMatch:
        """The most specific rule for ``kind:action`` (the default local rule if none)."""
        key = (
            self._exact.get((kind, action))
            or self._by_type.get(kind)
            or self._by_action.get(action)
            or self._star
        )
        if key is None:
            return RouteMatch(None, DEFAULT_RULE)
        return RouteMatch(key, self.config.rules[key])

    def explain(self) -> list[RouteMatch]:
        """Every rule, most specific first (ties by key), then the default."""
        rules = [RouteMatch(k, r) for k, r in self.config.rules.items()]
        rules.sort(key=lambda m: (-m.specificity, m.key or ""))
        return [*rules, RouteMatch(None, DEFAULT_RULE)]

    def check_path(self, route_path: Sequence[str], self_id: str) -> None:
        """Refuse a call arriving at ``self_id`` that loops or is over the hop limit.

        Raises:
            RouteLoop: ``self_id`` is already on the path.
            HopLimitExceeded: appending ``self_id`` would exceed the hop limit.
        """
        if self_id in route_path:
            raise RouteLoop(f"loop: {' -> '.join([*route_path, self_id])}")
        if len(route_path) + 1 > self.hop_limit:
            raise HopLimitExceeded(
                f"hop limit {self.hop_limit} exceeded: {' -> '.join([*route_path, self_id])}"
            )

    def decide(
        self,
        kind: str,
        action: str,
        route_path: Sequence[str],
        self_id: str,
        peers: Mapping[str, Set[str]],
        *,
        proxying: bool = True,
        target: str | None = None,
    ) -> Decision:
        """Where a call arriving at ``self_id`` goes next.

        Args:
            kind: The call's ``originalType``.
            action: The call's ``originalAction``.
            route_path: The hops so far, not including ``self_id``.
            self_id: This gateway's environment id.
            peers: Reachable environments -> the capabilities each declares.
            proxying: False while no plugin claims the gateway: everything runs here.
            target: The call's final destination, when the caller named one: run here if it
                is this gateway, send it straight there if it is a peer, else follow the rules
                towards it.

        Raises:
            RouteLoop, HopLimitExceeded: see :meth:`check_path`; also when every candidate
                target is already on the path.
            RoutingError: the rule names environments that are not connected, or the named
                target cannot be reached from here.
        """
        self.check_path(route_path, self_id)
        if target == self_id:
            return _LOCAL
        if not proxying:
            if target is not None:
                raise RoutingError(f"cannot reach {target!r}: no plugin claims {self_id!r}")
            return _LOCAL
        if target is not None and target in peers:
            if target in route_path:
                raise RouteLoop(f"loop: {' -> '.join([*route_path, self_id, target])}")
            return Decision((target,))
        found = self.match(kind, action)
        rule = found.rule
        if isinstance(rule, LocalRule):
            if target is not None:
                raise RoutingError(f"{target!r} is not reachable from {self_id!r}")
            return Decision((), rule_key=found.key)
        return Decision(
            self._targets(rule, found.key or "", route_path, self_id, peers),
            gather=rule.environments is not None or rule.fanout,
            rule_key=found.key,
        )

    @staticmethod
    def _targets(
        rule: ProxyRule,
        key: str,
        route_path: Sequence[str],
        self_id: str,
        peers: Mapping[str, Set[str]],
    ) -> tuple[str, ...]:
        path = [*route_path, self_id]
        if rule.capability is not None:
            able = sorted(p for p, caps in peers.items() if rule.capability in caps)
            fresh = [p for p in able if p not in path]
            if not fresh:
                why = "only on the path already" if able else "none connected"
                raise RoutingError(
                    f"rule {key!r}: no environment with capability {rule.capability!r} ({why})"
                )
            return tuple(fresh) if rule.fanout else (fresh[0],)
        names = [rule.environment] if rule.environment else list(rule.environments or ())
        for name in names:
            if name in path:
                raise RouteLoop(f"rule {key!r}: loop: {' -> '.join([*path, name])}")
            if name not in peers:
                raise RoutingError(f"rule {key!r}: environment {name!r} is not connected")
        return tuple(names)
