"""``protocol: http`` on loopback: real TLS 1.3, real Unix sockets, a PKI per module.

Topology of most scenarios (the app is ``integration/apps/http_probe.py``, a separate
process speaking HTTP/1.1 or h2c, sharing no code with the proxy):

    client --unix--> outbound (frontend) --mTLS h2|http/1.1--> inbound (backend) --unix--> app

Clients are curl (over the outbound socket, or TLS straight to the inbound port) and a
small h2 client written here for what curl cannot do (resets, gRPC frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import uvloop

from meshproxy import pki
from meshproxy.manifest import RouteRule
from meshproxy.proxy import (
    AdminServer,
    ConnectionSet,
    InboundListener,
    InboundSpec,
    OutboundListener,
    OutboundSpec,
    ProxyMetrics,
)
from meshproxy.proxy.http import HttpLimits, InboundHttp, OutboundHttp, RoutePolicy, with_alpn
from meshproxy.tls import TLSIdentity, client_context, server_context

DOMAIN = "http.test"
PROBE = Path(__file__).resolve().parent.parent / "integration" / "apps" / "http_probe.py"
CURL = shutil.which("curl")


# -- PKI -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    root_pem: bytes
    ids: dict[str, TLSIdentity]
    files: dict[str, tuple[Path, Path]]  # marble type -> (chain.pem, key.pem) for curl
    trust: Path


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    inter = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())
    ids: dict[str, TLSIdentity] = {}
    files: dict[str, tuple[Path, Path]] = {}
    d = tmp_path_factory.mktemp("pki")
    for t in ("frontend", "backend", "intruder"):
        key = pki.generate_key()
        cert = pki.issue_leaf(
            inter,
            pki.make_csr(key, t, ["localhost"]),
            trust_domain=DOMAIN,
            marble_type=t,
            instance=uuid.uuid4(),
            dns_names=["localhost", f"{t}.{DOMAIN}"],
            lifetime=timedelta(hours=1),
            now=now,
            simulated=True,
        )
        ids[t] = TLSIdentity(
            pki.certs_to_pem([cert, inter.cert]), pki.key_to_pem(key), pki.cert_to_pem(inter.cert)
        )
        files[t] = (d / f"{t}.pem", d / f"{t}.key")
        files[t][0].write_bytes(ids[t].chain_pem)
        files[t][1].write_bytes(ids[t].key_pem.reveal())
    trust = d / "trust.pem"
    trust.write_bytes(pki.cert_to_pem(inter.cert))
    return Pki(pki.cert_to_pem(root.cert), ids, files, trust)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mph-", dir="/tmp"))  # Unix socket paths are short
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the app ---------------------------------------------------------------------------------
class Apps:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, protocol: str, name: str = "api") -> Path:
        sock = self.workdir / f"inbound-{name}.sock"
        env = dict(os.environ, PROBE_SOCKET=str(sock))
        proc = subprocess.Popen([sys.executable, str(PROBE), "PROBE_SOCKET", protocol], env=env)
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, "the probe app exited"
            assert time.monotonic() < deadline, "the probe app did not listen"
            time.sleep(0.01)
        return sock

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
            p.wait(5)


@pytest.fixture
def apps(workdir: Path) -> Iterator[Apps]:
    a = Apps(workdir)
    yield a
    a.stop()


# -- the proxies -----------------------------------------------------------------------------
_OPEN: list[Mesh] = []  # closed by run() whatever happens (an open server at loop close
# is a ResourceWarning, an error under filterwarnings=error)


@dataclass
class Mesh:
    port: int
    outbound: Path
    metrics: ProxyMetrics
    connections: ConnectionSet
    closers: list[Any] = field(default_factory=list)
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for c in self.closers:
            c.stop_accepting()
        await self.connections.drain(2.0)
        for c in self.closers:
            server = c._server
            if server is not None:
                await server.wait_closed()


async def start_mesh(
    ca: Pki,
    workdir: Path,
    *,
    app_protocol: str = "http1",
    routes: RoutePolicy | None = None,
    limits: HttpLimits | None = None,
    client: str = "frontend",
    allow: tuple[str, ...] = ("frontend",),
    clients: str = "marbles",
) -> Mesh:
    metrics = ProxyMetrics(process=False)
    connections = ConnectionSet()
    http = InboundHttp(
        app_protocol,
        f"spiffe://{DOMAIN}/marble/backend",
        routes or RoutePolicy(),
        limits or HttpLimits(),
    )
    spec = InboundSpec(
        "api", "127.0.0.1", 0, clients, allow, DOMAIN, workdir / "inbound-api.sock", http=http
    )
    ctx = with_alpn(server_context(ca.ids["backend"], client_auth=clients == "marbles"))
    inbound = InboundListener(spec, ctx, connections, metrics)
    _, port = await inbound.start()
    contexts = {p: client_context(ca.ids[client], alpn=(p,)) for p in ("h2", "http/1.1")}
    out_spec = OutboundSpec(
        "store",
        workdir / "outbound-store.sock",
        "127.0.0.1",
        port,
        "backend.http.test",
        "backend",
        DOMAIN,
        http=OutboundHttp(contexts, limits or HttpLimits()),
    )
    outbound = OutboundListener(out_spec, client_context(ca.ids[client]), connections, metrics)
    await outbound.start()
    mesh = Mesh(port, out_spec.socket_path, metrics, connections, [inbound, outbound])
    _OPEN.append(mesh)
    return mesh


def run(scenario: Coroutine[Any, Any, None], timeout: float = 60) -> None:
    async def bounded() -> None:
        try:
            await asyncio.wait_for(scenario, timeout)
        finally:
            while _OPEN:
                await _OPEN.pop().close()

    uvloop.run(bounded())


async def curl(*args: str) -> tuple[int, str, str]:
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def headers_of(doc: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in doc["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


# -- a small HTTP/2 client for what curl cannot do -------------------------------------------
class H2:
    """An h2 client over an asyncio stream (h2c on a Unix socket, or TLS to a port)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    async def unix(cls, path: Path) -> H2:
        c = cls(*await asyncio.open_unix_connection(str(path)))
        await c.flush()
        return c

    @classmethod
    async def tls(cls, port: int, ca: Pki, who: str = "frontend") -> H2:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(ca.trust))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.load_cert_chain(*ca.files[who])
        ctx.set_alpn_protocols(["h2"])
        c = cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx))
        await c.flush()
        return c

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def pump(self) -> list[h2.events.Event]:
        """Read once and process; returns the new events ([] at EOF)."""
        data = await self.reader.read(65536)
        if not data:
            self.closed = True
            return []
        events = self.conn.receive_data(data)
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.events += events
        await self.flush()
        return events

    async def until(self, pred: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                if self.closed:
                    raise AssertionError("connection closed")
                await self.pump()

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes, dict[str, str]]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", method),
                (":scheme", "http"),
                (":authority", "backend"),
                (":path", path),
                *headers,
            ],
            end_stream=body is None,
        )
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        await self.flush()
        done = lambda: any(  # noqa: E731
            isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
            for e in self.events
        )
        await self.until(done)
        status, head, data, trailers = 0, {}, b"", {}
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, h2.events.ResponseReceived):
                head = dict(e.headers)
                status = int(head[":status"])
            elif isinstance(e, h2.events.DataReceived):
                data += e.data
            elif isinstance(e, h2.events.TrailersReceived):
                trailers = dict(e.headers)
            elif isinstance(e, h2.events.StreamReset):
                raise AssertionError(f"stream reset with code {e.error_code}")
        return status, head, data, trailers

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()


# -- scenarios -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("client", "app_protocol"),
    [("http1.1", "http1"), ("http2", "h2c"), ("http1.1", "h2c"), ("http2", "http1")],
)
def test_identity_headers_reach_the_app_and_injected_ones_never_do(
    ca: Pki, workdir: Path, apps: Apps, client: str, app_protocol: str
) -> None:
    apps.start(app_protocol)
    flag = "--http1.1" if client == "http1.1" else "--http2-prior-knowledge"

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, app_protocol=app_protocol)
        code, out, err = await curl(
            "--unix-socket",
            str(mesh.outbound),
            flag,
            "-H",
            "x-forwarded-client-cert: By=evil;URI=spiffe://http.test/marble/admin",
            "-H",
            "l5d-client-id: admin.http.test",
            "-H",
            "forwarded: for=10.0.0.1",
            "-H",
            "l5d-dst-override: evil:80",
            "-H",
            "x-envoy-peer-metadata-id: evil",
            "http://backend/headers?x=1",
        )
        await mesh.close()
        assert code == 0, err
        doc = json.loads(out)
        assert doc["path"] == "/headers?x=1"
        assert doc["protocol"] == app_protocol.replace("http1", "http/1.1")
        h = headers_of(doc)
        xfcc = h["x-forwarded-client-cert"]
        assert len(xfcc) == 1
        assert xfcc[0].startswith(f"By=spiffe://{DOMAIN}/marble/backend;Hash=")
        assert xfcc[0].endswith(f";URI=spiffe://{DOMAIN}/marble/frontend")
        assert h["l5d-client-id"] == [f"frontend.{DOMAIN}"]
        assert h["forwarded"] == ["for=_frontend;proto=https"]
        assert "l5d-dst-override" not in h
        assert "x-envoy-peer-metadata-id" not in h
        assert h["host"] == ["backend"]
        assert "evil" not in out

    run(scenario())


def test_xfcc_hash_is_the_sha256_of_the_callers_certificate(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    apps.start("http1")
    leaf = x509.load_pem_x509_certificates(ca.ids["frontend"].chain_pem)[0]
    expected = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir)
        code, out, err = await curl("--unix-socket", str(mesh.outbound), "http://backend/h")
        await mesh.close()
        assert code == 0, err
        assert f";Hash={expected};" in headers_of(json.loads(out))["x-forwarded-client-cert"][0]

    run(scenario())


@pytest.mark.parametrize("app_protocol", ["h2c", "http1"])
def test_16_mib_bodies_cross_both_ways_with_flow_control(
    ca: Pki, workdir: Path, apps: Apps, app_protocol: str
) -> None:
    import hashlib

    apps.start(app_protocol)
    size = 16 * 1024 * 1024
    payload = os.urandom(size)
    body_file = workdir / "body.bin"
    body_file.write_bytes(payload)

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, app_protocol=app_protocol)
        code, out, err = await curl(
            "--unix-socket",
            str(mesh.outbound),
            "--http2-prior-knowledge",
            "--data-binary",
            f"@{body_file}",
            "http://backend/sha256",
        )
        assert code == 0, err
        assert json.loads(out) == {"length": size, "sha256": hashlib.sha256(payload).hexdigest()}
        got = workdir / "got.bin"
        code, _, err = await curl(
            "--unix-socket",
            str(mesh.outbound),
            "--http2-prior-knowledge",
            "-o",
            str(got),
            f"http://backend/bytes/{size}",
        )
        await mesh.close()
        assert code == 0, err
        data = got.read_bytes()
        assert len(data) == size
        assert data[:251] == bytes(range(251))
        assert data[-1] == (size - 1) % 251

    run(scenario(), timeout=120)


def test_route_rules_refuse_with_403_and_grpc_with_permission_denied(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    apps.start("h2c")
    rules = (
        RouteRule(
            path="/pkg.Svc/Allowed", path_prefix=None, methods=("POST",), allow=("frontend",)
        ),
        RouteRule(path=None, path_prefix="/public", methods=(), allow=("frontend",)),
        RouteRule(path=None, path_prefix="/pkg.Svc", methods=(), allow=()),
    )

    async def scenario() -> None:
        mesh = await start_mesh(
            ca, workdir, app_protocol="h2c", routes=RoutePolicy.of(manifest=rules)
        )
        c = await H2.unix(mesh.outbound)
        grpc = [("content-type", "application/grpc"), ("te", "trailers")]
        status, head, data, _ = await c.request(
            "/pkg.Svc/Denied", method="POST", headers=grpc, body=b"\0\0\0\0\0"
        )
        assert status == 200
        assert head["grpc-status"] == "7"
        assert "does not allow marble type 'frontend'" in head["grpc-message"]
        assert data == b""
        status, head, data, _ = await c.request(
            "/pkg.Svc/Allowed", method="POST", headers=grpc, body=b""
        )
        assert status == 200
        assert json.loads(data)["path"] == "/pkg.Svc/Allowed"
        status, _, data, _ = await c.request("/public/x")
        assert status == 200
        status, head, data, _ = await c.request("/elsewhere")
        assert status == 403
        assert b"no manifest route rule matches GET /elsewhere" in data
        status, _, data, _ = await c.request("/public/../pkg.Svc/Denied")
        assert status == 400
        await c.close()
        await mesh.close()
        text = mesh.metrics.render().decode()
        assert (
            'inbound_http_authz_deny_total{client_id="spiffe://http.test/marble/frontend",' in text
        )
        assert 'route="/pkg.Svc/Allowed"' in text

    run(scenario())


def test_rapid_reset_gets_goaway_enhance_your_calm(ca: Pki, workdir: Path, apps: Apps) -> None:
    apps.start("h2c")
    limits = HttpLimits(reset_burst=20, reset_rate=1.0)

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, app_protocol="h2c", limits=limits)
        c = await H2.tls(mesh.port, ca)
        for _ in range(200):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(
                sid,
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "b"),
                    (":path", "/headers"),
                ],
            )
            c.conn.reset_stream(sid)
        with contextlib.suppress(ConnectionError):
            await c.flush()
        goaway = lambda: [e for e in c.events if isinstance(e, h2.events.ConnectionTerminated)]  # noqa: E731
        with contextlib.suppress(ConnectionError, AssertionError):
            await c.until(goaway)
        assert goaway(), c.events
        assert goaway()[0].error_code == 0xB  # ENHANCE_YOUR_CALM
        await c.close()
        await mesh.close()
        text = mesh.metrics.render().decode()
        assert (
            'meshproxy_http2_goaway_total{direction="inbound",listener="api",'
            'reason="rapid_reset"} 1.0' in text
        )

    run(scenario())


def test_oversized_request_heads_are_refused(ca: Pki, workdir: Path, apps: Apps) -> None:
    apps.start("http1")
    limits = HttpLimits(max_header_bytes=4096)

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, limits=limits)
        big = "x-big: " + "a" * 8000
        _, out, _ = await curl(
            "--unix-socket",
            str(mesh.outbound),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            big,
            "http://backend/h",
        )
        assert out == "431"
        c = await H2.tls(mesh.port, ca)
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(
            sid,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "b"),
                (":path", "/h"),
                ("x-big", "a" * 8000),
            ],
            end_stream=True,
        )
        await c.flush()
        with contextlib.suppress(ConnectionError, AssertionError):
            await c.until(
                lambda: (
                    c.closed
                    or any(
                        isinstance(e, (h2.events.ConnectionTerminated, h2.events.ResponseReceived))
                        for e in c.events
                    )
                )
            )
        assert not any(isinstance(e, h2.events.ResponseReceived) for e in c.events)
        terminated = [e for e in c.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert terminated, c.events
        assert terminated[0].error_code == 0xB
        await c.close()
        await mesh.close()

    run(scenario())


def test_app_down_gives_503_and_grpc_unavailable(ca: Pki, workdir: Path) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, app_protocol="h2c")
        _, out, _ = await curl(
            "--unix-socket",
            str(mesh.outbound),
            "--http2-prior-knowledge",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "http://backend/",
        )
        assert out == "503"
        c = await H2.unix(mesh.outbound)
        status, head, _, _ = await c.request(
            "/pkg.Svc/M", method="POST", headers=[("content-type", "application/grpc")], body=b""
        )
        assert (status, head["grpc-status"]) == (200, "14")
        await c.close()
        await mesh.close()

    run(scenario())


def test_many_concurrent_streams_on_one_connection(ca: Pki, workdir: Path, apps: Apps) -> None:
    apps.start("h2c")

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, app_protocol="h2c")
        c = await H2.tls(mesh.port, ca)
        await c.until(lambda: c.conn.remote_settings.max_concurrent_streams == 100)
        sids = []
        for i in range(100):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(
                sid,
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "b"),
                    (":path", f"/bytes/{1000 + i}"),
                ],
                end_stream=True,
            )
            sids.append(sid)
        await c.flush()
        ended = lambda: {e.stream_id for e in c.events if isinstance(e, h2.events.StreamEnded)}  # noqa: E731
        await c.until(lambda: set(sids) <= ended())
        sizes = dict.fromkeys(sids, 0)
        for e in c.events:
            if isinstance(e, h2.events.DataReceived):
                sizes[e.stream_id] += len(e.data)
        assert [sizes[s] for s in sids] == [1000 + i for i in range(100)]
        await c.close()
        await mesh.close()
        text = mesh.metrics.render().decode()
        line = (
            'response_total{classification="success",client_id="spiffe://http.test/marble/frontend",'
            'direction="inbound",grpc_status="",listener="api",server_id="",status_class="2xx",'
            'status_code="200",tls="true"} 100.0'
        )
        assert line in text

    run(scenario())


def test_metrics_are_served_on_the_admin_socket(ca: Pki, workdir: Path, apps: Apps) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir)
        admin = AdminServer(workdir / "admin.sock", ready=lambda: True, metrics=mesh.metrics)
        await admin.start()
        code, _, err = await curl("--unix-socket", str(mesh.outbound), "http://backend/h")
        assert code == 0, err
        code, text, err = await curl(
            "--unix-socket", str(workdir / "admin.sock"), "-D", "-", "http://admin/metrics"
        )
        await admin.close()
        await mesh.close()
        assert code == 0, err
        assert "content-type: text/plain; version=0.0.4" in text.lower()
        assert 'meshproxy_tls_backend_info{backend="python"} 1.0' in text
        assert (
            'request_total{client_id="",direction="outbound",listener="store",'
            'server_id="spiffe://http.test/marble/backend",tls="true"} 1.0'
        ) in text
        assert 'response_latency_ms_bucket{client_id="spiffe://http.test/marble/frontend"' in text
        assert (
            'tcp_open_total{client_id="spiffe://http.test/marble/frontend",direction="inbound"'
            in text
        )
        assert "_created" not in text

    run(scenario())


def test_outbound_offers_only_the_apps_protocol_in_alpn_and_never_istio(
    ca: Pki, workdir: Path
) -> None:
    """A raw TLS server records what our outbound offers for h2c and HTTP/1.1 apps."""
    offered: list[list[str]] = []
    first_byte_ms: list[float] = []

    async def scenario() -> None:
        # A plain TCP server reads the ClientHello (ALPN is in clear text), then closes.
        async def raw(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            t0 = time.monotonic()
            data = await r.read(4096)
            first_byte_ms.append((time.monotonic() - t0) * 1000)
            offered.append(_alpn_of_client_hello(data))
            w.close()

        server = await asyncio.start_server(raw, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        contexts = {p: client_context(ca.ids["frontend"], alpn=(p,)) for p in ("h2", "http/1.1")}
        spec = OutboundSpec(
            "x",
            workdir / "outbound-x.sock",
            "127.0.0.1",
            port,
            "backend.http.test",
            "backend",
            DOMAIN,
            connect_timeout=2,
            http=OutboundHttp(contexts),
        )
        conns = ConnectionSet()
        out = OutboundListener(spec, client_context(ca.ids["frontend"]), conns)
        await out.start()
        await curl("--unix-socket", str(spec.socket_path), "--http2-prior-knowledge", "http://b/")
        await curl("--unix-socket", str(spec.socket_path), "--http1.1", "http://b/")
        out.stop_accepting()
        await conns.drain(2)
        server.close()

    run(scenario())
    assert offered == [["h2"], ["http/1.1"]]
    assert all(ms < 1000 for ms in first_byte_ms)


def _alpn_of_client_hello(data: bytes) -> list[str]:
    """The ALPN protocol names of a TLS ClientHello record (RFC 8446 4.1.2, RFC 7301)."""
    assert data[0] == 0x16, "not a handshake record"
    assert data[5] == 0x01, "not a ClientHello"
    i = 5 + 4 + 2 + 32  # record header, handshake header, version, random
    i += 1 + data[i]  # session id
    i += 2 + int.from_bytes(data[i : i + 2], "big")  # cipher suites
    i += 1 + data[i]  # compression
    end = i + 2 + int.from_bytes(data[i : i + 2], "big")
    i += 2
    while i < end:
        kind, size = (
            int.from_bytes(data[i : i + 2], "big"),
            int.from_bytes(data[i + 2 : i + 4], "big"),
        )
        if kind == 16:  # application_layer_protocol_negotiation
            ext, j, names = data[i + 6 : i + 4 + size], 0, []
            while j < len(ext):
                names.append(ext[j + 1 : j + 1 + ext[j]].decode())
                j += 1 + ext[j]
            return names
        i += 4 + size
    return []


def test_intruder_is_refused_before_any_http(ca: Pki, workdir: Path, apps: Apps) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, client="intruder")
        _, out, _ = await curl(
            "--unix-socket",
            str(mesh.outbound),
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "http://backend/h",
        )
        await mesh.close()
        assert out == "502"  # the server proved itself; then it hung up on us
        text = mesh.metrics.render().decode()
        assert 'inbound_tcp_authz_deny_total{listener="api"} 1.0' in text

    run(scenario())


def test_grpc_deadline_cancel_propagates_as_rst_stream_cancel(ca: Pki, workdir: Path) -> None:
    """A client's RST_STREAM(CANCEL) reaches the app's stream as CANCEL."""
    seen: list[int] = []
    started: list[str] = []

    async def scenario() -> None:
        app_sock = workdir / "inbound-api.sock"

        async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            w.write(conn.data_to_send())
            while data := await r.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        started.append(dict(ev.headers)[b"grpc-timeout"].decode())
                    if isinstance(ev, h2.events.StreamReset):
                        seen.append(ev.error_code)
                w.write(conn.data_to_send())
            w.close()

        async def until(check: Any) -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + 5
            while not check() and loop.time() < end:
                await asyncio.sleep(0.01)

        server = await asyncio.start_unix_server(app, path=str(app_sock))
        mesh = await start_mesh(ca, workdir, app_protocol="h2c")
        c = await H2.unix(mesh.outbound)
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "b"),
                (":path", "/pkg.Svc/Slow"),
                ("content-type", "application/grpc"),
                ("grpc-timeout", "100m"),
            ],
        )
        await c.flush()
        await until(lambda: started)  # the request reached the app, deadline header intact
        c.conn.reset_stream(sid, error_code=0x8)
        await c.flush()
        await until(lambda: seen)
        await c.close()
        await mesh.close()
        server.close()

    run(scenario())
    assert started == ["100m"]
    assert seen == [0x8]


def test_public_listener_sets_forwarded_unknown_and_no_client_identity(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, clients="public", allow=())
        code, out, err = await curl(
            "--http2",
            "--cacert",
            str(ca.trust),
            "--resolve",
            f"backend.{DOMAIN}:{mesh.port}:127.0.0.1",
            "-H",
            "l5d-client-id: admin.http.test",
            "-H",
            "x-forwarded-client-cert: URI=x",
            f"https://backend.{DOMAIN}:{mesh.port}/headers",
        )
        await mesh.close()
        assert code == 0, err
        h = headers_of(json.loads(out))
        assert "l5d-client-id" not in h
        assert "x-forwarded-client-cert" not in h
        assert h["forwarded"] == ["for=unknown;proto=https"]

    run(scenario())
