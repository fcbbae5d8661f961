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
text or an address. The registry is our own, never the process-global one; it and
prometheus_client are loaded at the first scrape (``_Family``).

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
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# linkerd2-proxy's response_latency_ms buckets
LATENCY_BUCKETS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000,
                   3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)  # fmt: skip
_CONN = ("direction", "listener", "peer", "tls", "client_id", "server_id")
_REQ = ("direction", "listener", "tls", "client_id", "server_id")


class _Family:
    """One metric's values per label tuple, kept as plain numbers.

    The data path only adds to dicts; ``prometheus_client`` (5 MB of modules) is loaded
    at the first ``/metrics`` scrape and reads these through a collector, so an idle
    proxy that is never scraped does not carry it.
    """

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.kind = kind  # counter | gauge | histogram
        self.name = name
        self.doc = doc
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}
        self.buckets: dict[tuple[str, ...], list[int]] = {}  # histogram: per-bucket counts

    def add(self, key: tuple[str, ...], amount: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def observe_many(self, key: tuple[str, ...], counts: list[int], total: float) -> None:
        """Observations already counted per bucket (the same bounds + Inf) and summed:
        the native HTTP/2 relay's latency histogram of a connection."""
        mine = self.buckets.get(key)
        if mine is None:
            mine = self.buckets[key] = [0] * (len(LATENCY_BUCKETS) + 1)
        for i, n in enumerate(counts[: len(mine)]):
            mine[i] += n
        self.add(key, total)

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.buckets.get(key)
        if counts is None:
            counts = self.buckets[key] = [0] * (len(LATENCY_BUCKETS) + 1)
        i = 0
        while i < len(LATENCY_BUCKETS) and value > LATENCY_BUCKETS[i]:
            i += 1
        counts[i] += 1
        self.add(key, value)


class ProxyMetrics:
    def __init__(self, *, tls_backend: str = "python", process: bool = True) -> None:
        self._process = process
        self._backend = tls_backend
        self._registry: Any = None  # prometheus_client's, built at the first scrape
        self._families: list[_Family] = []
        self._engine_stats: Callable[[], dict[str, int]] | None = None
        f = self._family
        self.requests = f("counter", "request", "HTTP requests received.", _REQ)
        self.responses = f(
            "counter", "response", "HTTP responses sent.",
            (*_REQ, "status_code", "status_class", "classification", "grpc_status"),
        )  # fmt: skip
        self.latency = f(
            "histogram", "response_latency_ms",
            "Milliseconds from a request's head to its response's.", (*_REQ, "status_code"),
        )  # fmt: skip
        self.tcp_open = f("counter", "tcp_open", "Connections opened.", _CONN)
        self.tcp_close = f(
            "counter", "tcp_close", "Connections closed.", (*_CONN, "classification")
        )
        self.tcp_open_connections = f(
            "gauge", "tcp_open_connections", "Connections open now.", _CONN
        )
        self.tcp_read = f(
            "counter", "tcp_read_bytes", "Plaintext bytes read from the mesh peer.", _CONN
        )
        self.tcp_write = f(
            "counter", "tcp_write_bytes", "Plaintext bytes written to the mesh peer.", _CONN
        )
        self.http_allow = f(
            "counter", "inbound_http_authz_allow", "Requests allowed by route rules.",
            ("listener", "client_id", "route"),
        )  # fmt: skip
        self.http_deny = f(
            "counter", "inbound_http_authz_deny", "Requests refused by route rules.",
            ("listener", "client_id", "route", "status_code"),
        )  # fmt: skip
        self.tcp_allow = f(
            "counter", "inbound_tcp_authz_allow", "Connections whose peer identity was allowed.",
            ("listener", "client_id"),
        )  # fmt: skip
        self.tcp_deny = f(
            "counter", "inbound_tcp_authz_deny", "Connections refused (handshake or identity).",
            ("listener",),
        )  # fmt: skip
        self.goaways = f(
            "counter", "meshproxy_http2_goaway", "HTTP/2 connections ended by our GOAWAY.",
            ("direction", "listener", "reason"),
        )  # fmt: skip

    def _family(self, kind: str, name: str, doc: str, labels: tuple[str, ...]) -> _Family:
        family = _Family(kind, name, doc, labels)
        self._families.append(family)
        return family

    def watch_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export the native engine's counters, read from ``stats()`` at each scrape."""
        self._engine_stats = stats

    def render(self) -> bytes:
        """The Prometheus text exposition (loads prometheus_client on the first call)."""
        from prometheus_client import (
            CollectorRegistry,
            PlatformCollector,
            ProcessCollector,
            generate_latest,
        )

        if self._registry is None:
            registry = CollectorRegistry()
            if self._process:
                ProcessCollector(registry=registry)
                PlatformCollector(registry=registry)
            registry.register(_Collector(self))
            self._registry = registry
        data: bytes = generate_latest(self._registry)
        return data

    def collect(self) -> Iterator[Any]:
        """prometheus_client metric families of the current values."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        yield InfoMetricFamily(
            "meshproxy_tls_backend", "The TLS backend relaying bytes.",
            value={"backend": self._backend},
        )  # fmt: skip
        les = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
        for fam in self._families:
            out: Any
            if fam.kind == "counter":
                out = CounterMetricFamily(fam.name, fam.doc, labels=fam.labels)
                for key, value in list(fam.values.items()):
                    out.add_metric(key, value)
            elif fam.kind == "gauge":
                out = GaugeMetricFamily(fam.name, fam.doc, labels=fam.labels)
                for key, value in list(fam.values.items()):
                    out.add_metric(key, value)
            else:
                out = HistogramMetricFamily(fam.name, fam.doc, labels=fam.labels)
                for key, counts in list(fam.buckets.items()):
                    cumulative, total = [], 0
                    for le, n in zip(les, counts, strict=True):
                        total += n
                        cumulative.append((le, float(total)))
                    out.add_metric(key, cumulative, fam.values.get(key, 0.0))
            yield out
        if self._engine_stats is not None:
            stats = self._engine_stats()
            for stat, name, doc in _ENGINE_COUNTERS:
                yield CounterMetricFamily(f"meshproxy_tls_engine_{name}", doc, value=stats[stat])
            for stat, name, doc in _ENGINE_GAUGES:
                yield GaugeMetricFamily(f"meshproxy_tls_engine_{name}", doc, value=stats[stat])

    # -- connections ---------------------------------------------------------------------
    def connection(self, direction: str, listener: str, peer_id: str) -> Connection:
        return Connection(self, direction, listener, peer_id)

    def tcp_refused(self, listener: str) -> None:
        self.tcp_deny.add((listener,), 1)

    # -- requests ------------------------------------------------------------------------
    def request(self, direction: str, listener: str, peer_id: str) -> RequestRecord:
        return RequestRecord(self, _req_labels(direction, listener, peer_id))

    def authz(self, listener: str, peer_id: str, route: str, status: int) -> None:
        if status == 200:
            self.http_allow.add((listener, peer_id, route), 1)
        else:
            self.http_deny.add((listener, peer_id, route, str(status)), 1)

    def goaway(self, direction: str, listener: str, reason: str) -> None:
        self.goaways.add((direction, listener, reason), 1)


# (Engine.stats() key, metric name after meshproxy_tls_engine_, help)
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


class _Collector:
    """Hands ``ProxyMetrics`` to a prometheus_client registry."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        return self._metrics.collect()


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
        m.tcp_open.add(self._labels, 1)
        m.tcp_open_connections.add(self._labels, 1)
        if direction == "inbound":
            m.tcp_allow.add((listener, peer_id), 1)
        self._closed = False

    def closed(self, read: int, written: int, *, ok: bool) -> None:
        if self._closed:
            return
        self._closed = True
        m = self._m
        m.tcp_read.add(self._labels, read)
        m.tcp_write.add(self._labels, written)
        m.tcp_open_connections.add(self._labels, -1)
        m.tcp_close.add((*self._labels, "success" if ok else "failure"), 1)


class RequestRecord:
    """One HTTP exchange: counted when it starts, timed to its response head."""

    def __init__(self, m: ProxyMetrics, labels: tuple[str, ...]) -> None:
        self._m = m
        self._labels = labels
        self._start = time.monotonic()
        self._timed = False
        m.requests.add(labels, 1)

    def responded(self, status: int) -> None:
        if not self._timed:
            self._timed = True
            elapsed = (time.monotonic() - self._start) * 1000
            self._m.latency.observe((*self._labels, str(status)), elapsed)

    def finished(self, status: int, grpc_status: str | None, *, ok: bool) -> None:
        self.responded(status)
        code = str(status) if status else ""
        klass = f"{status // 100}xx" if status else ""
        self._m.responses.add(
            (*self._labels, code, klass, "success" if ok else "failure", grpc_status or ""), 1
        )
