"""Prometheus metrics of the data plane, served on the admin socket at ``/metrics``.

Names and labels follow linkerd2-proxy's (``meshpeers.md`` 1.1; Linkerd's
``reference/proxy-metrics.md``), so existing Linkerd dashboards and queries work:
``request_total``, ``response_total``, ``response_latency_ms`` (time to the response
head), ``tcp_open_total``, ``tcp_close_total``, ``tcp_open_connections``,
``tcp_read_bytes_total``, ``tcp_write_bytes_total``, ``inbound_http_authz_allow_total``,
``inbound_http_authz_deny_total``, ``inbound_tcp_authz_allow_total``,
``inbound_tcp_authz_deny_total``; labels ``direction``, ``tls``, ``client_id`` (inbound:
the caller's SPIFFE ID), ``server_id`` (outbound: the upstream's), ``peer`` (``src`` on
inbound, ``dst`` on outbound: the mesh side the bytes were counted on), ``status_code``,
``classification`` and ``grpc_status``. Ours where Linkerd has none: the ``listener``
label, ``status_class`` (``2xx``...), ``meshproxy_tls_backend_info{backend}`` and
``meshproxy_http2_goaway_total{reason}``. Every value is a label bounded by the
manifest (marble types, listeners, routes) or by HTTP (status codes), never a free
text or an address. The registry is our own, never the process-global one.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# linkerd2-proxy's response_latency_ms buckets
LATENCY_BUCKETS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000,
                   3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)  # fmt: skip
_CONN = ("direction", "listener", "peer", "tls", "client_id", "server_id")
_REQ = ("direction", "listener", "tls", "client_id", "server_id")


class ProxyMetrics:
    def __init__(self, *, tls_backend: str = "python", process: bool = True) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # a *_created series per label set would double them all
        r = self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        Info("meshproxy_tls_backend", "The TLS backend relaying bytes.", registry=r).info(
            {"backend": tls_backend}
        )
        self.requests = Counter("request", "HTTP requests received.", _REQ, registry=r)
        self.responses = Counter(
            "response", "HTTP responses sent.",
            (*_REQ, "status_code", "status_class", "classification", "grpc_status"),
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "response_latency_ms", "Milliseconds from a request's head to its response's.",
            (*_REQ, "status_code"), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tcp_open = Counter("tcp_open", "Connections opened.", _CONN, registry=r)
        self.tcp_close = Counter(
            "tcp_close", "Connections closed.", (*_CONN, "classification"), registry=r
        )
        self.tcp_open_connections = Gauge(
            "tcp_open_connections", "Connections open now.", _CONN, registry=r
        )
        self.tcp_read = Counter(
            "tcp_read_bytes", "Plaintext bytes read from the mesh peer.", _CONN, registry=r
        )
        self.tcp_write = Counter(
            "tcp_write_bytes", "Plaintext bytes written to the mesh peer.", _CONN, registry=r
        )
        self.http_allow = Counter(
            "inbound_http_authz_allow", "Requests allowed by route rules.",
            ("listener", "client_id", "route"), registry=r,
        )  # fmt: skip
        self.http_deny = Counter(
            "inbound_http_authz_deny", "Requests refused by route rules.",
            ("listener", "client_id", "route", "status_code"), registry=r,
        )  # fmt: skip
        self.tcp_allow = Counter(
            "inbound_tcp_authz_allow", "Connections whose peer identity was allowed.",
            ("listener", "client_id"), registry=r,
        )  # fmt: skip
        self.tcp_deny = Counter(
            "inbound_tcp_authz_deny", "Connections refused (handshake or identity).",
            ("listener",), registry=r,
        )  # fmt: skip
        self.goaways = Counter(
            "meshproxy_http2_goaway", "HTTP/2 connections ended by our GOAWAY.",
            ("direction", "listener", "reason"), registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- connections ---------------------------------------------------------------------
    def connection(self, direction: str, listener: str, peer_id: str) -> Connection:
        return Connection(self, direction, listener, peer_id)

    def tcp_refused(self, listener: str) -> None:
        self.tcp_deny.labels(listener).inc()

    # -- requests ------------------------------------------------------------------------
    def request(self, direction: str, listener: str, peer_id: str) -> RequestRecord:
        return RequestRecord(self, _req_labels(direction, listener, peer_id))

    def authz(self, listener: str, peer_id: str, route: str, status: int) -> None:
        if status == 200:
            self.http_allow.labels(listener, peer_id, route).inc()
        else:
            self.http_deny.labels(listener, peer_id, route, str(status)).inc()

    def goaway(self, direction: str, listener: str, reason: str) -> None:
        self.goaways.labels(direction, listener, reason).inc()


def _req_labels(direction: str, listener: str, peer_id: str) -> tuple[str, ...]:
    client, server = (peer_id, "") if direction == "inbound" else ("", peer_id)
    return (direction, listener, "true", client, server)


class Connection:
    """One mesh connection's counters: opened now, closed by ``closed``."""

    def __init__(self, m: ProxyMetrics, direction: str, listener: str, peer_id: str) -> None:
        self._m = m
        client, server = (peer_id, "") if direction == "inbound" else ("", peer_id)
        side = "src" if direction == "inbound" else "dst"
        self._labels = (direction, listener, side, "true", client, server)
        m.tcp_open.labels(*self._labels).inc()
        m.tcp_open_connections.labels(*self._labels).inc()
        if direction == "inbound":
            m.tcp_allow.labels(listener, peer_id).inc()
        self._closed = False

    def closed(self, read: int, written: int, *, ok: bool) -> None:
        if self._closed:
            return
        self._closed = True
        m = self._m
        m.tcp_read.labels(*self._labels).inc(read)
        m.tcp_write.labels(*self._labels).inc(written)
        m.tcp_open_connections.labels(*self._labels).dec()
        m.tcp_close.labels(*self._labels, "success" if ok else "failure").inc()


class RequestRecord:
    """One HTTP exchange: counted when it starts, timed to its response head."""

    def __init__(self, m: ProxyMetrics, labels: tuple[str, ...]) -> None:
        self._m = m
        self._labels = labels
        self._start = time.monotonic()
        self._timed = False
        m.requests.labels(*labels).inc()

    def responded(self, status: int) -> None:
        if not self._timed:
            self._timed = True
            elapsed = (time.monotonic() - self._start) * 1000
            self._m.latency.labels(*self._labels, str(status)).observe(elapsed)

    def finished(self, status: int, grpc_status: str | None, *, ok: bool) -> None:
        self.responded(status)
        code = str(status) if status else ""
        klass = f"{status // 100}xx" if status else ""
        self._m.responses.labels(
            *self._labels, code, klass, "success" if ok else "failure", grpc_status or ""
        ).inc()
