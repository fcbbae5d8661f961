"""The data plane on loopback: real TLS 1.3, real Unix sockets, a PKI built per session.

Topology of most scenarios:

    app --unix--> outbound (frontend cert) --mTLS--> inbound (backend cert) --unix--> app

Every scenario with a listener runs on both TLS backends: ``py`` (stdlib ssl on uvloop)
and ``c`` (the native engine of meshproxy._native_tls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509

from meshproxy import pki
from meshproxy.proxy import (
    AdminServer,
    ConnectionSet,
    InboundListener,
    InboundSpec,
    OutboundListener,
    OutboundSpec,
    connect_unix,
)
from meshproxy.proxy._native import NativeInboundListener, NativeOutboundListener
from meshproxy.tls import (
    NativeEngine,
    TLSIdentity,
    client_context,
    native_client_context,
    native_module,
    native_server_context,
    server_context,
)

DOMAIN = "mesh.local"


# -- a fresh PKI per session ---------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    root: pki.Authority
    intermediate: pki.Authority
    stale: pki.Authority  # an older intermediate of the same root (an outdated manifest)
    ids: dict[str, TLSIdentity]

    @property
    def root_pem(self) -> bytes:
        return pki.cert_to_pem(self.root.cert)


def _leaf(issuer: pki.Authority, marble_type: str, now: datetime) -> TLSIdentity:
    key = pki.generate_key()
    cert = pki.issue_leaf(
        issuer,
        pki.make_csr(key, marble_type, ["localhost"]),
        trust_domain=DOMAIN,
        marble_type=marble_type,
        instance=uuid.uuid4(),
        dns_names=["localhost", f"{marble_type}.mesh.local"],
        lifetime=timedelta(hours=1),
        now=now,
        simulated=True,
    )
    return TLSIdentity(
        chain_pem=pki.certs_to_pem([cert, issuer.cert]),
        key_pem=pki.key_to_pem(key),
        trust_pem=pki.cert_to_pem(issuer.cert),
    )


@pytest.fixture(scope="session")
def ca() -> Pki:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    inter = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())
    stale = pki.create_intermediate(
        root, now=now - timedelta(days=1), simulated=True, key=pki.generate_key()
    )
    ids = {t: _leaf(inter, t, now) for t in ("frontend", "backend", "intruder")}
    old = _leaf(stale, "frontend", now)
    # the stale leaf trusts the current intermediate, so only the server can refuse it
    ids["stale-frontend"] = TLSIdentity(old.chain_pem, old.key_pem, pki.cert_to_pem(inter.cert))
    return Pki(root, inter, stale, ids)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short.
    path = Path(tempfile.mkdtemp(prefix="mp-", dir="/tmp"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Events(logging.Handler):
    """The proxy's structured log lines, as dicts."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(dict(record.__dict__))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger("meshproxy")
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


_RESOURCES: list[Any] = []


def keep(resource: Any) -> Any:
    """Close this server or listener when the scenario ends."""
    _RESOURCES.append(resource)
    return resource


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run a scenario on uvloop, then shut everything down so no transport outlives it."""

    async def bounded() -> None:
        try:
            await asyncio.wait_for(scenario, 30)
        finally:
            resources = _RESOURCES[::-1]
            _RESOURCES.clear()
            for r in resources:
                if hasattr(r, "stop_accepting"):  # our listeners
                    r.stop_accepting()
            for r in resources:
                if isinstance(r, ConnectionSet):
                    await r.drain(2.0)
            for r in resources:
                if isinstance(r, NativeEngine):
                    await r.aclose()
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:  # the apps' handlers, finishing on their EOFs
                await asyncio.wait(others, timeout=2.0)
            for r in resources:
                if hasattr(r, "wait_closed"):  # asyncio (or uvloop) servers
                    r.close()
                    await r.wait_closed()

    uvloop.run(bounded())


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- the two backends ----------------------------------------------------------------------
Inbound = InboundListener | NativeInboundListener
Outbound = OutboundListener | NativeOutboundListener


@dataclass
class Backend:
    """Builds listeners on one TLS backend; the native engine lives for one scenario."""

    name: str  # "py" | "c"
    _engine: NativeEngine | None = None

    def engine(self) -> NativeEngine:
        if self._engine is None or self._engine._loop is not asyncio.get_running_loop():
            self._engine = keep(NativeEngine(threads=2))
        return self._engine

    def inbound(
        self, spec: InboundSpec, identity: TLSIdentity, connections: ConnectionSet
    ) -> Inbound:
        client_auth = spec.clients != "public"
        if self.name == "py":
            return InboundListener(spec, server_context(identity, client_auth=client_auth),
                                   connections)  # fmt: skip
        ctx = native_server_context(identity, client_auth=client_auth)
        return NativeInboundListener(spec, ctx, self.engine(), connections)

    def outbound(
        self, spec: OutboundSpec, identity: TLSIdentity, connections: ConnectionSet
    ) -> Outbound:
        if self.name == "py":
            return OutboundListener(spec, client_context(identity), connections)
        ctx = native_client_context(identity)
        return NativeOutboundListener(spec, ctx, self.engine(), connections)


# native_tls/test-asan.sh runs only "c" under the sanitizers
BACKENDS = os.environ.get("MESHPROXY_TEST_BACKENDS", "py,c").split(",")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "c" and native_module() is None:
        if os.environ.get("MESHPROXY_NATIVE") == "off":
            pytest.skip("MESHPROXY_NATIVE=off")
        pytest.fail("meshproxy._native_tls is not built: pip install -e . compiles it")
    return Backend(request.param)


# -- building blocks -----------------------------------------------------------------------
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@dataclass
class Mesh:
    inbound_port: int
    outbound_socket: Path
    app_socket: Path
    connections: ConnectionSet


async def start_mesh(
    ca: Pki,
    workdir: Path,
    backend: Backend,
    app: Handler | None = echo,
    *,
    server: str = "backend",
    client: str = "frontend",
    allow: tuple[str, ...] = ("frontend",),
    peer: str = "backend",
    sni: str | None = None,
) -> Mesh:
    connections = keep(ConnectionSet())
    app_socket = workdir / "inbound-api.sock"
    if app is not None:
        keep(await asyncio.start_unix_server(app, path=str(app_socket)))
    inbound = backend.inbound(
        InboundSpec("api", "127.0.0.1", 0, "marbles", allow, DOMAIN, app_socket),
        ca.ids[server],
        connections,
    )
    _, port = await keep(inbound).start()
    out_socket = workdir / "outbound-store.sock"
    outbound = backend.outbound(
        OutboundSpec("store", out_socket, "127.0.0.1", port, sni, peer, DOMAIN),
        ca.ids[client],
        connections,
    )
    await keep(outbound).start()
    return Mesh(port, out_socket, app_socket, connections)


async def app_connect(mesh: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(mesh.outbound_socket))


# -- scenarios -----------------------------------------------------------------------------
def test_bytes_round_trip_through_outbound_and_inbound(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend)
        reader, writer = await app_connect(mesh)
        writer.write(b"hello through the mesh")
        writer.write_eof()
        assert await reader.read() == b"hello through the mesh"
        writer.close()
        await eventually(lambda: len(events.named("inbound.close")) == 1, "inbound close line")
        await eventually(lambda: len(events.named("outbound.close")) == 1, "outbound close")

    run(scenario())
    accept = events.named("inbound.accept")[0]
    assert accept["listener"] == "api"
    assert accept["peer"] == f"spiffe://{DOMAIN}/marble/frontend"
    assert uuid.UUID(accept["peer_uuid"])
    assert events.named("outbound.connect")[0]["peer"] == f"spiffe://{DOMAIN}/marble/backend"
    closed = events.named("inbound.close")[0]
    assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (22, 22, "eof")
    out_closed = events.named("outbound.close")[0]
    assert (out_closed["bytes_out"], out_closed["bytes_in"]) == (22, 22)


def test_16_mib_random_payload_both_ways_compares_equal(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    payload = os.urandom(16 * 1024 * 1024)

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend)
        reader, writer = await app_connect(mesh)

        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(view), 1 << 20):
                writer.write(view[i : i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = bytearray()
        while chunk := await reader.read(1 << 20):
            received += chunk
        await sender
        writer.close()
        assert len(received) == len(payload)
        assert received == payload

    run(scenario())


def test_half_close_from_the_client_keeps_the_reply_direction(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    async def counting_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF arrives through both proxies
        writer.write(f"got {len(data)} bytes".encode())
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend, counting_server)
        reader, writer = await app_connect(mesh)
        writer.write(b"x" * 100_000)
        writer.write_eof()
        assert await reader.read() == b"got 100000 bytes"
        writer.close()

    run(scenario())


def test_half_close_from_the_server_keeps_the_request_direction(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    async def scenario() -> None:
        late: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def banner_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"banner")
            writer.write_eof()  # the server is done talking, but still listens
            late.set_result(await reader.read())
            writer.close()

        mesh = await start_mesh(ca, workdir, backend, banner_server)
        reader, writer = await app_connect(mesh)
        assert await reader.read() == b"banner"  # read() returns at EOF
        writer.write(b"sent after the server's half-close")
        writer.write_eof()
        assert await late == b"sent after the server's half-close"
        writer.close()

    run(scenario())


def test_intruder_certificate_is_refused_with_the_reason_logged(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    reached_app: list[bool] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached_app.append(True)
        writer.close()

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend, app, client="intruder")
        reader, writer = await app_connect(mesh)
        writer.write(b"let me in")
        assert await reader.read() == b""
        writer.close()
        await eventually(lambda: bool(events.named("inbound.refused")), "refusal line")

    run(scenario())
    refused = events.named("inbound.refused")[0]
    assert refused["listener"] == "api"
    assert "marble/intruder" in refused["reason"]
    assert "not allowed" in refused["reason"]
    assert refused["remote"].startswith("127.0.0.1:")
    assert not reached_app
    assert not events.named("inbound.accept")


def test_leaf_of_another_intermediate_is_refused(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend, client="stale-frontend")
        reader, writer = await app_connect(mesh)
        writer.write(b"hello from an outdated manifest")
        assert await reader.read() == b""
        writer.close()
        await eventually(lambda: bool(events.named("inbound.refused")), "refusal line")

    run(scenario())
    reason = events.named("inbound.refused")[0]["reason"]
    assert "TLS handshake failed" in reason
    assert "certificate" in reason
    assert not events.named("inbound.accept")


def test_outbound_refuses_a_server_that_proves_the_wrong_type(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend, server="intruder", allow=("frontend",))
        reader, writer = await app_connect(mesh)
        writer.write(b"secret request")
        assert await reader.read() == b""
        writer.close()
        await eventually(lambda: bool(events.named("outbound.refused")), "refusal line")

    run(scenario())
    refused = events.named("outbound.refused")[0]
    assert refused["listener"] == "store"
    assert "server spiffe://mesh.local/marble/intruder" in refused["reason"]
    assert not events.named("outbound.connect")
    # not a byte of the request reached the impostor
    assert all(line["bytes_in"] == 0 for line in events.named("inbound.close"))


def test_inbound_closes_tls_when_the_app_is_not_listening(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend, app=None)
        reader, writer = await app_connect(mesh)
        assert await reader.read() == b""
        writer.close()
        await eventually(lambda: bool(events.named("inbound.app_unavailable")), "log line")

    run(scenario())
    line = events.named("inbound.app_unavailable")[0]
    assert line["socket"].endswith("inbound-api.sock")
    assert line["peer"] == f"spiffe://{DOMAIN}/marble/frontend"


def test_a_burst_beyond_the_apps_accept_backlog_waits_instead_of_failing(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    """The app listens with backlog 1 and accepts one connection per 2 ms; 200 clients
    at once. On AF_UNIX a full backlog makes connect() fail with EAGAIN: the proxy must
    wait for room like a blocking connect, not report "app is not listening"."""
    n = 200

    async def slow_app(app_socket: Path) -> None:
        loop = asyncio.get_running_loop()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(app_socket))
        srv.listen(1)
        srv.setblocking(False)
        try:
            while True:
                conn, _ = await loop.sock_accept(srv)
                reader, writer = await asyncio.open_unix_connection(sock=conn)
                keep_task(asyncio.ensure_future(echo(reader, writer)))
                await asyncio.sleep(0.002)
        finally:
            srv.close()

    tasks: list[asyncio.Future[None]] = []

    def keep_task(task: asyncio.Future[None]) -> None:
        tasks.append(task)

    async def one(mesh: Mesh, i: int) -> bytes:
        # the outbound socket's own backlog is 128: the client waits for room too
        sock = await connect_unix(mesh.outbound_socket, timeout=20)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        writer.write(b"burst %d" % i)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data

    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend, app=None)
        app = asyncio.ensure_future(slow_app(mesh.app_socket))
        await eventually(mesh.app_socket.exists, "the app's socket")
        try:
            got = await asyncio.gather(*(one(mesh, i) for i in range(n)))
            assert got == [b"burst %d" % i for i in range(n)]
            await eventually(lambda: len(events.named("inbound.close")) == n, "close lines")
        finally:
            app.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(app, *tasks, return_exceptions=True)

    run(scenario())
    assert events.named("inbound.app_unavailable") == []


def test_outbound_sends_client_hello_at_once_with_sni_and_no_alpn(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    """Meshes sniff the first bytes; the app's silence must not delay the ClientHello."""

    async def scenario() -> None:
        seen: dict[str, object] = {}
        ctx = server_context(ca.ids["backend"], client_auth=True)
        ctx.set_alpn_protocols(["istio-peer-exchange", "istio", "h2"])

        def sni(obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            seen["sni"] = name

        ctx.sni_callback = sni  # type: ignore[assignment]
        first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first.set_result(await reader.read(5))
            writer.close()

        tcp = keep(await asyncio.start_server(upstream, "127.0.0.1", 0))
        port = tcp.sockets[0].getsockname()[1]
        out = backend.outbound(
            OutboundSpec(
                "store",
                workdir / "o.sock",
                "127.0.0.1",
                port,
                "backend.mesh.local",
                "backend",
                DOMAIN,
            ),
            ca.ids["frontend"],
            keep(ConnectionSet()),
        )
        await keep(out).start()
        _, silent = await asyncio.open_unix_connection(str(workdir / "o.sock"))
        record = await asyncio.wait_for(first, 5)
        assert record[0] == 0x16  # a TLS handshake record: the ClientHello
        silent.close()
        tcp.close()

        # the same with a real TLS server: SNI as configured, no ALPN offered at all
        async def alpn_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["alpn"] = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            await echo(reader, writer)

        tls = keep(await asyncio.start_server(alpn_echo, "127.0.0.1", 0, ssl=ctx))
        port = tls.sockets[0].getsockname()[1]
        out2 = backend.outbound(
            OutboundSpec(
                "sni",
                workdir / "s.sock",
                "127.0.0.1",
                port,
                "backend.mesh.local",
                "backend",
                DOMAIN,
            ),
            ca.ids["frontend"],
            keep(ConnectionSet()),
        )
        await keep(out2).start()
        reader, writer = await asyncio.open_unix_connection(str(workdir / "s.sock"))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        tls.close()
        assert seen["sni"] == "backend.mesh.local"
        assert seen["alpn"] is None  # offered nothing, so not even istio could be picked

    run(scenario())


def test_outbound_socket_is_private(ca: Pki, workdir: Path, backend: Backend) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend)
        assert mesh.outbound_socket.stat().st_mode & 0o777 == 0o600

    run(scenario())


async def _public_inbound(ca: Pki, workdir: Path, backend: Backend, app: Handler) -> int:
    app_socket = workdir / "inbound-web.sock"
    keep(await asyncio.start_unix_server(app, path=str(app_socket)))
    inbound = backend.inbound(
        InboundSpec("web", "127.0.0.1", 0, "public", (), DOMAIN, app_socket),
        ca.ids["frontend"],
        keep(ConnectionSet()),
    )
    _, port = await keep(inbound).start()
    return port


def test_public_inbound_serves_a_client_without_certificate(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        port = await _public_inbound(ca, workdir, backend, echo)
        client = ssl.create_default_context(cadata=ca.root_pem.decode())  # verifies the name
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        writer.write(b"anonymous hello")
        assert await reader.readexactly(15) == b"anonymous hello"
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    run(scenario())
    assert events.named("inbound.accept")[0]["peer"] == "anonymous"


def test_curl_with_cacert_reaches_the_app_behind_a_public_inbound(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    async def http_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"hello from behind the proxy\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        port = await _public_inbound(ca, workdir, backend, http_app)
        cafile = workdir / "root.pem"
        cafile.write_bytes(ca.root_pem)
        curl = await asyncio.create_subprocess_exec(
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--cacert",
            str(cafile),
            f"https://localhost:{port}/",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await curl.communicate()
        assert curl.returncode == 0, err.decode()
        assert out == b"hello from behind the proxy\n"

    run(scenario())


def test_connections_drain_then_are_cancelled_after_the_grace_period(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend)
        reader, writer = await app_connect(mesh)
        writer.write(b"still open")
        assert await reader.readexactly(10) == b"still open"
        assert len(mesh.connections) == 2  # the outbound and the inbound side
        assert await mesh.connections.drain(0.2) == 2
        assert await reader.read() == b""  # the app sees the end, not a hang
        writer.close()

    run(scenario())


def _cert_type(identity: TLSIdentity) -> str:
    cert = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    return pki.identity_of(cert).marble_type


def test_the_session_pki_has_the_expected_identities(ca: Pki) -> None:
    assert _cert_type(ca.ids["intruder"]) == "intruder"
    assert _cert_type(ca.ids["stale-frontend"]) == "frontend"


def test_a_peer_reset_ends_the_connection_with_a_reason_and_no_traceback(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        app_done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            app_done.set_result(await reader.read())  # sees the end, whatever the cause
            writer.close()

        mesh = await start_mesh(ca, workdir, backend, app)
        ctx = client_context(ca.ids["frontend"])
        _, writer = await asyncio.open_connection("127.0.0.1", mesh.inbound_port, ssl=ctx)
        writer.write(b"half a request")
        await writer.drain()
        await eventually(lambda: bool(events.named("inbound.accept")), "accept")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN
        assert await asyncio.wait_for(app_done, 5) == b"half a request"
        await eventually(lambda: bool(events.named("inbound.close")), "close line")

    run(scenario())
    closed = events.named("inbound.close")[0]
    assert closed["bytes_in"] == len(b"half a request")
    assert "reset" in closed["reason"] or "close_notify" in closed["reason"]
    assert not events.named("connection.internal_error")
    assert not [r for r in events.records if r.get("exc_info")]


def test_an_unreachable_upstream_closes_the_app_connection_and_says_why(
    ca: Pki, workdir: Path, backend: Backend, events: Events
) -> None:
    async def scenario() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # nobody listens here once closed
        out = backend.outbound(
            OutboundSpec("store", workdir / "o.sock", "127.0.0.1", port, None, "backend", DOMAIN),
            ca.ids["frontend"],
            keep(ConnectionSet()),
        )
        await keep(out).start()
        reader, writer = await asyncio.open_unix_connection(str(workdir / "o.sock"))
        assert await reader.read() == b""
        writer.close()
        await eventually(lambda: bool(events.named("outbound.error")), "error line")

    run(scenario())
    reason = events.named("outbound.error")[0]["reason"]
    assert "127.0.0.1:" in reason
    assert "refused" in reason.lower()


def test_admin_endpoint_answers_live_and_ready(workdir: Path) -> None:
    async def scenario() -> None:
        state = {"ready": False}
        admin = AdminServer(workdir / "admin.sock", ready=lambda: state["ready"])
        await admin.start()

        async def get(path: str, method: str = "GET") -> tuple[bytes, bytes]:
            reader, writer = await asyncio.open_unix_connection(str(workdir / "admin.sock"))
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
            response = await reader.read()
            writer.close()
            head, _, body = response.partition(b"\r\n\r\n")
            return head.split(b"\r\n")[0], body

        assert await get("/live") == (b"HTTP/1.1 200 OK", b"live\n")
        assert (await get("/ready"))[0] == b"HTTP/1.1 503 Service Unavailable"
        state["ready"] = True
        assert await get("/ready") == (b"HTTP/1.1 200 OK", b"ready\n")
        assert (await get("/metrics"))[0] == b"HTTP/1.1 404 Not Found"
        assert (await get("/ready", "POST"))[0] == b"HTTP/1.1 405 Method Not Allowed"
        assert (workdir / "admin.sock").stat().st_mode & 0o777 == 0o600
        await admin.close()
        assert not (workdir / "admin.sock").exists()

    run(scenario())


def test_shutdown_drops_a_client_stuck_before_its_handshake(
    ca: Pki, workdir: Path, backend: Backend
) -> None:
    async def scenario() -> None:
        mesh = await start_mesh(ca, workdir, backend)
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.inbound_port)
        await eventually(lambda: len(mesh.connections) == 1, "the connection to be served")
        assert await mesh.connections.drain(0.1) == 1
        assert await reader.read() == b""  # closed by the proxy, not left hanging
        writer.close()

    run(scenario())
