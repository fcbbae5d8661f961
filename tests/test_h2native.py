"""The native HTTP/2 fast path end to end: TLS client -> engine (h2relay) -> h2c app.

A real mTLS client (stdlib ``ssl``, ALPN ``h2``, python-hyper ``h2`` on top) calls a
``NativeHttpInboundListener`` whose app is an in-process h2c server (``h2`` again) on a
Unix socket. The engine's worker threads run the TLS and the relay, so this file also
exercises engine.c's HTTP/2 mode under ASan (native_tls/test-asan.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import uvloop

from meshproxy import pki
from meshproxy.manifest import RouteRule
from meshproxy.proxy import ConnectionSet, InboundSpec
from meshproxy.proxy._h2native import NativeHttpInboundListener
from meshproxy.proxy._metrics import ProxyMetrics
from meshproxy.proxy.http import HttpLimits, InboundHttp, RoutePolicy
from meshproxy.proxy.http._drain import Drain
from meshproxy.tls import (
    NativeEngine,
    TLSIdentity,
    client_context,
    native_module,
    native_server_context,
)

DOMAIN = "mesh.local"
pytestmark = pytest.mark.skipif(native_module() is None, reason="native module not built")


# -- PKI and the app --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ids() -> dict[str, TLSIdentity]:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    inter = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())

    def leaf(marble_type: str) -> TLSIdentity:
        key = pki.generate_key()
        cert = pki.issue_leaf(
            inter, pki.make_csr(key, marble_type, ["localhost"]), trust_domain=DOMAIN,
            marble_type=marble_type, instance=uuid.uuid4(), dns_names=["localhost"],
            lifetime=timedelta(hours=1), now=now, simulated=True,
        )  # fmt: skip
        return TLSIdentity(
            pki.certs_to_pem([cert, inter.cert]), pki.key_to_pem(key), pki.cert_to_pem(inter.cert)
        )

    return {t: leaf(t) for t in ("frontend", "backend")}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mph2-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


async def h2c_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with its head (JSON) and the size of its body."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    heads: dict[int, list[Any]] = {}
    sizes: dict[int, int] = {}
    writer.write(conn.data_to_send())
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                heads[event.stream_id] = list(event.headers)
                sizes[event.stream_id] = 0
            elif isinstance(event, h2.events.DataReceived):
                sizes[event.stream_id] += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                body = json.dumps({"headers": heads.pop(sid), "size": sizes.pop(sid)}).encode()
                conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(sid, body, end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()
    writer.close()


class Client:
    """An h2 client over mTLS (ALPN h2)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.done: dict[int, dict[str, Any]] = {}
        self.uploads: dict[int, bytes] = {}
        self.partial: dict[int, dict[str, Any]] = {}

    def _send_bodies(self) -> None:
        for sid, rest in list(self.uploads.items()):
            n = min(len(rest), self.conn.local_flow_control_window(sid), 16384)
            while n > 0:
                self.conn.send_data(sid, rest[:n])
                rest = rest[n:]
                n = min(len(rest), self.conn.local_flow_control_window(sid), 16384)
            self.uploads[sid] = rest
            if not rest:
                self.conn.end_stream(sid)
                del self.uploads[sid]

    async def call(self, requests: list[tuple[str, list[tuple[str, str]], bytes]]) -> list[Any]:
        sids = []
        for path, extra, body in requests:
            sid = self.conn.get_next_available_stream_id()
            head = [(":method", "POST" if body else "GET"), (":scheme", "https"),
                    (":authority", "backend"), (":path", path), *extra]  # fmt: skip
            self.conn.send_headers(sid, head, end_stream=not body)
            if body:
                self.uploads[sid] = body
            self.partial[sid] = {"body": b""}
            sids.append(sid)
        self._send_bodies()
        self.writer.write(self.conn.data_to_send())
        while not all(s in self.done for s in sids):
            data = await self.reader.read(65536)
            assert data, "the proxy closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.partial[event.stream_id]["head"] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    self.partial[event.stream_id]["body"] += event.data
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    self.done[event.stream_id] = self.partial.pop(event.stream_id)
            self._send_bodies()  # as far as the app's windows (relayed end to end) allow
            self.writer.write(self.conn.data_to_send())
        return [self.done.pop(s) for s in sids]


async def serve(
    workdir: Path,
    ids: dict[str, TLSIdentity],
    metrics: ProxyMetrics,
    scenario: Any,
    limits: HttpLimits | None = None,
    app_up: bool = True,
    clients: str = "marbles",
    drain: Drain | None = None,
) -> None:
    engine = NativeEngine(threads=2)
    connections = ConnectionSet()
    app = await asyncio.start_unix_server(h2c_app, path=str(workdir / "app.sock"))
    if not app_up:
        app.close()
        (workdir / "app.sock").unlink()
    routes = RoutePolicy.of(
        manifest=(RouteRule(None, "/api", (), ("frontend",)), RouteRule(None, "/admin", (), ()))
    )
    http = InboundHttp(
        "h2c", f"spiffe://{DOMAIN}/marble/backend", routes, limits or HttpLimits(),
        drain=drain or Drain(),
    )  # fmt: skip
    spec = InboundSpec("api", "127.0.0.1", 0, clients, ("frontend",), DOMAIN,
                       workdir / "app.sock", http=http)  # fmt: skip
    auth = clients == "marbles"
    ctx = native_server_context(ids["backend"], client_auth=auth, alpn=("h2", "http/1.1"))
    listener = NativeHttpInboundListener(spec, ctx, engine, connections, metrics)
    _, port = await listener.start()
    try:
        await scenario(port)
    finally:
        listener.stop_accepting()
        app.close()
        await connections.drain(5.0)
        await engine.aclose()


def run(
    workdir: Path,
    ids: dict[str, TLSIdentity],
    scenario: Any,
    limits: HttpLimits | None = None,
    app_up: bool = True,
    clients: str = "marbles",
    drain: Drain | None = None,
) -> ProxyMetrics:
    metrics = ProxyMetrics(tls_backend="native", process=False)
    main = serve(workdir, ids, metrics, scenario, limits, app_up, clients, drain)
    uvloop.run(asyncio.wait_for(main, 60))
    return metrics


async def h2_client(port: int, identity: TLSIdentity) -> Client:
    ctx = client_context(identity, alpn=("h2",))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    return Client(reader, writer)


# -- tests ---------------------------------------------------------------------------------
def test_requests_cross_with_the_callers_identity_and_route_rules_apply(
    workdir: Path, ids: dict[str, TLSIdentity]
) -> None:
    seen: list[Any] = []

    async def scenario(port: int) -> None:
        client = await h2_client(port, ids["frontend"])
        forged = [("x-forwarded-client-cert", "By=x;URI=spiffe://mesh.local/marble/admin"),
                  ("l5d-client-id", "admin.mesh.local")]  # fmt: skip
        seen.extend(await client.call([("/api/a", forged, b""), ("/admin/x", [], b""),
                                       ("/api/up", [], os.urandom(300_000))]))  # fmt: skip
        seen.extend(await client.call([(f"/api/{i}", [], b"") for i in range(50)]))
        client.writer.close()

    metrics = run(workdir, ids, scenario)
    ok, denied, upload, *many = seen
    doc = json.loads(ok["body"])
    headers = dict(doc["headers"])
    assert headers["l5d-client-id"] == f"frontend.{DOMAIN}"
    assert headers["x-forwarded-client-cert"].endswith(f"URI=spiffe://{DOMAIN}/marble/frontend")
    assert headers["x-forwarded-client-cert"].startswith(f"By=spiffe://{DOMAIN}/marble/backend")
    assert denied["head"][":status"] == "403"
    assert json.loads(upload["body"])["size"] == 300_000
    assert [json.loads(r["body"])["headers"][3][1] for r in many] == [
        f"/api/{i}" for i in range(50)
    ]
    text = metrics.render().decode()
    peer = f'client_id="spiffe://{DOMAIN}/marble/frontend"'
    assert any(ln.startswith("request_total{") and peer in ln and ln.endswith(" 53.0")
               for ln in text.splitlines()), text  # fmt: skip
    assert 'inbound_http_authz_deny_total{client_id="spiffe://' in text
    assert 'route="/admin*"' in text


def test_an_http1_client_is_served_through_the_python_layer(
    workdir: Path, ids: dict[str, TLSIdentity]
) -> None:
    reply: list[bytes] = []

    async def scenario(port: int) -> None:
        ctx = client_context(ids["frontend"], alpn=("http/1.1",))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(b"GET /api/h1 HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        reply.append(await reader.read())
        writer.close()

    run(workdir, ids, scenario)
    head, _, body = reply[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert ["l5d-client-id", f"frontend.{DOMAIN}"] in json.loads(body)["headers"]


def test_rapid_resets_get_goaway_and_the_connection_ends(
    workdir: Path, ids: dict[str, TLSIdentity]
) -> None:
    events: list[Any] = []

    async def scenario(port: int) -> None:
        client = await h2_client(port, ids["frontend"])
        conn = client.conn
        for _ in range(20):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                    (":authority", "b"), (":path", "/api/r")])  # fmt: skip
            conn.reset_stream(sid)
        client.writer.write(conn.data_to_send())
        while data := await client.reader.read(65536):
            events.extend(conn.receive_data(data))
        client.writer.close()

    limits = HttpLimits(reset_burst=5, reset_rate=0.0)
    metrics = run(workdir, ids, scenario, limits)
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [g.error_code for g in goaways] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    text = metrics.render().decode()
    assert (
        'meshproxy_http2_goaway_total{direction="inbound",listener="api",reason="rapid_reset"} 1.0'
        in text
    )


def test_while_the_app_is_down_each_request_gets_503_as_on_the_python_path(
    workdir: Path, ids: dict[str, TLSIdentity]
) -> None:
    seen: list[Any] = []

    async def scenario(port: int) -> None:
        client = await h2_client(port, ids["frontend"])
        seen.extend(await client.call([("/api/a", [], b""), ("/api/b", [], b"")]))
        client.writer.close()

    run(workdir, ids, scenario, app_up=False)
    assert [r["head"][":status"] for r in seen] == ["503", "503"]


def test_h2load_a_strict_client_accepts_refusals_from_its_first_flight_on(
    workdir: Path, ids: dict[str, TLSIdentity]
) -> None:
    """nghttp2 (h2load) checks that a server's first frame is SETTINGS and every frame
    after; an anonymous client of a listener with route rules is refused every request."""
    out: list[str] = []

    async def scenario(port: int) -> None:
        res = await asyncio.create_subprocess_exec(
            "h2load", "-n", "40", "-c", "2", "-m", "5", f"https://127.0.0.1:{port}/api/x",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        stdout, _ = await res.communicate()
        out.append(stdout.decode())

    run(workdir, ids, scenario, clients="public")
    assert "requests: 40 total, 40 started, 40 done, 0 succeeded, 40 failed, 0 errored" in out[0]
    assert "status codes: 0 2xx, 0 3xx, 40 4xx, 0 5xx" in out[0], out[0]


def test_shutdown_sends_goaway_and_the_request_in_flight_completes(
    workdir: Path, ids: dict[str, TLSIdentity]
) -> None:
    drain = Drain()
    seen: dict[str, Any] = {}

    async def scenario(port: int) -> None:
        client = await h2_client(port, ids["frontend"])
        conn = client.conn
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                (":authority", "b"), (":path", "/api/slow")])  # fmt: skip
        conn.send_data(sid, b"part one, ")
        client.writer.write(conn.data_to_send())
        await asyncio.sleep(0.2)
        drain.begin()  # SIGTERM: the runtime's signal to every HTTP connection
        events: list[Any] = []
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            data = await client.reader.read(65536)
            assert data, "closed before GOAWAY"
            events += conn.receive_data(data)
        seen["goaway"] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        # h2's client takes no more input after a GOAWAY: the rest by hand
        rest = b"part two"
        head = struct.pack(">I", len(rest))[1:] + bytes([0, 1]) + struct.pack(">I", sid)
        client.writer.write(head + rest)
        raw = b""
        while data := await client.reader.read(65536):  # the proxy closes once it is done
            raw += data
        seen["raw"] = raw
        client.writer.close()

    run(workdir, ids, scenario, drain=drain)
    [goaway] = seen["goaway"]
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert b'"size": 18}' in seen["raw"]  # the app's answer, in a DATA frame
