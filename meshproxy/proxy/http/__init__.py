"""The HTTP layer: ``protocol: http`` (HTTP/1.1 with h11, HTTP/2 with h2, gRPC) and
``protocol: hbone`` (TCP streams as HTTP/2 CONNECT streams over mTLS).

Decodes only heads (for route rules, identity headers and metrics); bodies and trailers
cross unchanged with end-to-end flow control. See ``_listener`` for the two directions,
``_forward`` for one exchange, ``_h2``/``_h1`` for the protocols, ``_hbone`` for tunnels.
"""

from meshproxy.proxy.http._drain import Drain
from meshproxy.proxy.http._forward import forward, local_reply
from meshproxy.proxy.http._guard import ResetBudget
from meshproxy.proxy.http._hbone import hbone_caller
from meshproxy.proxy.http._headers import identity_headers, is_identity_header, sanitize
from meshproxy.proxy.http._listener import (
    HttpSummary,
    InboundHttp,
    OutboundHttp,
    serve_inbound_http,
    serve_outbound_http,
    sniff,
    with_alpn,
)
from meshproxy.proxy.http._model import HttpLimits, RequestHead, ResponseHead, StreamReset
from meshproxy.proxy.http._routes import Decision, RoutePolicy, resolve_routes

__all__ = [
    "Decision",
    "Drain",
    "HttpLimits",
    "HttpSummary",
    "InboundHttp",
    "OutboundHttp",
    "RequestHead",
    "ResetBudget",
    "ResponseHead",
    "RoutePolicy",
    "StreamReset",
    "forward",
    "hbone_caller",
    "identity_headers",
    "is_identity_header",
    "local_reply",
    "resolve_routes",
    "sanitize",
    "serve_inbound_http",
    "serve_outbound_http",
    "sniff",
    "with_alpn",
]
