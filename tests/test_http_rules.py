"""Sans-IO pieces of the HTTP layer: header rules, route decisions, the reset guard,
``Mesh.Routes`` in the manifest and ``routes``/``app_protocol`` in the marble config."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.config import Node, parse_marble_config
from meshproxy.errors import ConfigError, ManifestError
from meshproxy.manifest import RouteRule, parse_manifest, routes_from_wire, routes_to_wire
from meshproxy.pki import PeerIdentity
from meshproxy.proxy.http import RoutePolicy, identity_headers, is_identity_header, sanitize
from meshproxy.proxy.http._guard import ResetBudget
from meshproxy.proxy.http._headers import (
    request_from_h1,
    request_from_h2,
    request_to_h1,
    request_to_h2,
    strip_hop_by_hop,
)

PEER = PeerIdentity("spiffe://m.test/marble/frontend", "m.test", "frontend", None, False)


# -- headers -------------------------------------------------------------------------------
def test_sanitize_removes_every_identity_header_a_client_could_send() -> None:
    given_headers = [
        (b"x-forwarded-client-cert", b"URI=spiffe://m.test/marble/admin"),
        (b"l5d-client-id", b"admin.m.test"),
        (b"l5d-dst-override", b"x:1"),
        (b"l5d-retry-limit", b"9"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"x-envoy-peer-metadata", b"x"),
        (b"x-envoy-peer-metadata-id", b"x"),
        (b"accept", b"*/*"),
    ]
    assert sanitize(given_headers) == [(b"accept", b"*/*")]


def test_identity_headers_follow_envoy_and_linkerd_formats() -> None:
    h = dict(identity_headers(PEER, b"certificate-der", "spiffe://m.test/marble/backend"))
    xfcc = h[b"x-forwarded-client-cert"].split(b";")
    assert xfcc[0] == b"By=spiffe://m.test/marble/backend"
    assert xfcc[1].startswith(b"Hash=")
    assert xfcc[2] == b"URI=spiffe://m.test/marble/frontend"
    assert h[b"l5d-client-id"] == b"frontend.m.test"
    assert h[b"forwarded"] == b"for=_frontend;proto=https"
    assert all(is_identity_header(k) for k in h)
    assert identity_headers(None, None, "x") == [(b"forwarded", b"for=unknown;proto=https")]


def test_xfcc_hash_is_hex_sha256_of_the_der() -> None:
    import hashlib

    h = dict(identity_headers(PEER, b"abc", "spiffe://m.test/marble/backend"))
    digest = hashlib.sha256(b"abc").hexdigest().encode()
    assert b";Hash=" + digest + b";" in h[b"x-forwarded-client-cert"]


def test_hop_by_hop_headers_do_not_cross() -> None:
    headers = [
        (b"connection", b"keep-alive, x-private"),
        (b"x-private", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
    ]
    assert strip_hop_by_hop([(b"te", b"gzip")]) == []


def test_h1_and_h2_heads_convert_both_ways() -> None:
    head = request_from_h1(
        b"POST",
        b"/a?b",
        [(b"host", b"svc:80"), (b"content-length", b"3")],
        scheme=b"https",
        ended=False,
    )
    assert (head.method, head.scheme, head.authority, head.path) == (
        b"POST",
        b"https",
        b"svc:80",
        b"/a?b",
    )
    assert request_to_h2(head)[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/a?b"),
        (b":authority", b"svc:80"),
    ]
    h2head = request_from_h2(
        [
            (b":method", b"PUT"),
            (b":scheme", b"http"),
            (b":authority", b"x"),
            (b":path", b"/p"),
            (b"te", b"trailers"),
        ],
        ended=False,
    )
    target, h1 = request_to_h1(h2head)
    assert target == b"/p"
    assert h1 == [(b"host", b"x"), (b"transfer-encoding", b"chunked")]  # te dropped, body framed
    absolute = request_from_h1(b"GET", b"http://other:8/x", [], scheme=b"https", ended=True)
    assert (absolute.authority, absolute.path) == (b"other:8", b"/x")


# -- routes --------------------------------------------------------------------------------
RULES = (
    RouteRule("/pkg.Svc/Get", None, ("POST",), ("frontend",)),
    RouteRule(None, "/admin/", ("GET",), ("ops",)),
    RouteRule(None, "/pkg.Svc", (), ()),
    RouteRule(None, "/", (), ("frontend", "ops")),
)


@pytest.mark.parametrize(
    ("method", "path", "caller", "status", "route"),
    [
        (b"POST", b"/pkg.Svc/Get", "frontend", 200, "/pkg.Svc/Get"),
        (b"GET", b"/pkg.Svc/Get", "frontend", 403, "/pkg.Svc*"),  # method does not match rule 1
        (b"POST", b"/pkg.Svc/Put", "frontend", 403, "/pkg.Svc*"),
        (b"GET", b"/admin", "ops", 200, "/admin/*"),
        (b"GET", b"/admin/users?x=1", "ops", 200, "/admin/*"),
        (b"GET", b"/admin/users", "frontend", 403, "/admin/*"),
        (b"GET", b"/administrator", "frontend", 200, "/*"),  # whole segments only
        (b"GET", b"/x", None, 403, "/*"),
        (b"GET", b"/a/../pkg.Svc/Put", "frontend", 400, ""),
        (b"GET", b"/a/%2e%2e/pkg.Svc", "frontend", 400, ""),
        (b"GET", b"//pkg.Svc/Put", "frontend", 400, ""),
    ],
)
def test_first_matching_rule_decides(
    method: bytes, path: bytes, caller: str | None, status: int, route: str
) -> None:
    decision = RoutePolicy.of(manifest=RULES).decide(method, path, caller)
    assert (decision.status, decision.route) == (status, route)
    assert decision.allowed == (status == 200)


def test_no_rule_matching_is_refused_and_config_narrows_the_manifest() -> None:
    policy = RoutePolicy.of(manifest=(RouteRule("/only", None, (), ("frontend",)),))
    d = policy.decide(b"GET", b"/other", "frontend")
    assert (d.allowed, d.reason) == (False, "no manifest route rule matches GET /other")
    both = RoutePolicy.of(
        manifest=(RouteRule(None, "/", (), ("frontend", "ops")),),
        config=(RouteRule(None, "/", ("GET",), ("frontend",)),),
    )
    assert both.decide(b"GET", b"/x", "frontend").allowed
    assert not both.decide(b"GET", b"/x", "ops").allowed
    assert both.decide(b"POST", b"/x", "frontend").reason.startswith("no config route rule")
    assert RoutePolicy().decide(b"GET", b"/a/../b", None).allowed  # no rules: paths unchecked


def test_route_rules_survive_the_wire() -> None:
    assert routes_from_wire(routes_to_wire(RULES)) == RULES
    for bad in (
        {},
        [{"path": "/a"}],
        [{"path": "/a", "pathPrefix": "/b", "methods": [], "allow": []}],
        [{"path": "a", "pathPrefix": None, "methods": [], "allow": []}],
        [{"path": "/a", "pathPrefix": None, "methods": ["get"], "allow": []}],
    ):
        with pytest.raises(ValueError, match="route"):
            routes_from_wire(bad)


@given(
    st.text(max_size=40),
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["frontend", "ops", None]),
)
def test_decisions_never_raise_and_allow_only_listed_callers(
    path: str, method: str, caller: str | None
) -> None:
    d = RoutePolicy.of(manifest=RULES).decide(
        method.encode(), path.encode("utf-8", "replace"), caller
    )
    if d.allowed:
        assert caller is not None


# -- the reset guard -----------------------------------------------------------------------
def test_reset_budget_allows_a_burst_then_refills_at_its_rate() -> None:
    budget = ResetBudget(burst=3, rate=2.0, now=100.0)
    assert [budget.spend(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spend(100.5)  # half a second later: one token back
    assert not budget.spend(100.5)
    assert budget.spend(110.0)
    assert budget.spent == 7


# -- the manifest's Mesh.Routes ------------------------------------------------------------
BASE: dict[str, Any] = {
    "Packages": {"p": {"Debug": True}},
    "Marbles": {"backend": {"Package": "p"}, "frontend": {"Package": "p"}, "ops": {"Package": "p"}},
    "Mesh": {
        "Allow": {"backend": ["frontend", "ops"]},
        "Routes": {
            "backend": [
                {"Path": "/pkg.Svc/Get", "Methods": ["POST"], "Allow": ["frontend"]},
                {"PathPrefix": "/", "Allow": ["frontend", "ops"]},
            ]
        },
    },
}


def _manifest(doc: dict[str, Any]) -> Any:
    import json

    return parse_manifest(json.dumps(doc).encode())


def test_manifest_routes_parse_into_rules() -> None:
    mesh = _manifest(BASE).mesh
    assert mesh.routes_of("backend") == (
        RouteRule("/pkg.Svc/Get", None, ("POST",), ("frontend",)),
        RouteRule(None, "/", (), ("frontend", "ops")),
    )
    assert mesh.routes_of("frontend") == ()


def _with(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ["Mesh", "Routes", "backend", 0, "Allow"],
            ["intruder"],
            "Mesh.Routes.backend[0].Allow[0]: no marble named 'intruder'",
        ),
        (
            ["Mesh", "Routes", "backend", 0, "Allow"],
            ["backend"],
            "Mesh.Routes.backend[0].Allow[0]: 'backend' may not call 'backend' at all",
        ),
        (
            ["Mesh", "Routes", "backend", 0, "PathPrefix"],
            "/x",
            "Mesh.Routes.backend[0]: give exactly one of 'Path' (exact) and 'PathPrefix'",
        ),
        (
            ["Mesh", "Routes", "backend", 0, "Path"],
            "/a/../b",
            "Mesh.Routes.backend[0].Path: '/a/../b' must be in normal form",
        ),
        (
            ["Mesh", "Routes", "backend", 0, "Path"],
            "pkg.Svc/Get",
            "Mesh.Routes.backend[0].Path: 'pkg.Svc/Get' must start with '/'",
        ),
        (
            ["Mesh", "Routes", "backend", 0, "Methods"],
            ["get"],
            "Mesh.Routes.backend[0].Methods[0]: 'get' is not an HTTP method",
        ),
        (
            ["Mesh", "Routes", "backend", 0, "Alow"],
            ["frontend"],
            "Mesh.Routes.backend[0]: unknown key 'Alow' (did you mean 'Allow'?)",
        ),
        (
            ["Mesh", "Routes", "backnd"],
            [],
            "Mesh.Routes.backnd: no marble named 'backnd' (did you mean 'backend'?)",
        ),
        (["Mesh", "Routes", "backend"], [], "Mesh.Routes.backend: give at least one rule"),
    ],
)
def test_manifest_route_errors_name_the_key_path(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        _manifest(_with(path, value))


def test_missing_allow_in_a_rule_is_an_error() -> None:
    doc = copy.deepcopy(BASE)
    del doc["Mesh"]["Routes"]["backend"][1]["Allow"]
    with pytest.raises(ManifestError, match="missing required key 'Allow'"):
        _manifest(doc)


# -- the marble config ---------------------------------------------------------------------
def _config(inbound: dict[str, Any], outbound: list[dict[str, Any]] | None = None) -> Any:
    doc = {
        "coordinator": {"address": "127.0.0.1:2001"},
        "marble": {"type": "backend"},
        "attestation": {"provider": "simulation", "enclave": "e.json"},
        "workdir": "run",
        "inbound": [{"name": "api", "listen": "127.0.0.1:0", **inbound}],
        "outbound": outbound or [],
    }
    return parse_marble_config(Node(doc, "marble.yaml", ""), base_dir=Path("/x"), source=Path("m"))


def test_config_http_listener_with_routes_and_app_protocol() -> None:
    cfg = _config(
        {
            "protocol": "http",
            "app_protocol": "h2c",
            "allow": ["frontend"],
            "routes": [{"path_prefix": "/pkg.Svc/", "methods": ["POST"], "allow": ["frontend"]}],
        },
        [{"name": "up", "upstream": "store.svc:443", "peer": "store", "protocol": "http"}],
    )
    api = cfg.inbound[0]
    assert (api.protocol, api.app_protocol, api.proxy_protocol) == ("http", "h2c", None)
    assert api.routes == (RouteRule(None, "/pkg.Svc/", ("POST",), ("frontend",)),)
    assert cfg.outbound[0].protocol == "http"
    tcp = _config({"proxy_protocol": "v2"}).inbound[0]
    assert (tcp.protocol, tcp.proxy_protocol, tcp.app_protocol) == ("tcp", "v2", "http1")
    hbone = _config({"protocol": "hbone", "proxy_protocol": "v2"}).inbound[0]
    assert (hbone.protocol, hbone.proxy_protocol) == ("hbone", "v2")


@pytest.mark.parametrize(
    ("inbound", "message"),
    [
        (
            {"protocol": "http", "proxy_protocol": "v2"},
            "inbound[0].proxy_protocol: proxy_protocol is only for protocol: tcp",
        ),
        (
            {"routes": []},
            "inbound[0].routes: routes is only for protocol: http (this listener is tcp)",
        ),
        (
            {"protocol": "http", "app_protocol": "h2"},
            "inbound[0].app_protocol: must be one of http1, h2c; got 'h2'",
        ),
        ({"proxy_protocol": "v1"}, "inbound[0].proxy_protocol: must be one of v2; got 'v1'"),
        (
            {"protocol": "http", "clients": "public", "routes": []},
            "inbound[0].routes: routes apply only to clients: marbles",
        ),
        (
            {"protocol": "http", "allow": ["a"], "routes": [{"path": "/x", "allow": ["b"]}]},
            "inbound[0].routes[0].allow[0]: 'b' is not in this listener's allow list",
        ),
        (
            {"protocol": "http", "routes": [{"path": "/x", "path_prefix": "/", "allow": []}]},
            "inbound[0].routes[0]: give exactly one of 'path' (exact) and 'path_prefix'",
        ),
        (
            {"protocol": "http", "routes": [{"path": "/x"}]},
            "inbound[0].routes[0]: missing required key 'allow'",
        ),
        (
            {"protocol": "hbone", "clients": "public"},
            "inbound[0].clients: protocol: hbone is mutual TLS between marbles",
        ),
        (
            {"protocol": "hbone", "app_protocol": "h2c"},
            "inbound[0].app_protocol: app_protocol is only for protocol: http",
        ),
        (
            {"protocol": "http", "routes": [{"path": "/x", "allow": [], "method": ["GET"]}]},
            "inbound[0].routes[0]: unknown key 'method' (did you mean 'methods'?)",
        ),
    ],
)
def test_config_refusals_name_the_key_path(inbound: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(inbound)
    assert message in str(err.value)
