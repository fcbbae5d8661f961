"""``TLS`` tags (MarbleRun Transparent TLS) and our ``Mesh`` section.

The ``Mesh`` section is where meshproxy goes beyond MarbleRun: the SPIFFE trust domain,
the marble certificate lifetime, which marble types may call which, and per-route rules
for HTTP listeners. An absent ``Allow`` entry means nobody may call that marble type
(fail closed).

``Routes`` narrows ``Allow`` per request on ``protocol: http`` listeners::

    "Routes": {"backend": [
        {"Path": "/shop.Cart/Checkout", "Allow": ["frontend"]},
        {"PathPrefix": "/admin", "Methods": ["GET"], "Allow": ["ops"]},
        {"PathPrefix": "/", "Allow": ["frontend", "ops"]}]}

The first rule whose path and methods match a request decides: the caller's marble type
must be in its ``Allow``. A marble type with rules refuses requests that no rule matches
(403, or gRPC status 7 PERMISSION_DENIED); one without rules lets every caller that
``Allow`` admits send any request. A rule can only narrow ``Allow``: its callers must be
listed there too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshproxy.config import Node, parse_duration
from meshproxy.manifest._model import (
    CERT_TYPES,
    DEFAULT_CERTIFICATE_LIFETIME,
    DEFAULT_TRUST_DOMAIN,
    Marble,
    MeshSection,
    RouteRule,
    SecretSpec,
    TLSEntry,
    TLSTag,
    path_problem,
)
from meshproxy.manifest._read import frozen, opt_bool, opt_str, present, suggest

_ENTRY_KEYS = ("Port", "Addr", "Cert", "DisableClientAuth")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_RULE_KEYS = ("Path", "PathPrefix", "Methods", "Allow")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")
_MIN_LIFETIME = 60.0
_MAX_LIFETIME = 365 * 86400.0


def parse_tls(node: Node | None, secrets: Mapping[str, SecretSpec]) -> dict[str, TLSTag]:
    if node is None:
        return {}
    tags: dict[str, TLSTag] = {}
    for name, child in node.items().items():
        fields = child.mapping(("Outgoing", "Incoming"), case_insensitive=True)
        outgoing = present(fields, "Outgoing")
        incoming = present(fields, "Incoming")
        tags[name] = TLSTag(
            outgoing=tuple(_outgoing(n) for n in outgoing.list()) if outgoing else (),
            incoming=tuple(_incoming(n, secrets) for n in incoming.list()) if incoming else (),
        )
    return tags


def _entry(node: Node) -> tuple[dict[str, Node], TLSEntry]:
    fields = node.mapping(_ENTRY_KEYS, case_insensitive=True)
    entry = TLSEntry(
        port=opt_str(fields, "Port"),
        addr=opt_str(fields, "Addr"),
        cert=opt_str(fields, "Cert"),
        disable_client_auth=opt_bool(fields, "DisableClientAuth"),
    )
    if not entry.port:
        node.fail("missing required key 'Port'")
    return fields, entry


def _outgoing(node: Node) -> TLSEntry:
    fields, entry = _entry(node)
    if not entry.addr:
        node.fail("missing required key 'Addr' (the IP address or DNS name to connect to)")
    for key in ("Cert", "DisableClientAuth"):
        if present(fields, key) is not None:
            fields[key].fail("only Incoming entries take this key")
    return entry


def _incoming(node: Node, secrets: Mapping[str, SecretSpec]) -> TLSEntry:
    fields, entry = _entry(node)
    if entry.cert:
        secret = secrets.get(entry.cert)
        if secret is None:
            fields["Cert"].fail(f"no secret named {entry.cert!r}{suggest(entry.cert, secrets)}")
        if secret.type not in CERT_TYPES:
            fields["Cert"].fail(f"secret {entry.cert!r} is a {secret.type}, not a certificate")
        if not entry.disable_client_auth:
            node.fail(
                "an entry with its own Cert serves outside clients: set DisableClientAuth: true"
            )
    elif entry.disable_client_auth:
        fields["DisableClientAuth"].fail(
            "client authentication can only be disabled for an entry with its own Cert"
        )
    return entry


def parse_mesh(node: Node | None, marbles: Mapping[str, Marble]) -> MeshSection:
    if node is None:
        return MeshSection(DEFAULT_TRUST_DOMAIN, DEFAULT_CERTIFICATE_LIFETIME, frozen({}))
    fields = node.mapping(
        ("TrustDomain", "CertificateLifetime", "Allow", "Routes"), case_insensitive=True
    )
    domain_node = present(fields, "TrustDomain")
    trust_domain = DEFAULT_TRUST_DOMAIN if domain_node is None else _trust_domain(domain_node)
    lifetime = DEFAULT_CERTIFICATE_LIFETIME
    lifetime_node = present(fields, "CertificateLifetime")
    if lifetime_node is not None:
        lifetime = parse_duration(lifetime_node)
        if not _MIN_LIFETIME <= lifetime <= _MAX_LIFETIME:
            lifetime_node.fail("must be between 1m and 365d")
    allow: dict[str, tuple[str, ...]] = {}
    allow_node = present(fields, "Allow")
    for callee, callers_node in allow_node.items().items() if allow_node else []:
        if callee not in marbles:
            callers_node.fail(f"no marble named {callee!r}{suggest(callee, marbles)}")
        callers: list[str] = []
        for caller_node in callers_node.list():
            caller = caller_node.str()
            if caller not in marbles:
                caller_node.fail(f"no marble named {caller!r}{suggest(caller, marbles)}")
            callers.append(caller)
        allow[callee] = tuple(dict.fromkeys(callers))
    routes = _routes(present(fields, "Routes"), marbles, allow)
    return MeshSection(trust_domain, lifetime, frozen(allow), frozen(routes))


def _routes(
    node: Node | None, marbles: Mapping[str, Marble], allow: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[RouteRule, ...]]:
    routes: dict[str, tuple[RouteRule, ...]] = {}
    for callee, rules_node in node.items().items() if node else []:
        if callee not in marbles:
            rules_node.fail(f"no marble named {callee!r}{suggest(callee, marbles)}")
        rules = tuple(_rule(n, callee, marbles, allow.get(callee, ())) for n in rules_node.list())
        if not rules:
            rules_node.fail("give at least one rule, or leave the marble out of Routes")
        routes[callee] = rules
    return routes


def _rule(
    node: Node, callee: str, marbles: Mapping[str, Marble], callers: tuple[str, ...]
) -> RouteRule:
    fields = node.mapping(_RULE_KEYS, case_insensitive=True)
    path, prefix = present(fields, "Path"), present(fields, "PathPrefix")
    if (path is None) == (prefix is None):
        node.fail("give exactly one of 'Path' (exact) and 'PathPrefix'")
    where = path or prefix
    assert where is not None
    problem = path_problem(where.str())
    if problem:
        where.fail(f"{where.str()!r} {problem}")
    methods: list[str] = []
    for m in fields["Methods"].list() if present(fields, "Methods") else []:
        if not _METHOD.fullmatch(m.str()):
            m.fail(f"{m.str()!r} is not an HTTP method (upper case, e.g. GET or POST)")
        methods.append(m.str())
    if present(fields, "Allow") is None:
        node.fail("missing required key 'Allow' (the caller marble types; [] refuses all)")
    allowed: list[str] = []
    for caller_node in fields["Allow"].list():
        caller = caller_node.str()
        if caller not in marbles:
            caller_node.fail(f"no marble named {caller!r}{suggest(caller, marbles)}")
        if caller not in callers:
            caller_node.fail(
                f"{caller!r} may not call {callee!r} at all (Mesh.Allow.{callee}: "
                f"{', '.join(callers) or 'none'}); a route can only narrow Allow"
            )
        allowed.append(caller)
    return RouteRule(
        path=path.str() if path else None,
        path_prefix=prefix.str() if prefix else None,
        methods=tuple(dict.fromkeys(methods)),
        allow=tuple(dict.fromkeys(allowed)),
    )


def routes_to_wire(rules: tuple[RouteRule, ...]) -> list[dict[str, Any]]:
    """One marble type's rules as JSON values (the coordinator's activation reply)."""
    return [
        {"path": r.path, "pathPrefix": r.path_prefix, "methods": list(r.methods),
         "allow": list(r.allow)}
        for r in rules
    ]  # fmt: skip


def routes_from_wire(value: object) -> tuple[RouteRule, ...]:
    """The inverse of ``routes_to_wire``; ValueError for anything malformed."""
    if not isinstance(value, list):
        raise ValueError("routes must be a list")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"path", "pathPrefix", "methods", "allow"}:
            raise ValueError(f"malformed route rule {item!r}")
        path, prefix = item["path"], item["pathPrefix"]
        if (path is None) == (prefix is None):
            raise ValueError(f"route rule {item!r}: exactly one of path and pathPrefix")
        given = path if path is not None else prefix
        if not isinstance(given, str) or path_problem(given):
            raise ValueError(f"route rule {item!r}: bad path")
        methods, allow = item["methods"], item["allow"]
        if not isinstance(methods, list) or not all(
            isinstance(m, str) and _METHOD.fullmatch(m) for m in methods
        ):
            raise ValueError(f"route rule {item!r}: bad methods")
        if not isinstance(allow, list) or not all(isinstance(a, str) and a for a in allow):
            raise ValueError(f"route rule {item!r}: bad allow")
        out.append(RouteRule(path, prefix, tuple(methods), tuple(allow)))
    return tuple(out)


def _trust_domain(node: Node) -> str:
    text = node.str()
    if text != text.lower():
        node.fail(f"must be lower case (SPIFFE trust domain): {text!r}")
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        node.fail(f"not a DNS-like name: {text!r} (labels of a-z, 0-9, '-', '_' separated by dots)")
    return text
