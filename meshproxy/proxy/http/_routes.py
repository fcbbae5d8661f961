"""Per-route authorization: a request's method and path against route rule tables.

A listener has up to two tables: the manifest's ``Mesh.Routes`` for its marble type and
the marble config's ``routes`` for the listener. A request must pass every table that
has rules, so the config can only narrow the manifest. In one table the first matching
rule decides; a request that no rule matches is refused (fail closed). Paths are
compared literally, so a path not in normal form is refused with 400 before any rule is
read. Sans-IO: plain values in, a ``Decision`` out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from meshproxy.config import MarbleConfig
from meshproxy.errors import PolicyError
from meshproxy.manifest import RouteRule, path_problem


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int  # 200 when allowed; 400 (bad path) or 403 when not
    reason: str
    route: str  # the rule that decided ("" when none did), for logs and metrics


@dataclass(frozen=True)
class RoutePolicy:
    tables: tuple[tuple[str, tuple[RouteRule, ...]], ...] = ()  # (where from, rules)

    @classmethod
    def of(cls, **tables: tuple[RouteRule, ...]) -> RoutePolicy:
        return cls(tuple((name, rules) for name, rules in tables.items() if rules))

    def decide(self, method: bytes, target: bytes, caller: str | None) -> Decision:
        if not self.tables:
            return Decision(True, 200, "no route rules", "")
        path = target.split(b"?", 1)[0].decode("latin-1")
        problem = path_problem(path)
        if problem:
            return Decision(False, 400, f"path {path!r} {problem}", "")
        verb = method.decode("latin-1")
        route = ""
        for source, rules in self.tables:
            rule = next((r for r in rules if r.matches(verb, path)), None)
            if rule is None:
                return Decision(False, 403, f"no {source} route rule matches {verb} {path}", "")
            route = rule.path or f"{rule.path_prefix}*"
            if caller is None or caller not in rule.allow:
                who = "an anonymous client" if caller is None else f"marble type {caller!r}"
                return Decision(False, 403, f"{source} route {route} does not allow {who}", route)
        return Decision(True, 200, "allowed", route)


class MeshRoutes(Protocol):
    """The activation's mesh policy (or the manifest's Mesh section): rules per type."""

    def routes_of(self, marble_type: str) -> tuple[RouteRule, ...]: ...


def resolve_routes(
    cfg: MarbleConfig, mesh: MeshRoutes, allow: Mapping[str, tuple[str, ...]]
) -> dict[str, RoutePolicy]:
    """Route policy per ``protocol: http`` listener: the manifest's rules, then the config's.

    A config rule may only name callers the listener admits at all (its resolved
    ``allow``); anything else refuses to start.
    """
    manifest_rules = mesh.routes_of(cfg.marble.type)
    out: dict[str, RoutePolicy] = {}
    for i, listener in enumerate(cfg.inbound):
        if listener.protocol != "http":
            continue
        admitted = allow.get(listener.name, ())
        extra = sorted({t for r in listener.routes for t in r.allow if t not in admitted})
        if extra:
            raise PolicyError(
                f"{cfg.source.name}: inbound[{i}] ({listener.name}): routes allow "
                f"{', '.join(extra)}, which may not call this listener at all (allowed: "
                f"{', '.join(admitted) or 'none'}); refusing to start"
            )
        rules = manifest_rules if listener.clients == "marbles" else ()
        out[listener.name] = RoutePolicy.of(manifest=rules, config=listener.routes)
    return out
