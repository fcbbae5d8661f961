"""Header rules: HTTP/1.1 <-> HTTP/2 heads, hop-by-hop removal, identity to the app.

Identity headers are never trusted from a client. ``sanitize`` removes every header that
could claim an identity (``x-forwarded-client-cert``, ``forwarded``, all ``l5d-*``,
``x-envoy-peer-metadata*``) and ``identity_headers`` sets them again from the verified
peer certificate:

* ``x-forwarded-client-cert: By=<our SPIFFE ID>;Hash=<hex SHA-256 of the peer's leaf
  DER>;URI=<peer SPIFFE ID>`` (Envoy's format, one element: we are the first hop);
* ``l5d-client-id: <marble type>.<trust domain>`` (Linkerd's DNS-like identity name; the
  exact SPIFFE ID is the XFCC ``URI``). Marble types may contain dots, so read the type
  as what precedes ``.<trust domain>``;
* ``forwarded: for=_<marble type>;proto=https`` (RFC 7239 with an obfuscated node: the
  caller is a marble, never an address; ``for=unknown`` for public clients).
"""

from __future__ import annotations

import hashlib

from meshproxy.pki import PeerIdentity
from meshproxy.proxy.http._model import Headers, RequestHead, ResponseHead

# RFC 9110 section 7.6.1 plus the legacy ones; HTTP/2 forbids all of them (RFC 9113 8.2.2).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"http2-settings",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_IDENTITY_EXACT = frozenset(
    {
        b"x-forwarded-client-cert",
        b"forwarded",
        b"x-envoy-peer-metadata",
        b"x-envoy-peer-metadata-id",
    }
)


def is_identity_header(name: bytes) -> bool:
    return name in _IDENTITY_EXACT or name.startswith(b"l5d-")


def sanitize(headers: Headers) -> Headers:
    """Drop every header a client could use to claim an identity."""
    return [(k, v) for k, v in headers if not is_identity_header(k)]


def identity_headers(
    peer: PeerIdentity | None, peer_der: bytes | None, ours: str
) -> Headers:  # fmt: skip
    """The identity headers for a request from ``peer`` (None: a public client)."""
    if peer is None or peer_der is None:
        return [(b"forwarded", b"for=unknown;proto=https")]
    digest = hashlib.sha256(peer_der).hexdigest()
    xfcc = f"By={ours};Hash={digest};URI={peer.spiffe_id}"
    return [
        (b"x-forwarded-client-cert", xfcc.encode()),
        (b"l5d-client-id", f"{peer.marble_type}.{peer.trust_domain}".encode()),
        (b"forwarded", f"for=_{peer.marble_type};proto=https".encode()),
    ]


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Headers that may cross to another connection (``te: trailers`` survives)."""
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    out: Headers = []
    for k, v in headers:
        if k == b"te":
            if v.strip().lower() == b"trailers":
                out.append((k, b"trailers"))
            continue
        if k in HOP_BY_HOP or k in named:
            continue
        out.append((k, v))
    return out


# -- HTTP/2 --------------------------------------------------------------------------------
def request_from_h2(headers: Headers, *, ended: bool) -> RequestHead:
    """Split an HTTP/2 request header list (validated by h2) into a head."""
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for k, v in headers:
        if k.startswith(b":"):
            pseudo[k] = v
        else:
            regular.append((k, v))
    authority = pseudo.get(b":authority")
    if authority is None:
        for k, v in regular:
            if k == b"host":
                authority = v
    regular = [(k, v) for k, v in regular if k != b"host"]
    return RequestHead(
        method=pseudo.get(b":method", b""),
        scheme=pseudo.get(b":scheme", b""),
        authority=authority or b"",
        path=pseudo.get(b":path", b""),
        headers=regular,
        ended=ended,
        protocol=pseudo.get(b":protocol", b""),
    )


def request_to_h2(head: RequestHead) -> Headers:
    out: Headers = [(b":method", head.method)]
    if head.method != b"CONNECT" or head.protocol:
        out += [(b":scheme", head.scheme or b"http"), (b":path", head.path or b"/")]
    if head.protocol:
        out.append((b":protocol", head.protocol))
    if head.authority:
        out.append((b":authority", head.authority))
    return out + strip_hop_by_hop(head.headers)


def response_from_h2(headers: Headers, *, ended: bool) -> ResponseHead:
    status = 0
    regular: Headers = []
    for k, v in headers:
        if k == b":status":
            status = int(v)
        elif not k.startswith(b":"):
            regular.append((k, v))
    return ResponseHead(status, regular, ended)


def response_to_h2(head: ResponseHead) -> Headers:
    return [(b":status", str(head.status).encode()), *strip_hop_by_hop(head.headers)]


# -- HTTP/1.1 ------------------------------------------------------------------------------
def request_from_h1(
    method: bytes, target: bytes, headers: Headers, *, scheme: bytes, ended: bool
) -> RequestHead:
    authority = b""
    regular: Headers = []
    for k, v in headers:
        if k == b"host":
            authority = authority or v
        else:
            regular.append((k, v))
    if target.startswith((b"http://", b"https://")):  # absolute form (RFC 9112 3.2.2)
        rest = target.split(b"://", 1)[1]
        authority, slash, path = rest.partition(b"/")
        target = slash + path or b"/"
    return RequestHead(method, scheme, authority, target, regular, ended)


def request_to_h1(head: RequestHead) -> tuple[bytes, Headers]:
    """The request target and HTTP/1.1 header list (Host first, framing added)."""
    headers = strip_hop_by_hop(head.headers)
    headers = [(k, v) for k, v in headers if k not in (b"te", b"expect")]
    out: Headers = [(b"host", head.authority or b"localhost")]
    out += headers
    has_length = any(k == b"content-length" for k, _ in headers)
    if not head.ended and not has_length:
        out.append((b"transfer-encoding", b"chunked"))
    return head.path or b"/", out


def response_to_h1(head: ResponseHead) -> Headers:
    return strip_hop_by_hop(head.headers)
