"""The native TLS engine on loopback: real TLS 1.3, real sockets, its own PKI.

Two topologies:

* the mesh: app --unix--> native outbound --mTLS--> native inbound --unix--> app
  (both ends relayed by the C engine, so every byte crosses it twice);
* a stdlib ``ssl`` client talking to a native inbound, when the test needs to control
  the TLS peer (resets, certificates seen, ALPN, tickets).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import resource
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from meshproxy import pki
from meshproxy.errors import MeshError, NativeUnavailable, PKIError
from meshproxy.proxy import ConnectionSet, InboundSpec, OutboundSpec
from meshproxy.proxy._admin import AdminServer
from meshproxy.proxy._metrics import ProxyMetrics
from meshproxy.proxy._native import NativeInboundListener, NativeOutboundListener
from meshproxy.tls import (
    NativeEngine,
    TLSIdentity,
    active_backend,
    client_context,
    describe_backend,
    native_client_context,
    native_module,
    native_server_context,
    select_backend,
)

DOMAIN = "mesh.local"
ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    native_module() is None and os.environ.get("MESHPROXY_NATIVE") == "off",
    reason="MESHPROXY_NATIVE=off",
)


# -- PKI ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    root: pki.Authority
    intermediate: pki.Authority
    foreign: pki.Authority  # an intermediate of another root
    now: datetime

    def leaf(self, marble_type: str, issuer: pki.Authority | None = None) -> TLSIdentity:
        issuer = issuer or self.intermediate
        key = pki.generate_key()
        cert = pki.issue_leaf(
            issuer,
            pki.make_csr(key, marble_type, ["localhost"]),
            trust_domain=DOMAIN,
            marble_type=marble_type,
            instance=uuid.uuid4(),
            dns_names=["localhost"],
            lifetime=timedelta(hours=1),
            now=self.now,
            simulated=True,
        )
        return TLSIdentity(
            pki.certs_to_pem([cert, issuer.cert]),
            pki.key_to_pem(key),
            pki.cert_to_pem(self.intermediate.cert),
        )


@pytest.fixture(scope="module")
def ca() -> Pki:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    other = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    return Pki(
        root,
        pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key()),
        pki.create_intermediate(other, now=now, simulated=True, key=pki.generate_key()),
        now,
    )


@pytest.fixture(scope="module")
def ids(ca: Pki) -> dict[str, TLSIdentity]:
    return {t: ca.leaf(t) for t in ("frontend", "backend")} | {
        "backend-2": ca.leaf("backend"),
        "foreign": ca.leaf("frontend", ca.foreign),
    }


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mpn-", dir="/tmp"))  # short: Unix socket paths
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


# -- harness --------------------------------------------------------------------------------
def run(scenario: Callable[[Scene], Coroutine[Any, Any, None]], timeout: float = 30) -> None:
    """Run a scenario on uvloop with an engine, then stop everything it started."""

    async def main() -> None:
        scene = Scene(NativeEngine(threads=2))
        try:
            await asyncio.wait_for(scenario(scene), timeout)
        finally:
            await scene.aclose()

    uvloop.run(main())


@dataclass
class Scene:
    engine: NativeEngine
    connections: ConnectionSet = field(default_factory=ConnectionSet)
    closers: list[Any] = field(default_factory=list)

    async def aclose(self) -> None:
        for c in self.closers:
            if hasattr(c, "stop_accepting"):  # our listeners
                c.stop_accepting()
            else:  # the apps' servers
                c.close()
        await self.connections.drain(2.0)
        await self.engine.aclose()

    async def app(self, path: Path, handler: Handler) -> None:
        self.closers.append(await asyncio.start_unix_server(handler, path=str(path)))

    async def inbound(
        self, workdir: Path, identity: TLSIdentity, *, clients: str = "marbles"
    ) -> tuple[NativeInboundListener, int]:
        spec = InboundSpec(
            "api", "127.0.0.1", 0, clients, ("frontend",), DOMAIN, workdir / "app.sock"
        )
        ctx = native_server_context(identity, client_auth=clients == "marbles")
        listener = NativeInboundListener(spec, ctx, self.engine, self.connections)
        _, port = await listener.start()
        self.closers.append(listener)
        return listener, port

    async def mesh(self, workdir: Path, ids: dict[str, TLSIdentity], handler: Handler) -> Path:
        """app -> native outbound -> native inbound -> ``handler``; returns the app socket."""
        await self.app(workdir / "app.sock", handler)
        _, port = await self.inbound(workdir, ids["backend"])
        out = workdir / "out.sock"
        spec = OutboundSpec("store", out, "127.0.0.1", port, None, "backend", DOMAIN)
        ctx = native_client_context(ids["frontend"])
        outbound = NativeOutboundListener(spec, ctx, self.engine, self.connections)
        await outbound.start()
        self.closers.append(outbound)
        return out


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def send_all(writer: asyncio.StreamWriter, data: bytes, chunk: int = MiB) -> None:
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        writer.write(view[i : i + chunk])
        await writer.drain()


async def tls_client(
    port: int, identity: TLSIdentity
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=client_context(identity))


def leaf_der(identity: TLSIdentity) -> bytes:
    return pki.cert_from_pem(identity.chain_pem).public_bytes(serialization.Encoding.DER)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


# -- bytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 65_537, 64 * MiB], ids=["1B", "64KiB+1", "64MiB"])
def test_random_payloads_cross_both_ways_at_once_and_compare_equal(
    ids: dict[str, TLSIdentity], workdir: Path, size: int
) -> None:
    up, down = os.urandom(size), os.urandom(size)
    got: dict[str, bytes] = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = asyncio.ensure_future(send_all(writer, down))
        got["server"] = await reader.read()  # to the client's EOF, while sending
        await sender
        writer.write_eof()
        writer.close()

    async def scenario(scene: Scene) -> None:
        out = await scene.mesh(workdir, ids, server)
        reader, writer = await asyncio.open_unix_connection(str(out))

        async def send_then_eof() -> None:
            await send_all(writer, up)
            writer.write_eof()

        sender = asyncio.ensure_future(send_then_eof())
        received = bytearray()
        while chunk := await reader.read(MiB):
            received += chunk
        await sender
        await eventually(lambda: "server" in got, "the server's EOF")
        got["client"] = bytes(received)
        writer.close()
        await eventually(lambda: scene.engine.stats()["active"] == 0, "both relays to end")

    run(scenario)
    assert hashlib.sha256(got["server"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["client"]).digest() == hashlib.sha256(down).digest()


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_half_close_keeps_the_other_direction_open(
    ids: dict[str, TLSIdentity], workdir: Path, who: str
) -> None:
    """EOF from one app becomes close_notify, then EOF at the other app, which can still
    answer; the connection ends cleanly (reason None) only when both directions ended."""
    seen: dict[str, bytes] = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if who == "client":
            seen["server"] = await reader.read()  # EOF arrives through both engines
            writer.write(b"reply after your EOF")
        else:
            writer.write(b"banner")
            writer.write_eof()
            seen["server"] = await reader.read()
        await writer.drain()
        writer.close()

    async def scenario(scene: Scene) -> None:
        out = await scene.mesh(workdir, ids, server)
        reader, writer = await asyncio.open_unix_connection(str(out))
        if who == "client":
            writer.write(b"request")
            writer.write_eof()
            seen["client"] = await reader.read()
        else:
            seen["client"] = await reader.read()  # the server's EOF
            writer.write(b"sent after the server's EOF")
            writer.write_eof()
            await eventually(lambda: "server" in seen, "the server to read")
        writer.close()
        await eventually(lambda: scene.engine.stats()["closed"] == 2, "both relays to end")

    run(scenario)
    if who == "client":
        assert seen == {"server": b"request", "client": b"reply after your EOF"}
    else:
        assert seen == {"client": b"banner", "server": b"sent after the server's EOF"}


def test_a_peer_reset_mid_stream_ends_with_a_reason_and_the_engine_carries_on(
    ids: dict[str, TLSIdentity], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app_saw: list[bytes] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while True:  # the app keeps streaming: the reset meets a busy relay
                writer.write(b"x" * 65536)
                await writer.drain()
        app_saw.append(b"the end")  # an error, not a hang
        writer.close()

    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", flood)
        _, port = await scene.inbound(workdir, ids["backend"])
        reader, writer = await tls_client(port, ids["frontend"])
        writer.write(b"half a request")
        await writer.drain()
        assert len(await reader.readexactly(1 << 20)) == 1 << 20  # mid-stream
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST
        await eventually(lambda: scene.engine.stats()["closed"] == 1, "the close event")
        # the engine is fine: the next connection relays
        reader, writer = await tls_client(port, ids["frontend"])
        assert len(await reader.readexactly(1000)) == 1000
        writer.close()

    caplog.set_level("INFO", "meshproxy")
    run(scenario)
    closes = [r for r in caplog.records if getattr(r, "event", "") == "inbound.close"]
    reason = closes[0].reason  # type: ignore[attr-defined]
    assert "reset" in reason or "close_notify" in reason or "broken pipe" in reason, reason
    assert closes[0].bytes_in == len(b"half a request")  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info]


def test_a_slow_reader_applies_back_pressure_with_bounded_memory(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    total = 64 * MiB
    payload = os.urandom(total)
    state: dict[str, Any] = {}

    async def paused_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await state["go"].wait()  # reads nothing until released
        received = bytearray()
        while chunk := await reader.read(MiB):
            received += chunk
        state["received"] = bytes(received)
        writer.close()

    async def scenario(scene: Scene) -> None:
        state["go"] = asyncio.Event()
        await scene.app(workdir / "app.sock", paused_app)
        _, port = await scene.inbound(workdir, ids["backend"])
        _, writer = await tls_client(port, ids["frontend"])
        sent = {"n": 0}

        async def writer_task() -> None:
            for i in range(0, total, 256 * 1024):
                writer.write(payload[i : i + 256 * 1024])
                await writer.drain()
                sent["n"] = i + 256 * 1024
            writer.close()

        rss_before = rss_bytes()
        task = asyncio.ensure_future(writer_task())
        await asyncio.sleep(1.0)
        stuck_at = sent["n"]
        await asyncio.sleep(0.5)
        assert sent["n"] == stuck_at, "the writer is blocked while the app reads nothing"
        assert stuck_at < 24 * MiB  # kernel socket buffers + a few engine buffers
        assert scene.engine.stats()["buffer_bytes"] <= 1 * MiB
        assert rss_bytes() - rss_before < 48 * MiB
        state["go"].set()
        await task
        await eventually(lambda: "received" in state, "the app to read everything")

    run(scenario)
    assert state["received"] == payload


def test_a_peer_reading_in_small_slow_bites_gets_every_byte_in_order(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    """App -> TLS behind a slow reader: the engine's buffers stay full and drain a record
    at a time (the path where a full buffer waits for its reader instead of compacting)."""
    total = 24 * MiB
    payload = os.urandom(total)
    state: dict[str, Any] = {}

    async def fast_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_all(writer, payload)
        await reader.read()  # to the client's end: it reads everything first
        writer.close()

    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", fast_app)
        _, port = await scene.inbound(workdir, ids["backend"])
        reader, writer = await tls_client(port, ids["frontend"])
        received = bytearray()
        bites = 0
        while len(received) < total:  # bites of no record's size: partial records
            received += await reader.readexactly(min(7_001, total - len(received)))
            bites += 1
            if bites % 256 == 0:
                await asyncio.sleep(0.002)  # the engine's out buffer fills meanwhile
        state["received"] = bytes(received)
        writer.close()
        await eventually(lambda: scene.engine.stats()["active"] == 0, "the relay to end")

    run(scenario)
    assert hashlib.sha256(state["received"]).digest() == hashlib.sha256(payload).digest()


def test_a_thousand_concurrent_connections_complete(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    """1,000 app connections through the mesh: 2,000 engine sessions open at once."""
    count = 1000
    fds_before = open_fds()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.close()

    async def scenario(scene: Scene) -> None:
        out = await scene.mesh(workdir, ids, echo)
        limit = asyncio.Semaphore(100)  # the outbound socket's backlog is 128

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            async with limit:
                return await asyncio.open_unix_connection(str(out))

        conns = await asyncio.gather(*(connect() for _ in range(count)))
        await eventually(
            lambda: scene.engine.stats()["handshakes"] == 2 * count, "every handshake", 40
        )
        assert scene.engine.stats()["active"] == 2 * count

        async def exchange(
            i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bytes:
            writer.write(b"%d" % i)
            writer.write_eof()
            data = await reader.read()
            writer.close()
            return data

        results = await asyncio.gather(*(exchange(i, *c) for i, c in enumerate(conns)))
        assert results == [b"%d" % i for i in range(count)]
        await eventually(lambda: scene.engine.stats()["active"] == 0, "every relay to end")
        assert scene.engine.stats()["closed"] == 2 * count

    run(scenario, timeout=50)
    gc.collect()
    assert open_fds() - fds_before == set()  # every fd closed exactly once, none leaked


def test_a_context_swap_keeps_open_sessions_and_new_ones_show_the_new_certificate(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        listener, port = await scene.inbound(workdir, ids["backend"])
        r1, w1 = await tls_client(port, ids["frontend"])
        w1.write(b"before")
        assert await r1.readexactly(6) == b"before"
        listener.set_context(native_server_context(ids["backend-2"], client_auth=True))
        gc.collect()  # the old context's Python object is gone; its session keeps the SSL_CTX
        r2, w2 = await tls_client(port, ids["frontend"])
        w2.write(b"new")
        assert await r2.readexactly(3) == b"new"
        old = w1.get_extra_info("ssl_object").getpeercert(binary_form=True)
        new = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert old == leaf_der(ids["backend"])
        assert new == leaf_der(ids["backend-2"])
        w1.write(b"after the swap")
        assert await r1.readexactly(14) == b"after the swap"
        w1.close()
        w2.close()

    run(scenario)


# -- handshakes and their events -----------------------------------------------------------
def test_handshake_events_carry_certificate_version_cipher_and_alpn(
    ca: Pki, ids: dict[str, TLSIdentity]
) -> None:
    async def scenario(scene: Scene) -> None:
        native = native_module()
        assert native is not None
        server_ctx = native.Context(
            ids["backend"].chain_pem, bytearray(ids["backend"].key_pem.reveal()),
            ids["backend"].trust_pem, server=True, verify_peer=True, alpn=("h2", "http/1.1"),
        )  # fmt: skip
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        client = client_context(ids["frontend"], alpn=["http/1.1", "h2"])
        connecting = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port, ssl=client))
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        conn, _ = await loop.sock_accept(listener)
        session = scene.engine.handshake(conn, server_ctx, server_side=True)
        hs = await session.handshake(5)
        _, writer = await connecting
        assert hs.peer_cert == leaf_der(ids["frontend"])
        assert (hs.version, hs.alpn) == ("TLSv1.3", "h2")  # the server's preference
        assert hs.cipher.startswith("TLS_")
        assert writer.get_extra_info("ssl_object").session.has_ticket is False
        session.close("test done")
        closed = await session.wait_closed()
        assert closed.reason == "test done"
        writer.close()
        listener.close()

    run(scenario)


def test_a_foreign_client_fails_the_handshake_with_the_verify_reason(
    ids: dict[str, TLSIdentity], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", lambda r, w: asyncio.sleep(0))
        _, port = await scene.inbound(workdir, ids["backend"])
        reader, writer = await tls_client(port, ids["foreign"])
        # TLS 1.3: the server's refusal (an alert) comes after the client's Finished
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert await reader.read() == b""
        writer.close()
        await eventually(lambda: scene.engine.stats()["handshake_failures"] == 1, "failure")

    caplog.set_level("INFO", "meshproxy")
    run(scenario)
    refused = [r for r in caplog.records if getattr(r, "event", "") == "inbound.refused"]
    assert "TLS handshake failed: certificate verify failed" in refused[0].reason  # type: ignore[attr-defined]


def test_a_client_that_never_speaks_is_dropped_at_the_handshake_timeout(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    async def scenario(scene: Scene) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        silent = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.setblocking(False)
        ctx = native_server_context(ids["backend"], client_auth=True)
        session = scene.engine.handshake(conn, ctx, server_side=True)
        with pytest.raises(Exception, match="timed out"):
            await session.handshake(0.2)
        assert (await session.wait_closed()).reason == "TLS handshake timed out"
        silent.settimeout(5)
        assert silent.recv(10) == b""
        silent.close()
        listener.close()

    run(scenario)


@pytest.mark.parametrize("min_version", ["1.3", "1.2"])
def test_tls12_clients_are_refused_unless_configured(
    ids: dict[str, TLSIdentity], min_version: str
) -> None:
    async def scenario(scene: Scene) -> None:
        native = native_module()
        assert native is not None
        backend = ids["backend"]
        ctx = native.Context(backend.chain_pem, bytearray(backend.key_pem.reveal()), None,
                             server=True, verify_peer=False, min_version=min_version)  # fmt: skip
        listener = socket.create_server(("127.0.0.1", 0))
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        loop = asyncio.get_running_loop()
        port = listener.getsockname()[1]
        connecting = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port, ssl=old))
        listener.setblocking(False)
        conn, _ = await loop.sock_accept(listener)
        session = scene.engine.handshake(conn, ctx, server_side=True)
        if min_version == "1.3":
            with pytest.raises(Exception, match="protocol"):
                await session.handshake(5)
            with pytest.raises(ssl.SSLError):
                await connecting
        else:
            assert (await session.handshake(5)).version == "TLSv1.2"
            _, writer = await connecting
            writer.close()
            session.close("test done")
        listener.close()

    run(scenario)


@pytest.mark.parametrize("tickets", [False, True])
def test_session_tickets_are_sent_only_when_configured(
    ids: dict[str, TLSIdentity], tickets: bool
) -> None:
    async def scenario(scene: Scene) -> None:
        native = native_module()
        assert native is not None
        backend = ids["backend"]
        ctx = native.Context(backend.chain_pem, bytearray(backend.key_pem.reveal()), None,
                             server=True, verify_peer=False, tickets=tickets)  # fmt: skip
        listener = socket.create_server(("127.0.0.1", 0))
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        port = listener.getsockname()[1]
        connecting = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port, ssl=client))
        listener.setblocking(False)
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        session = scene.engine.handshake(conn, ctx, server_side=True)
        await session.handshake(5)
        app, ours = socket.socketpair()
        session.relay(app)
        ours.sendall(b"x")  # tickets travel before the first application data
        reader, writer = await connecting
        assert await reader.readexactly(1) == b"x"
        assert writer.get_extra_info("ssl_object").session.has_ticket is tickets
        writer.close()
        ours.close()
        listener.close()

    run(scenario)


# -- engine listeners: accept, identity and app connect in C ------------------------------
async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[Any]:
    return [r for r in caplog.records if getattr(r, "event", "") == event]


def peer_uuid(identity: TLSIdentity) -> str:
    cert = pki.cert_from_pem(identity.chain_pem)
    uuid_uri = next(
        u for u in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("urn:uuid:")
    )  # fmt: skip
    return uuid_uri.removeprefix("urn:uuid:")


def test_the_engine_accepts_checks_and_relays_an_allowed_marble_itself(
    ids: dict[str, TLSIdentity], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        _, port = await scene.inbound(workdir, ids["backend"])
        reader, writer = await tls_client(port, ids["frontend"])
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        stats = scene.engine.stats()
        assert (stats["accepted"], stats["fast_path"]) == (1, 1)  # decided in C
        writer.close()
        await eventually(lambda: bool(logged(caplog, "inbound.close")), "the close line")

    caplog.set_level("INFO", "meshproxy")
    run(scenario)
    (accepted,) = logged(caplog, "inbound.accept")
    assert accepted.peer == f"spiffe://{DOMAIN}/marble/frontend"
    assert accepted.peer_uuid == peer_uuid(ids["frontend"])
    assert accepted.remote.startswith("127.0.0.1:")
    (closed,) = logged(caplog, "inbound.close")
    assert (closed.peer, closed.bytes_in, closed.bytes_out) == (accepted.peer, 4, 4)


def test_a_marble_type_c_does_not_allow_is_refused_by_pki_check_peer(
    ids: dict[str, TLSIdentity], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """C takes only the positive shortcut: the rest goes to Python, which refuses it."""

    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        _, port = await scene.inbound(workdir, ids["backend"])  # allows frontend only
        reader, writer = await tls_client(port, ids["backend-2"])
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert await reader.read() == b""
        writer.close()
        assert scene.engine.stats()["fast_path"] == 0

    caplog.set_level("INFO", "meshproxy")
    run(scenario)
    (refused,) = logged(caplog, "inbound.refused")
    assert "(marble type 'backend') is not allowed here (allowed: frontend)" in refused.reason
    assert not logged(caplog, "inbound.accept")


def test_a_public_listener_relays_anonymous_clients_in_c(
    ids: dict[str, TLSIdentity], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        _, port = await scene.inbound(workdir, ids["backend"], clients="public")
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert scene.engine.stats()["fast_path"] == 1
        writer.close()

    caplog.set_level("INFO", "meshproxy")
    run(scenario)
    assert logged(caplog, "inbound.accept")[0].peer == "anonymous"


def test_an_engine_listener_drops_a_silent_client_at_its_handshake_timeout(
    ids: dict[str, TLSIdentity], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(scene: Scene) -> None:
        spec = InboundSpec("api", "127.0.0.1", 0, "marbles", ("frontend",), DOMAIN,
                           workdir / "app.sock", handshake_timeout=0.3)  # fmt: skip
        ctx = native_server_context(ids["backend"], client_auth=True)
        listener = NativeInboundListener(spec, ctx, scene.engine, scene.connections)
        _, port = await listener.start()
        scene.closers.append(listener)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        assert 0.25 < loop.time() - started < 3
        writer.close()
        await eventually(lambda: bool(logged(caplog, "inbound.refused")), "the refusal")

    caplog.set_level("INFO", "meshproxy")
    run(scenario)
    (refused,) = logged(caplog, "inbound.refused")
    assert refused.reason == "TLS handshake failed: TLS handshake timed out"


def test_stop_accepting_closes_the_port_and_open_connections_go_on(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        listener, port = await scene.inbound(workdir, ids["backend"])
        reader, writer = await tls_client(port, ids["frontend"])
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        listener.stop_accepting()

        async def refused() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                return True
            w.close()
            return False

        deadline = asyncio.get_running_loop().time() + 5
        while not await refused():
            assert asyncio.get_running_loop().time() < deadline, "the port stays open"
            await asyncio.sleep(0.02)
        writer.write(b"two")
        assert await reader.readexactly(3) == b"two"  # the open connection goes on
        assert len(scene.connections) == 1  # and counts for the drain
        writer.close()

    run(scenario)


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One byte through an echo app and back: False when the server refused the client
    (TLS 1.3 reports a refused client certificate at the first read)."""
    writer.write(b"?")
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b"?"
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        writer.close()


def test_ec_keys_on_the_built_in_method_still_verify_every_signature_and_do_p256_ecdh(
    ca: Pki, ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    """The engine runs EC keys on OpenSSL's built-in EC method (context.c, legacy_ec):
    a leaf whose signature was tampered with is refused, the genuine one is accepted,
    and a client that offers only a P-256 key share (ECDH on that method) completes."""
    genuine = ids["frontend"]
    der = leaf_der(genuine)
    tampered_der = der[:-1] + bytes([der[-1] ^ 0x01])  # the last byte of the ECDSA s value
    tampered = TLSIdentity(
        ssl.DER_cert_to_PEM_cert(tampered_der).encode() + pki.cert_to_pem(ca.intermediate.cert),
        genuine.key_pem,
        genuine.trust_pem,
    )

    async def connects(port: int, ctx: ssl.SSLContext) -> bool:
        return await _echoes(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx))

    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        _, port = await scene.inbound(workdir, ids["backend"])
        assert await connects(port, client_context(tampered)) is False
        assert await connects(port, client_context(genuine)) is True
        p256_only = client_context(genuine)
        p256_only.set_ecdh_curve("prime256v1")
        assert await connects(port, p256_only) is True
        assert await connects(port, client_context(tampered)) is False  # not cached either
        stats = scene.engine.stats()
        assert stats["handshake_failures"] == 2

    run(scenario)


def test_a_verified_chain_is_remembered_per_trust_store_and_failures_never(
    ca: Pki, ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    """The verified-chain cache: a chain that failed fails again; one that verified is
    refused once the listener trusts another intermediate (a new context, a new cache)."""

    async def connects(port: int, who: TLSIdentity) -> bool:
        return await _echoes(*await tls_client(port, who))

    async def scenario(scene: Scene) -> None:
        await scene.app(workdir / "app.sock", echo)
        listener, port = await scene.inbound(workdir, ids["backend"])
        assert [await connects(port, ids["foreign"]) for _ in range(2)] == [False, False]
        assert [await connects(port, ids["frontend"]) for _ in range(2)] == [True, True]
        backend = ids["backend"]
        other = TLSIdentity(backend.chain_pem, backend.key_pem, pki.cert_to_pem(ca.foreign.cert))
        listener.set_context(native_server_context(other, client_auth=True))
        assert await connects(port, ids["frontend"]) is False

    run(scenario)


def test_a_marbles_listener_never_runs_with_a_context_that_skips_client_certificates(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    async def scenario(scene: Scene) -> None:
        spec = InboundSpec(
            "api", "127.0.0.1", 0, "marbles", ("frontend",), DOMAIN, workdir / "app.sock"
        )
        lax = native_server_context(ids["backend"], client_auth=False)
        listener = NativeInboundListener(spec, lax, scene.engine, scene.connections)
        with pytest.raises(MeshError, match="needs a context that verifies client certificates"):
            await listener.start()
        listener, _ = await scene.inbound(workdir, ids["backend"])
        with pytest.raises(MeshError, match="needs a context that verifies client certificates"):
            listener.set_context(lax)

    run(scenario)


def test_the_engine_counters_are_on_the_metrics_endpoint_after_traffic(
    ids: dict[str, TLSIdentity], workdir: Path
) -> None:
    scraped: dict[str, float] = {}

    async def scenario(scene: Scene) -> None:
        metrics = ProxyMetrics(tls_backend="native", process=False)
        admin = AdminServer(workdir / "admin.sock", ready=lambda: True, metrics=metrics)
        await admin.start()
        try:
            await traffic_then_scrape(scene, metrics, workdir / "admin.sock")
        finally:
            await admin.close()

    async def traffic_then_scrape(scene: Scene, metrics: ProxyMetrics, admin: Path) -> None:
        await scene.app(workdir / "app.sock", echo)
        spec = InboundSpec(
            "api", "127.0.0.1", 0, "marbles", ("frontend",), DOMAIN, workdir / "app.sock"
        )
        ctx = native_server_context(ids["backend"], client_auth=True)
        listener = NativeInboundListener(spec, ctx, scene.engine, scene.connections, metrics)
        _, port = await listener.start()
        scene.closers.append(listener)
        reader, writer = await tls_client(port, ids["frontend"])
        writer.write(b"x" * 1000)
        assert await reader.readexactly(1000) == b"x" * 1000
        writer.close()
        await eventually(lambda: scene.engine.stats()["closed"] == 1, "the close")
        r, w = await asyncio.open_unix_connection(str(admin))
        w.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
        head, _, body = (await r.read()).partition(b"\r\n\r\n")
        w.close()
        assert head.startswith(b"HTTP/1.1 200")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                scraped[sample.name] = sample.value

    run(scenario)
    engine = {k.removeprefix("meshproxy_tls_engine_"): v for k, v in scraped.items()
              if k.startswith("meshproxy_tls_engine_")}  # fmt: skip
    assert engine == {
        "threads": 2.0,
        "open_connections": 0.0,
        "accept_total": 1.0,
        "fast_path_total": 1.0,
        "handshake_total": 1.0,
        "handshake_failure_total": 0.0,
        "close_total": 1.0,
        "read_bytes_total": 1000.0,
        "write_bytes_total": 1000.0,
        "buffer_bytes": engine["buffer_bytes"],
    }
    assert engine["buffer_bytes"] > 0  # the pooled relay buffers
    assert scraped["tcp_read_bytes_total"] == 1000.0  # and the per-connection series


# -- contexts -------------------------------------------------------------------------------
def test_a_key_that_does_not_match_is_a_pki_error_that_shows_no_key(
    ids: dict[str, TLSIdentity],
) -> None:
    mismatched = TLSIdentity(
        ids["backend"].chain_pem, pki.key_to_pem(pki.generate_key()), ids["backend"].trust_pem
    )
    with pytest.raises(PKIError) as err:
        native_server_context(mismatched, client_auth=True)
    assert "PRIVATE KEY" not in str(err.value)
    assert "mismatch" in str(err.value) or "do not match" in str(err.value)


def test_the_key_buffer_handed_to_c_is_wiped(ids: dict[str, TLSIdentity]) -> None:
    native = native_module()
    assert native is not None
    key = bytearray(ids["backend"].key_pem.reveal())
    native.Context(
        ids["backend"].chain_pem, key, ids["backend"].trust_pem, server=True, verify_peer=True
    )
    assert key == bytearray(len(key))
    with pytest.raises(TypeError):  # immutable bytes could not be wiped: refused
        native.Context(ids["backend"].chain_pem, ids["backend"].key_pem.reveal(), None,
                       server=True, verify_peer=False)  # type: ignore[arg-type]  # fmt: skip


def test_istio_alpn_can_never_be_offered(ids: dict[str, TLSIdentity]) -> None:
    with pytest.raises(ValueError, match="istio"):
        native_client_context(ids["frontend"], alpn=["h2", "istio-peer-exchange"])


# -- backend selection ----------------------------------------------------------------------
def test_auto_selects_the_engine_and_says_so() -> None:
    assert select_backend("auto") == "native"
    assert active_backend() == "native"
    assert describe_backend().startswith("native (C engine on OpenSSL 3.")


def test_off_forces_python(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("off") == "python"
    assert active_backend() == "python"
    assert "MESHPROXY_NATIVE=off" in describe_backend()
    select_backend("auto")


def test_auto_falls_back_to_python_when_the_module_is_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "meshproxy._native_tls", None)  # the import fails
    assert select_backend("auto") == "python"
    assert "native engine unavailable" in describe_backend()
    with pytest.raises(NativeUnavailable, match="MESHPROXY_NATIVE=require but"):
        select_backend("require")
    monkeypatch.undo()
    select_backend("auto")


def test_require_with_the_module_hidden_fails_loudly_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "marble.yaml"
    config.write_text(yaml.safe_dump({
        "coordinator": {"address": "127.0.0.1:1"},
        "marble": {"type": "backend"},
        "attestation": {"provider": "simulation", "enclave": "e.json"},
        "workdir": str(tmp_path / "run"),
    }))  # fmt: skip
    env = {**os.environ, "MESHPROXY_NATIVE": "require", "MESHPROXY_NATIVE_MODULE_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--", "true"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "meshproxy: error: MESHPROXY_NATIVE=require but meshproxy._native_tls is disabled "
        "by MESHPROXY_NATIVE_MODULE_DISABLE=1"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
