"""``protocol: http`` inbound listeners with an h2c app, on the native engine.

TLS runs in the engine's worker threads (ALPN ``h2`` or ``http/1.1``). After the
handshake and the identity check:

* an ``h2`` client goes to the engine's HTTP/2 fast path (``native_tls/h2relay.c``): one
  app connection per client connection, frames relayed byte for byte with end-to-end flow
  control; only request heads are decoded, in C, to drop the identity headers a client
  sent, add the ones computed here from the verified certificate (``identity_headers``),
  and apply the route rules compiled here for this caller (``RoutePolicy``). Refusals come
  back as events (one ``http.refused`` log line each) and the request counters with the
  connection's end, so ``/metrics`` and the logs read as on the Python path;
* any other client (HTTP/1.1, no ALPN), or any client while the app is not listening, is
  relayed by the engine to one end of a socketpair whose other end the Python HTTP layer
  serves (``serve_inbound_http``), so it behaves exactly as on the Python path (there:
  503 / UNAVAILABLE per request).

``MESHPROXY_H2_FASTPATH=off`` sends h2 clients through the Python HTTP layer too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshproxy.errors import MeshError
from meshproxy.pki import PeerIdentity
from meshproxy.proxy._metrics import ProxyMetrics, _req_labels
from meshproxy.proxy._native import (
    NativeInboundListener,
    _close_app,
    _count,
)
from meshproxy.proxy._relay import UnixStream, connect_unix
from meshproxy.proxy.http import InboundHttp, identity_headers, serve_inbound_http
from meshproxy.tls import NativeEngine, NativeSession

log_in = logging.getLogger("meshproxy.proxy.inbound")
log_http = logging.getLogger("meshproxy.proxy.http")

FAST_PATH_ENV = "MESHPROXY_H2_FASTPATH"  # "off": h2 clients take the Python HTTP layer too
ALPN = ("h2", "http/1.1")
LINGER = 5.0  # seconds a served HTTP/1.1 client may keep its TLS side open
DRAINED = "drained"  # the engine's reason when a shutdown drain ended the connection


def fast_path_enabled() -> bool:
    value = os.environ.get(FAST_PATH_ENV, "on")
    if value not in ("on", "off"):
        raise MeshError(f"{FAST_PATH_ENV} must be 'on' or 'off', not {value!r}")
    return value == "on"


def uses_fast_path(http: InboundHttp | None, engine: NativeEngine) -> bool:
    """Whether an inbound listener is served here: ``protocol: http`` to an h2c app, with
    an engine built with the HTTP/2 relay."""
    return (
        http is not None
        and http.mode == "http"
        and http.app_protocol == "h2c"
        and getattr(engine.module, "H2_RELAY", 0) >= 1
        and fast_path_enabled()
    )


# -- the policy of one connection ------------------------------------------------------------
@dataclass(frozen=True)
class CompiledPolicy:
    spec: tuple[Any, ...]  # Engine.relay_h2's policy argument
    route_labels: tuple[str, ...]  # per rule, in the engine's order: metrics' route label


def _latin1(text: str) -> bytes:
    """As ``RoutePolicy.decide`` compares: request bytes read as latin-1."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return b"\x00"  # no request path holds NUL (refused as not normal): never matches


def compile_policy(
    settings: InboundHttp, peer: PeerIdentity | None, peer_der: bytes | None
) -> CompiledPolicy:
    """Identity headers, route tables (decided for this caller) and limits, for C."""
    caller = peer.marble_type if peer is not None else None
    who = "an anonymous client" if caller is None else f"marble type {caller!r}"
    tables: list[tuple[bytes, list[tuple[tuple[bytes, ...], bytes, bool, bool, bytes]]]] = []
    labels: list[str] = []
    for source, rules in settings.routes.tables:  # the words of RoutePolicy.decide
        table = []
        for rule in rules:
            exact = rule.path is not None
            path = rule.path if rule.path is not None else (rule.path_prefix or "/").rstrip("/")
            allowed = caller is not None and caller in rule.allow
            label = rule.path or f"{rule.path_prefix}*"
            why = f"{source} route {label} does not allow {who}".encode("utf-8", "replace")
            methods = tuple(_latin1(m) for m in rule.methods)
            table.append((methods, _latin1(path), exact, allowed, why))
            labels.append(label)
        tables.append((f"no {source} route rule matches".encode(), table))
    limits = settings.limits
    spec = (
        list(identity_headers(peer, peer_der, settings.our_id)),
        tables,
        limits.max_concurrent_streams,
        limits.max_header_bytes,
        limits.reset_burst,
        float(limits.reset_rate),
    )
    return CompiledPolicy(spec, tuple(labels))


def account(
    metrics: ProxyMetrics,
    listener: str,
    peer_id: str,
    stats: Mapping[str, Any],
    policy: CompiledPolicy,
    *,
    routed: bool,
) -> None:
    """A closed fast-path connection's counters into /metrics, as the Python path counts."""
    labels = _req_labels("inbound", listener, peer_id)
    if stats["requests"]:
        metrics.requests.add(labels, stats["requests"])
    for status, grpc, ok, count, timed, buckets, sum_ms in stats["outcomes"]:
        code = str(status) if status else ""
        klass = f"{status // 100}xx" if status else ""
        grpc_label = "" if grpc is None else str(grpc)
        outcome = "success" if ok else "failure"
        metrics.responses.add((*labels, code, klass, outcome, grpc_label), count)
        if timed:
            metrics.latency.observe_many((*labels, str(status)), buckets, sum_ms)
    if routed:
        for label, n in zip(policy.route_labels, stats["rule_allow"], strict=True):
            if n:
                metrics.http_allow.add((listener, peer_id, label), n)
        for label, n in zip(policy.route_labels, stats["rule_deny"], strict=True):
            if n:
                metrics.http_deny.add((listener, peer_id, label, "403"), n)
        if stats["deny_nomatch"]:
            metrics.http_deny.add((listener, peer_id, "", "403"), stats["deny_nomatch"])
        if stats["deny_badpath"]:
            metrics.http_deny.add((listener, peer_id, "", "400"), stats["deny_badpath"])
    if stats["goaway"] == 0xB:
        metrics.goaway("inbound", listener, "rapid_reset")
    elif stats["goaway"] is not None:
        metrics.goaway("inbound", listener, "protocol_error")


# -- the listener ------------------------------------------------------------------------------
class NativeHttpInboundListener(NativeInboundListener):
    """An inbound ``protocol: http`` listener (h2c app) whose TLS the engine owns."""

    async def _serve_checked(self, session: NativeSession) -> None:
        spec = self.spec
        assert spec.http is not None
        accepted = await self._accept_checked(session)
        if accepted is None:
            return
        hs, peer, fields = accepted
        if hs.alpn != "h2":
            await self._python_path(session, spec.http, peer, hs.peer_cert, fields)
            return
        await self._fast_path(session, spec.http, peer, hs.peer_cert, fields)

    async def _python_path(
        self,
        session: NativeSession,
        settings: InboundHttp,
        peer: PeerIdentity | None,
        peer_der: bytes | None,
        fields: dict[str, object],
    ) -> None:
        """HTTP/1.1 (or no ALPN): the engine relays TLS to a socketpair Python serves."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            session.relay(theirs)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        ours.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        await serve_inbound_http(
            UnixStream(reader, writer), listener=self.spec.name, app_socket=self.spec.app_socket,
            settings=settings, peer=peer, peer_der=peer_der, metrics=self._metrics,
            log_fields=fields,
        )  # fmt: skip
        writer.close()  # the engine flushes what is left, then ends the TLS side
        try:
            await asyncio.wait_for(session.wait_closed(), LINGER)
        except TimeoutError:  # a client that never closes its side
            session.close("closed by the HTTP layer")

    async def _fast_path(
        self,
        session: NativeSession,
        settings: InboundHttp,
        peer: PeerIdentity | None,
        peer_der: bytes | None,
        fields: dict[str, object],
    ) -> None:
        spec = self.spec
        peer_id = peer.spiffe_id if peer is not None else ""
        try:
            app = await connect_unix(spec.app_socket)
        except OSError as exc:
            # As the Python path does: each request gets 503 / UNAVAILABLE, and the app is
            # tried again per request (it may be restarting).
            log_in.warning(
                "app is not listening",
                extra={"event": "inbound.app_unavailable", "socket": str(spec.app_socket),
                       "reason": exc.strerror or str(exc), **fields},
            )  # fmt: skip
            await self._python_path(session, settings, peer, peer_der, fields)
            return
        counted = _count(self._metrics, "inbound", spec.name, peer)
        try:
            policy = compile_policy(settings, peer, peer_der)
        except BaseException:
            _close_app(app)
            raise

        def refused(refusal: tuple[int, int, str, str, str]) -> None:
            _stream, status, method, path, reason = refusal
            log_http.info(
                "request refused",
                extra={"event": "http.refused", "listener": spec.name,
                       "peer": peer_id or "anonymous", "method": method, "path": path,
                       "status": status, "reason": reason},
            )  # fmt: skip

        requests = 0

        def counted_requests(stats: Mapping[str, Any]) -> None:
            nonlocal requests
            requests += stats["requests"]
            if self._metrics is not None:
                account(self._metrics, spec.name, peer_id, stats, policy,
                        routed=bool(settings.routes.tables))  # fmt: skip

        started = time.monotonic()
        session.relay_h2(app, policy.spec, refused, counted_requests)
        # shutdown: GOAWAY, and the end once the streams in flight are done
        unsubscribe = settings.drain.subscribe(session.drain_h2)
        try:
            result = await session.wait_closed()
        finally:
            unsubscribe()
        if result.http is not None:
            counted_requests(result.http)
        clean = result.reason in (None, DRAINED)
        if counted is not None:
            counted.closed(result.tls_to_app, result.app_to_tls, ok=clean)
        log_in.info(
            "inbound closed",
            extra={"event": "inbound.close", "protocol": "h2", "relay": "native",
                   "requests": requests, "bytes_in": result.tls_to_app,
                   "bytes_out": result.app_to_tls, "reason": result.reason or "eof",
                   "duration_ms": round((time.monotonic() - started) * 1000), **fields},
        )  # fmt: skip
