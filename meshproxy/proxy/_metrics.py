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

The native TLS engine's own counters, read from ``Engine.stats()`` at each scrape
(``watch_engine``): ``meshproxy_tls_engine_threads``,
``meshproxy_tls_engine_open_connections``, ``meshproxy_tls_engine_accept_total``,
``meshproxy_tls_engine_fast_path_total`` (identity and app connect decided in C),
``meshproxy_tls_engine_handshake_total``, ``meshproxy_tls_engine_handshake_failure_total``,
``meshproxy_tls_engine_close_total``, ``meshproxy_tls_engine_read_bytes_total`` /
``meshproxy_tls_engine_write_bytes_total`` (plaintext from / to the mesh peers, the
engine's share of ``tcp_read_bytes_total`` / ``tcp_write_bytes_total``, but counted as
the bytes move rather than when a connection closes) and
``meshproxy_tls_engine_buffer_bytes`` (relay buffer memory, in use and pooled).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self._engine_watched = False
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

    def watch_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export the native engine's counters (read at each scrape); once per registry."""
        if self._engine_watched:
            return
        self._engine_watched = True
        self.registry.register(_EngineCollector(stats))

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


# (stats key, metric name without meshproxy_tls_engine_, help); counters first
_ENGINE_COUNTERS = (
    ("accepted", "accept", "Connections accepted by the engine's listeners."),
    ("fast_path", "fast_path", "Accepted connections whose identity and app connect C decided."),
    ("handshakes", "handshake", "TLS handshakes completed."),
    ("handshake_failures", "handshake_failure", "Connections ended before their handshake did."),
    ("closed", "close", "Connections closed after their handshake."),
    ("bytes_tls_to_app", "read_bytes", "Plaintext bytes from the mesh peers to the apps."),
    ("bytes_app_to_tls", "write_bytes", "Plaintext bytes from the apps to the mesh peers."),
)
_ENGINE_GAUGES = (
    ("threads", "threads", "Worker threads of the engine."),
    ("active", "open_connections", "Connections the engine holds now."),
    ("buffer_bytes", "buffer_bytes", "Relay buffer memory, in use and pooled."),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, name, doc in _ENGINE_COUNTERS:
            yield CounterMetricFamily(f"meshproxy_tls_engine_{name}", doc, value=stats[key])
        for key, name, doc in _ENGINE_GAUGES:
            yield GaugeMetricFamily(f"meshproxy_tls_engine_{name}", doc, value=stats[key])


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
