"""``protocol: http`` listeners: what runs on a connection once TLS and identity are done.

Inbound: a verified peer's TLS stream -> HTTP/2 or HTTP/1.1 (told apart by the client
connection preface, so ALPN ``h2``, ``http/1.1``, none, and h2 prior knowledge all
work) -> route rules -> identity headers set from the certificate -> the app's Unix
socket as h2c or HTTP/1.1 (``app_protocol``). Outbound: the app's plaintext on a Unix
socket, HTTP/2 (h2c) or HTTP/1.1 as the app speaks it -> mTLS to the upstream marble,
offering exactly that protocol in ALPN (``h2`` or ``http/1.1``, never ``istio*``) so
that no translation is needed on the way out.

Both directions close a connection that stays idle (``idle_timeout``) or trickles a
request head (``header_timeout``), and drain on shutdown (``Drain``). A stream that opens
with Linkerd's transport header (``transport.l5d.io/v1``: a Linkerd proxy that took us
for a Linkerd peer) is closed with a log line that says so; we never select that ALPN.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshproxy.pki import PeerIdentity
from meshproxy.proxy._metrics import Connection, ProxyMetrics
from meshproxy.proxy._relay import ByteStream
from meshproxy.proxy.http._drain import Drain
from meshproxy.proxy.http._forward import (
    GRPC_INVALID_ARGUMENT,
    GRPC_PERMISSION_DENIED,
    GRPC_UNAUTHENTICATED,
    QUIET,
    Observer,
    ServerExchange,
    Upstream,
    forward,
    local_reply,
)
from meshproxy.proxy.http._h1 import H1Server
from meshproxy.proxy.http._h2 import PREFACE, H2Server
from meshproxy.proxy.http._hbone import HboneOutbound, parse_authority, serve_connect
from meshproxy.proxy.http._headers import identity_headers, sanitize
from meshproxy.proxy.http._model import HttpLimits
from meshproxy.proxy.http._routes import RoutePolicy
from meshproxy.proxy.http._upstream import Dial, H2Upstream, make_upstream, tls_dialer, unix_dialer
from meshproxy.tls import TLSStream

log = logging.getLogger("meshproxy.proxy.http")
log_in = logging.getLogger("meshproxy.proxy.inbound")
log_out = logging.getLogger("meshproxy.proxy.outbound")


@dataclass(frozen=True)
class InboundHttp:
    """An inbound ``protocol: http`` listener's settings beyond the TCP ones."""

    app_protocol: str  # "http1" | "h2c"
    our_id: str  # our SPIFFE ID: XFCC's By=
    routes: RoutePolicy = field(default_factory=RoutePolicy)
    limits: HttpLimits = field(default_factory=HttpLimits)
    mode: str = "http"  # "http" | "hbone" (CONNECT streams to the app as bytes)
    proxy_protocol: bool = False  # hbone: a PROXY v2 header first on each stream
    drain: Drain = field(default_factory=Drain, compare=False)  # shutdown's signal


@dataclass(frozen=True)
class OutboundHttp:
    """An outbound ``protocol: http`` listener: one client context per ALPN protocol."""

    contexts: Mapping[str, ssl.SSLContext]  # "h2" and "http/1.1"
    limits: HttpLimits = field(default_factory=HttpLimits)
    mode: str = "http"  # "http" | "hbone"
    shared: dict[str, HboneOutbound] = field(default_factory=dict, compare=False)
    drain: Drain = field(default_factory=Drain, compare=False)  # shutdown's signal


def with_alpn(
    ctx: ssl.SSLContext, protocols: tuple[str, ...] = ("h2", "http/1.1")
) -> ssl.SSLContext:
    """A server context of an HTTP listener: it selects ``h2`` or ``http/1.1`` (X1)."""
    if any(p.lower().startswith("istio") for p in protocols):
        raise ValueError("istio ALPN values are never used")
    ctx.set_alpn_protocols(list(protocols))
    return ctx


class Prefixed:
    """A stream whose first bytes were already read (to sniff the protocol)."""

    def __init__(self, stream: ByteStream, head: bytes) -> None:
        self._stream = stream
        self._head = head
        self.read_bytes = 0
        self.written_bytes = 0

    async def read(self) -> bytes:
        if self._head:
            data, self._head = self._head, b""
        else:
            data = await self._stream.read()
        self.read_bytes += len(data)
        return data

    async def write(self, data: bytes) -> None:
        self.written_bytes += len(data)
        await self._stream.write(data)

    async def write_eof(self) -> None:
        await self._stream.write_eof()

    def abort(self) -> None:
        self._stream.abort()

    async def aclose(self) -> None:
        await self._stream.aclose()


L5D_TRANSPORT = b"transport.l5d.io/v1\r\n\r\n"  # Linkerd's transport header preface


async def sniff(
    stream: ByteStream, on_data: Callable[[], None] | None = None
) -> tuple[str, Prefixed]:
    """``h2`` if the peer opens with the HTTP/2 connection preface, ``l5d`` if with
    Linkerd's transport header, ``""`` if it sent nothing, else ``http/1.1``.

    ``on_data`` is told when the first bytes arrived (the header timeout starts).
    """
    buf = b""
    while any(len(buf) < len(p) and p.startswith(buf) for p in (PREFACE, L5D_TRANSPORT)):
        data = await stream.read()
        if not data:
            break
        if not buf and on_data is not None:
            on_data()
        buf += data
    if buf.startswith(PREFACE):
        protocol = "h2"
    elif buf.startswith(L5D_TRANSPORT):
        protocol = "l5d"
    else:
        protocol = "http/1.1" if buf else ""
    return protocol, Prefixed(stream, buf)


@dataclass
class HttpSummary:
    """What the connection's close log line and byte counters need."""

    protocol: str = ""
    requests: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    error: str | None = None
    ended: str | None = None  # a clean end the proxy chose: idle, drained


async def _sniff(
    stream: ByteStream, limits: HttpLimits, drain: Drain, summary: HttpSummary
) -> Prefixed | None:
    """The first bytes within the idle timeout (the drain ends the wait), the rest of
    what tells the protocol within the header timeout; None if the connection ends."""
    loop = asyncio.get_running_loop()
    started = False
    try:
        async with asyncio.timeout(limits.idle_timeout) as deadline:

            def first_bytes() -> None:
                nonlocal started
                started = True
                deadline.reschedule(loop.time() + limits.header_timeout)

            def drained() -> None:
                if not started:
                    deadline.reschedule(loop.time())

            unsubscribe = drain.subscribe(drained)
            try:
                summary.protocol, wire = await sniff(stream, first_bytes)
            finally:
                unsubscribe()
    except TimeoutError:
        if started:
            summary.error = f"request head incomplete after {limits.header_timeout:g} s"
        else:
            summary.ended = "drained" if drain.draining else f"idle for {limits.idle_timeout:g} s"
    except OSError as exc:
        summary.error = str(exc)
    else:
        if summary.protocol == "l5d":
            summary.error = (
                "the peer sent Linkerd's transport header (transport.l5d.io/v1): a Linkerd "
                "proxy took this listener for a Linkerd peer; mark the port opaque or skip it"
            )
        elif summary.protocol:
            return wire
    await stream.aclose()
    return None


async def _serve(
    stream: ByteStream,
    *,
    scheme: bytes,
    limits: HttpLimits,
    upstream_for: Callable[[str], Upstream],
    handle: Callable[[ServerExchange, Upstream], Coroutine[Any, Any, None]],
    on_goaway: Callable[[str], None],
    drain: Drain,
) -> HttpSummary:
    summary = HttpSummary()
    wire = await _sniff(stream, limits, drain, summary)
    if wire is None:
        return summary
    upstream = upstream_for(summary.protocol)

    async def handler(ex: ServerExchange) -> None:
        await handle(ex, upstream)

    server: H2Server | H1Server
    if summary.protocol == "h2":
        server = H2Server(wire, limits, handler, on_goaway=on_goaway)
    else:
        server = H1Server(wire, limits, handler, scheme=scheme)
    unsubscribe = drain.subscribe(server.drain)
    try:
        await server.serve()
    finally:
        unsubscribe()
        await upstream.close()
        summary.requests = server.requests
        summary.error, summary.ended = server.error, server.ended
        summary.read_bytes, summary.written_bytes = wire.read_bytes, wire.written_bytes
    return summary


async def serve_inbound_http(
    stream: TLSStream | ByteStream,
    *,
    listener: str,
    app_socket: Path,
    settings: InboundHttp,
    peer: PeerIdentity | None,
    peer_der: bytes | None = None,
    denied: str | None = None,
    metrics: ProxyMetrics | None = None,
    log_fields: Mapping[str, object] | None = None,
) -> HttpSummary:
    """Serve HTTP from one verified peer (None: a public client) until it disconnects.

    ``peer_der`` (for XFCC's Hash) defaults to the TLS stream's peer certificate.
    ``denied`` (HBONE only) says why the peer, chain-verified and of our trust domain,
    may not call: each of its CONNECTs then gets 401, as ztunnel answers. The
    connection is counted in ``metrics`` and ends with one ``inbound.close`` log line.
    """
    if denied is not None and settings.mode != "hbone":
        raise ValueError("only HBONE answers a refused caller per request (401)")
    caller = peer.marble_type if peer is not None else None
    peer_id = peer.spiffe_id if peer is not None else ""
    if peer_der is None and isinstance(stream, TLSStream):
        peer_der = stream.peer_certificate()
    identity = identity_headers(peer, peer_der, settings.our_id)
    counted = metrics.connection("inbound", listener, peer_id) if metrics else None
    started = time.monotonic()
    dial = unix_dialer(app_socket)

    async def handle(ex: ServerExchange, upstream: Upstream) -> None:
        record: Observer = metrics.request("inbound", listener, peer_id) if metrics else QUIET
        head = ex.request
        if settings.mode == "hbone":
            if denied is not None:
                if metrics is not None:
                    metrics.authz(listener, peer_id, "hbone", 401)
                info = {"listener": listener, "peer": peer_id, "reason": denied}
                log.info("CONNECT refused", extra={"event": "hbone.denied", **info})
                await local_reply(ex, 401, GRPC_UNAUTHENTICATED, denied, record)
                return
            source = stream.remote if isinstance(stream, TLSStream) else None
            why = await serve_connect(
                ex, app_socket=app_socket, peer=peer, source=source,
                destination=parse_authority(head.authority), proxy_protocol=settings.proxy_protocol,
                observer=record,
            )  # fmt: skip
            if why is not None:
                info = {"listener": listener, "peer": peer_id or "anonymous", "reason": why}
                log.info("CONNECT failed", extra={"event": "hbone.error", **info})
            return
        decision = settings.routes.decide(head.method, head.path, caller)
        if metrics is not None and settings.routes.tables:
            metrics.authz(listener, peer_id, decision.route, decision.status)
        if not decision.allowed:
            fields = {
                "listener": listener,
                "peer": peer_id or "anonymous",
                "method": head.method.decode("latin-1"),
                "path": head.path.decode("latin-1"),
                "status": decision.status,
                "reason": decision.reason,
            }
            log.info("request refused", extra={"event": "http.refused", **fields})
            code = GRPC_PERMISSION_DENIED if decision.status == 403 else GRPC_INVALID_ARGUMENT
            await local_reply(ex, decision.status, code, decision.reason, record)
            return
        head.headers = [(k, v) for k, v in sanitize(head.headers) if k != b"expect"] + identity
        reason = await forward(ex, upstream, head, record)
        if reason is not None:
            fields = {"listener": listener, "peer": peer_id or "anonymous", "reason": reason}
            log.info("request failed", extra={"event": "http.error", **fields})

    def goaway(reason: str) -> None:
        if metrics is not None:
            metrics.goaway("inbound", listener, reason)

    summary = await _serve(
        stream,
        scheme=b"https",
        limits=settings.limits,
        upstream_for=lambda _: make_upstream(settings.app_protocol, dial, settings.limits),
        handle=handle,
        on_goaway=goaway,
        drain=settings.drain,
    )
    _closed(log_in, "inbound", summary, counted, started, log_fields)
    return summary


async def _serve_hbone_outbound(
    app: ByteStream,
    *,
    listener: str,
    host: str,
    port: int,
    peer_id: str,
    settings: OutboundHttp,
    dial: Dial,
    counted: Connection | None,
    started: float,
    log_fields: Mapping[str, object] | None,
) -> HttpSummary:
    hbone = settings.shared.get("hbone")
    if hbone is None:  # one pool of HTTP/2 connections per listener
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        hbone = settings.shared["hbone"] = HboneOutbound(
            H2Upstream(dial, settings.limits), authority
        )
    wire = Prefixed(app, b"")
    summary = HttpSummary(protocol="hbone", requests=1)
    summary.error = await hbone.serve(wire)
    summary.read_bytes, summary.written_bytes = wire.read_bytes, wire.written_bytes
    _closed(log_out, "outbound", summary, counted, started, log_fields)
    return summary


def _closed(
    logger: logging.Logger,
    direction: str,
    summary: HttpSummary,
    counted: Connection | None,
    started: float,
    log_fields: Mapping[str, object] | None,
) -> None:
    if counted is not None:  # counted on the mesh side: the peer's reads are the app's writes
        read, written = summary.read_bytes, summary.written_bytes
        if direction == "outbound":
            read, written = written, read
        counted.closed(read, written, ok=not summary.error)
    received, sent = (
        ("bytes_in", "bytes_out") if direction == "inbound" else ("bytes_out", "bytes_in")
    )
    logger.info(
        f"{direction} closed",
        extra={
            "event": f"{direction}.close",
            "protocol": summary.protocol,
            "requests": summary.requests,
            received: summary.read_bytes,
            sent: summary.written_bytes,
            "reason": summary.error or summary.ended or "eof",
            "duration_ms": round((time.monotonic() - started) * 1000),
            **(log_fields or {}),
        },
    )


async def serve_outbound_http(
    app: ByteStream,
    *,
    listener: str,
    host: str,
    port: int,
    sni: str | None,
    peer: str,
    peer_id: str,
    trust_domain: str,
    connect_timeout: float,
    settings: OutboundHttp,
    metrics: ProxyMetrics | None = None,
    log_fields: Mapping[str, object] | None = None,
) -> HttpSummary:
    """Serve the app's HTTP on one Unix-socket connection until it disconnects.

    The upstream is dialled on the app's first request (its protocol picks the ALPN).
    """
    counted = metrics.connection("outbound", listener, peer_id) if metrics else None
    started = time.monotonic()

    def upstream_for(protocol: str) -> Upstream:
        alpn = "h2" if protocol == "h2" else "http/1.1"
        dial = tls_dialer(
            settings.contexts[alpn], host, port, sni=sni, peer=peer,
            trust_domain=trust_domain, timeout=connect_timeout,
        )  # fmt: skip
        return make_upstream("h2" if protocol == "h2" else "http1", dial, settings.limits)

    if settings.mode == "hbone":
        return await _serve_hbone_outbound(
            app, listener=listener, host=host, port=port, peer_id=peer_id, settings=settings,
            dial=tls_dialer(settings.contexts["h2"], host, port, sni=sni, peer=peer,
                            trust_domain=trust_domain, timeout=connect_timeout),
            counted=counted, started=started, log_fields=log_fields,
        )  # fmt: skip

    async def handle(ex: ServerExchange, upstream: Upstream) -> None:
        record: Observer = metrics.request("outbound", listener, peer_id) if metrics else QUIET
        head = ex.request
        head.headers = [(k, v) for k, v in head.headers if k != b"expect"]
        reason = await forward(ex, upstream, head, record)
        if reason is not None:
            fields = {"listener": listener, "upstream": f"{host}:{port}", "reason": reason}
            log.info("request failed", extra={"event": "http.error", **fields})

    def goaway(reason: str) -> None:
        if metrics is not None:
            metrics.goaway("outbound", listener, reason)

    summary = await _serve(
        app,
        scheme=b"http",
        limits=settings.limits,
        upstream_for=upstream_for,
        handle=handle,
        on_goaway=goaway,
        drain=settings.drain,
    )
    _closed(log_out, "outbound", summary, counted, started, log_fields)
    return summary
