"""HBONE on loopback: HTTP/2 CONNECT over mTLS, inbound and outbound (Istio ambient A2, A3).

The inbound is driven by an h2 client written with the h2 library (no SNI, ALPN h2, as
ztunnel dials); the outbound is our own, in front of our inbound.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h2.events
import h2.settings
import pytest
import test_http_proxy as base

from meshproxy import pki
from meshproxy.proxy import (
    ConnectionSet,
    InboundListener,
    InboundSpec,
    OutboundListener,
    OutboundSpec,
    ProxyMetrics,
)
from meshproxy.proxy import _proxyproto as pp
from meshproxy.proxy.http import InboundHttp, OutboundHttp, with_alpn
from meshproxy.proxy.http._hbone import parse_authority
from meshproxy.tls import client_context, server_context

H2, DOMAIN, Pki, Mesh, run = base.H2, base.DOMAIN, base.Pki, base.Mesh, base.run
ca, workdir = base.ca, base.workdir  # the same module-scoped PKI fixture and temp dirs


async def echo_app(path: Path, seen: list[bytes] | None = None) -> asyncio.AbstractServer:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = True
        while data := await r.read(65536):
            if first and seen is not None:
                seen.append(data)
            first = False
            w.write(data)
            await w.drain()
        w.write_eof()
        w.close()

    return await asyncio.start_unix_server(handle, path=str(path))


async def start_hbone(ca: Pki, workdir: Path, *, proxy_protocol: bool = False) -> Mesh:
    metrics = ProxyMetrics(process=False)
    conns = ConnectionSet()
    http = InboundHttp(
        "http1", f"spiffe://{DOMAIN}/marble/backend", mode="hbone", proxy_protocol=proxy_protocol
    )
    spec = InboundSpec(
        "tunnel",
        "127.0.0.1",
        0,
        "marbles",
        ("frontend",),
        DOMAIN,
        workdir / "inbound-tunnel.sock",
        http=http,
    )
    ctx = with_alpn(server_context(ca.ids["backend"], client_auth=True), ("h2",))
    inbound = InboundListener(spec, ctx, conns, metrics)
    _, port = await inbound.start()
    contexts = {p: client_context(ca.ids["frontend"], alpn=(p,)) for p in ("h2", "http/1.1")}
    out_spec = OutboundSpec(
        "up",
        workdir / "outbound-up.sock",
        "127.0.0.1",
        port,
        None,
        "backend",
        DOMAIN,
        http=OutboundHttp(contexts, mode="hbone"),
    )
    outbound = OutboundListener(out_spec, client_context(ca.ids["frontend"]), conns, metrics)
    await outbound.start()
    mesh = Mesh(port, out_spec.socket_path, metrics, conns, [inbound, outbound])
    base._OPEN.append(mesh)
    return mesh


async def connect(c: H2, authority: str = "10.0.0.7:8080") -> int:
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(
        sid,
        [
            (":method", "CONNECT"),
            (":authority", authority),
            ("forwarded", 'for="10.0.0.9:1234";host=backend.default.svc.cluster.local'),
            ("baggage", "k=v"),
            ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
        ],
    )
    await c.flush()
    return sid


def _status(c: H2, sid: int) -> int | None:
    for e in c.events:
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
            return int(dict(e.headers)[":status"])
    return None


def _data(c: H2, sid: int) -> bytes:
    return b"".join(
        e.data for e in c.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
    )


def test_connect_streams_become_byte_streams_to_the_app(ca: Pki, workdir: Path) -> None:
    async def scenario() -> None:
        app = await echo_app(workdir / "inbound-tunnel.sock")
        mesh = await start_hbone(ca, workdir)
        c = await H2.tls(mesh.port, ca)  # no SNI: the server name is not set
        sids = [await connect(c) for _ in range(100)]  # >= 100 streams per connection (A2)
        await c.until(lambda: all(_status(c, s) == 200 for s in sids))
        for i, sid in enumerate(sids):
            c.conn.send_data(sid, f"payload-{i}".encode(), end_stream=True)
        await c.flush()
        ended = lambda: {e.stream_id for e in c.events if isinstance(e, h2.events.StreamEnded)}  # noqa: E731
        await c.until(lambda: set(sids) <= ended())
        assert [_data(c, s) for s in sids] == [f"payload-{i}".encode() for i in range(100)]
        await c.close()
        app.close()

    run(scenario())


def test_a_client_with_ztunnels_http2_settings_moves_megabytes_both_ways(
    ca: Pki, workdir: Path
) -> None:
    """ztunnel's HBONE client: 4 MiB stream and 16 MiB connection windows, 1 MiB frames,
    no push, and its CONNECT headers (meshpeers.md 2c)."""
    payload = bytes(range(256)) * 8192  # 2 MiB

    async def scenario() -> None:
        app = await echo_app(workdir / "inbound-tunnel.sock")
        try:
            mesh = await start_hbone(ca, workdir)
            c = await H2.tls(mesh.port, ca)
            codes = h2.settings.SettingCodes
            c.conn.update_settings(
                {codes.INITIAL_WINDOW_SIZE: 4 << 20, codes.MAX_FRAME_SIZE: 1 << 20,
                 codes.ENABLE_PUSH: 0, codes.MAX_HEADER_LIST_SIZE: 16 << 10}
            )  # fmt: skip
            c.conn.increment_flow_control_window((16 << 20) - 65535)
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(
                sid,
                [(":method", "CONNECT"), (":authority", "10.244.0.12:8080"),
                 ("baggage", "k8s.namespace.name=default,k8s.workload.name=client"),
                 ("forwarded", 'for="10.244.0.9:39012";host=backend.default.svc.cluster.local'),
                 ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
                 ("x-forwarded-network", "net1")],
            )  # fmt: skip
            await c.flush()
            await c.until(lambda: _status(c, sid) is not None)
            assert _status(c, sid) == 200
            view = memoryview(payload)
            while view:  # within the server's windows, as a client must
                await c.until(lambda: c.conn.local_flow_control_window(sid) > 0)
                n = min(len(view), c.conn.local_flow_control_window(sid),
                        c.conn.max_outbound_frame_size)  # fmt: skip
                c.conn.send_data(sid, view[:n].tobytes(), end_stream=n == len(view))
                view = view[n:]
                await c.flush()
            ended = lambda: any(  # noqa: E731
                isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in c.events
            )
            await c.until(ended, timeout=30)
            assert _data(c, sid) == payload
            await c.close()
        finally:
            app.close()

    run(scenario())


def test_non_connect_and_bad_authorities_get_400_and_a_dead_app_503(ca: Pki, workdir: Path) -> None:
    async def scenario() -> None:
        mesh = await start_hbone(ca, workdir)
        c = await H2.tls(mesh.port, ca)
        status, _, _, _ = await c.request("/")
        assert status == 400
        bad = await connect(c, authority="no-port")
        await c.until(lambda: _status(c, bad) is not None)
        assert _status(c, bad) == 400
        dead = await connect(c)  # nobody listens on the app socket
        await c.until(lambda: _status(c, dead) is not None)
        assert _status(c, dead) == 503
        await c.close()

    run(scenario())


def test_outbound_hbone_tunnels_app_connections_over_one_h2_connection(
    ca: Pki, workdir: Path
) -> None:
    async def scenario() -> None:
        app = await echo_app(workdir / "inbound-tunnel.sock")
        mesh = await start_hbone(ca, workdir)

        async def one(i: int) -> bytes:
            r, w = await asyncio.open_unix_connection(str(mesh.outbound))
            w.write(f"hello {i} ".encode() * 1000)
            w.write_eof()
            data = await r.read()
            w.close()
            return data

        got = await asyncio.gather(*(one(i) for i in range(20)))
        assert got == [f"hello {i} ".encode() * 1000 for i in range(20)]
        app.close()
        text = mesh.metrics.render().decode()
        # 20 tunnels, one mesh connection: the outbound reused it for every stream
        assert (
            'tcp_open_total{client_id="spiffe://http.test/marble/frontend",direction="inbound"'
            in text
        )
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("tcp_open_total{") and 'direction="inbound"' in ln
        )
        assert line.endswith(" 1.0"), line

    run(scenario())


def test_hbone_streams_can_carry_the_proxy_v2_identity_header(ca: Pki, workdir: Path) -> None:
    seen: list[bytes] = []

    async def scenario() -> None:
        app = await echo_app(workdir / "inbound-tunnel.sock", seen)
        mesh = await start_hbone(ca, workdir, proxy_protocol=True)
        c = await H2.tls(mesh.port, ca)
        sid = await connect(c, "10.1.2.3:443")
        c.conn.send_data(sid, b"x", end_stream=True)
        await c.flush()
        await c.until(lambda: any(isinstance(e, h2.events.StreamEnded) for e in c.events))
        await c.close()
        app.close()

    run(scenario())
    parsed = pp.parse(seen[0])
    assert parsed is not None
    assert parsed[0].spiffe_id == f"spiffe://{DOMAIN}/marble/frontend"
    assert parsed[0].destination == ("10.1.2.3", 443)  # the CONNECT authority


def test_a_caller_of_our_domain_that_may_not_call_gets_401_on_each_connect(
    ca: Pki, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ztunnel's semantics: the handshake takes the chain-verified peer, CONNECT says 401."""
    seen: list[bytes] = []

    async def scenario() -> None:
        app = await echo_app(workdir / "inbound-tunnel.sock", seen)
        try:
            mesh = await start_hbone(ca, workdir)  # allows frontend only
            c = await H2.tls(mesh.port, ca, who="intruder")
            sids = [await connect(c, "10.0.0.7:8080"), await connect(c, "[fd00::7]:8080")]
            ended = lambda: {e.stream_id for e in c.events if isinstance(e, h2.events.StreamEnded)}  # noqa: E731
            await c.until(lambda: set(sids) <= ended())
            assert [_status(c, s) for s in sids] == [401, 401]
            assert b"intruder" in _data(c, sids[0])  # the reason names the refused identity
            ok = await H2.tls(mesh.port, ca)  # an allowed caller on the same listener: 200
            sid = await connect(ok)
            await ok.until(lambda: _status(ok, sid) is not None)
            assert _status(ok, sid) == 200
            await c.close()
            await ok.close()
        finally:
            app.close()
        text = mesh.metrics.render().decode()
        assert "inbound_http_authz_deny_total{" in text
        assert 'route="hbone"' in text

    with caplog.at_level(logging.INFO, logger="meshproxy.proxy.http"):
        run(scenario())
    assert seen == []  # the refused caller's streams never reached the app
    denied = [r for r in caplog.records if getattr(r, "event", "") == "hbone.denied"]
    assert len(denied) == 2
    assert denied[0].peer == f"spiffe://{DOMAIN}/marble/intruder"  # type: ignore[attr-defined]


def test_a_certificate_not_under_our_ca_still_fails_the_handshake(
    ca: Pki, workdir: Path, tmp_path: Path
) -> None:
    """Fail closed: 401 is for peers of our CA; a foreign chain never gets to HTTP/2."""
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    inter = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())
    key = pki.generate_key()
    leaf = pki.issue_leaf(
        inter, pki.make_csr(key, "frontend", ["localhost"]), trust_domain=DOMAIN,
        marble_type="frontend", instance=uuid.uuid4(), dns_names=["localhost"],
        lifetime=timedelta(hours=1), now=now, simulated=True,
    )  # fmt: skip
    (tmp_path / "c.pem").write_bytes(pki.certs_to_pem([leaf, inter.cert]))
    (tmp_path / "k.pem").write_bytes(pki.key_to_pem(key).reveal())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca.trust))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    ctx.set_alpn_protocols(["h2"])

    async def scenario() -> None:
        mesh = await start_hbone(ca, workdir)
        r, w = await asyncio.open_connection("127.0.0.1", mesh.port, ssl=ctx)
        # TLS 1.3: the server's refusal of our certificate arrives as an alert on read
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.wait_for(r.read(), 5)  # the alert: no HTTP/2 ever answers
        w.close()
        text = mesh.metrics.render().decode()
        assert 'inbound_tcp_authz_deny_total{listener="tunnel"} 1.0' in text

    run(scenario())


def test_authorities_parse() -> None:
    assert parse_authority(b"10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_authority(b"[fd00::1]:15008") == ("fd00::1", 15008)
    assert parse_authority(b"svc.ns.svc.cluster.local:8080") == ("svc.ns.svc.cluster.local", 8080)
    for bad in (b"x", b"host:0", b"host:70000", b"[zz]:1", b"a b:1", b":80"):
        assert parse_authority(bad) is None, bad
