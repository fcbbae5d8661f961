"""HTTP/2 stream limits and GOAWAY semantics, and Linkerd's transport header, on loopback.

* A stream over MAX_CONCURRENT_STREAMS is refused with RST_STREAM REFUSED_STREAM (RFC 9113
  5.1.2), a stream error: the connection keeps serving the others.
* After GOAWAY the streams up to its last stream id still finish (RFC 9113 6.8), on both
  sides of our h2 connections (h2 alone closes the connection at the first GOAWAY).
* A Linkerd proxy that takes our listener for a Linkerd peer opens with its transport
  header (``transport.l5d.io/v1``); we never select that ALPN and close such a stream
  with a log line that names it; the app sees nothing (meshpeers.md L1, L6).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import test_http_proxy as base

from meshproxy.proxy.http import HttpLimits
from meshproxy.proxy.http._h2 import _Connection
from meshproxy.proxy.http._model import REFUSED_STREAM

H2, Pki, Apps, run = base.H2, base.Pki, base.Apps, base.run
ca, workdir, apps = base.ca, base.workdir, base.apps  # the shared fixtures


def _post(c: H2, path: str = "/sha256") -> int:
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(
        sid,
        [(":method", "POST"), (":scheme", "https"), (":authority", "backend"), (":path", path)],
    )
    return sid


def _ended(c: H2, sid: int) -> bool:
    return any(
        isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
        for e in c.events
    )


def _reset_code(c: H2, sid: int) -> int | None:
    for e in c.events:
        if isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
            return int(e.error_code)
    return None


def _status(c: H2, sid: int) -> int | None:
    for e in c.events:
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
            return int(dict(e.headers)[":status"])
    return None


def test_streams_over_the_limit_are_refused_and_the_connection_keeps_serving(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir, limits=HttpLimits(max_concurrent_streams=4))
        c = await H2.tls(mesh.port, ca)
        # Sent before the server's SETTINGS are read: until then a client may assume no
        # limit (RFC 9113 6.5.2), so this is legal and must not cost the connection.
        sids = [_post(c) for _ in range(6)]
        await c.flush()
        await c.until(lambda: all(_ended(c, s) for s in sids[4:]))
        assert [_reset_code(c, s) for s in sids[4:]] == [REFUSED_STREAM, REFUSED_STREAM]
        for i, sid in enumerate(sids[:4]):  # the four it took are served to the end
            c.conn.send_data(sid, b"x" * (i + 1), end_stream=True)
        await c.flush()
        await c.until(lambda: all(_ended(c, s) for s in sids[:4]))
        assert [_status(c, s) for s in sids[:4]] == [200, 200, 200, 200]
        status, _, body, _ = await c.request("/after")  # and the connection lives on
        assert status == 200
        assert b'"/after"' in body
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events)
        await c.close()

    run(scenario())


def _pair() -> tuple[_Connection, _Connection]:
    server = _Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    client = _Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    server.initiate_connection()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return server, client


def test_streams_up_to_the_goaway_last_stream_id_still_finish() -> None:
    """Sans-IO: GOAWAY(last=1) leaves stream 1 open both ways on our h2 connections."""
    server, client = _pair()
    head = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    client.send_headers(1, head, end_stream=False)
    server.receive_data(client.data_to_send())
    server.close_connection(error_code=0, last_stream_id=1)
    server.send_headers(1, [(b":status", b"200")])
    events = client.receive_data(server.data_to_send())
    assert [type(e).__name__ for e in events] == ["ConnectionTerminated", "ResponseReceived"]
    client.send_data(1, b"request body", end_stream=True)  # the client may still send
    server_events = server.receive_data(client.data_to_send())
    assert [type(e).__name__ for e in server_events] == ["DataReceived", "StreamEnded"]
    server.send_data(1, b"response", end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert [type(e).__name__ for e in events] == ["DataReceived", "StreamEnded"]
    assert events[0].data == b"response"


def test_received_goaway_keeps_frames_queued_before_it() -> None:
    """h2 would drop what a client queued when GOAWAY arrives; ours sends it."""
    server, client = _pair()
    head = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    client.send_headers(1, head, end_stream=False)
    server.receive_data(client.data_to_send())
    client.send_data(1, b"queued before GOAWAY", end_stream=True)
    server.close_connection(error_code=0, last_stream_id=1)
    client.receive_data(server.data_to_send())
    events = server.receive_data(client.data_to_send())
    assert [type(e).__name__ for e in events] == ["DataReceived", "StreamEnded"]


# -- Linkerd's transport header --------------------------------------------------------------
def _tls_client(ca: Pki, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca.trust))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_cert_chain(*ca.files["frontend"])
    ctx.set_alpn_protocols(alpn)
    return ctx


def _transport_header(port: int) -> bytes:
    """linkerd2-proxy's TransportHeader: preface, u32 length, protobuf {port = 1}."""
    body = b"\x08" + bytes([port & 0x7F | 0x80, port >> 7])  # field 1 varint
    return b"transport.l5d.io/v1\r\n\r\n" + struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("alpn", [["transport.l5d.io/v1"], ["transport.l5d.io/v1", "h2"]])
def test_linkerd_transport_header_is_refused_by_name_and_never_reaches_the_app(
    ca: Pki, workdir: Path, caplog: pytest.LogCaptureFixture, alpn: list[str]
) -> None:
    seen: list[bytes] = []

    async def scenario() -> None:
        async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen.append(await r.read(65536))
            w.close()

        server = await asyncio.start_unix_server(app, path=str(workdir / "inbound-api.sock"))
        mesh = await base.start_mesh(ca, workdir)
        r, w = await asyncio.open_connection("127.0.0.1", mesh.port, ssl=_tls_client(ca, alpn))
        selected = w.get_extra_info("ssl_object").selected_alpn_protocol()
        assert selected == ("h2" if "h2" in alpn else None)  # never transport.l5d.io/v1
        w.write(_transport_header(8443) + b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n")
        await w.drain()
        answer = await asyncio.wait_for(r.read(), 5)  # closed without an HTTP answer
        assert answer == b""
        w.close()
        await mesh.close()
        server.close()

    with caplog.at_level(logging.INFO, logger="meshproxy.proxy.inbound"):
        run(scenario())
    assert seen == []
    closes = [r for r in caplog.records if getattr(r, "event", "") == "inbound.close"]
    assert len(closes) == 1
    assert "transport.l5d.io/v1" in closes[0].reason  # type: ignore[attr-defined]
    assert "opaque" in closes[0].reason  # type: ignore[attr-defined]


# -- an upstream that refuses streams --------------------------------------------------------
async def _refusing_app(path: Path, seen: list[str]) -> asyncio.AbstractServer:
    """An h2c app that refuses ``/refuse-once`` the first time and ``/refuse-always``
    every time with RST_STREAM REFUSED_STREAM, and answers anything else 200."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        w.write(conn.data_to_send())
        while data := await r.read(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    target = dict(ev.headers)[":path"]
                    first = target not in seen
                    seen.append(target)
                    if target == "/refuse-always" or (target == "/refuse-once" and first):
                        conn.reset_stream(ev.stream_id, REFUSED_STREAM)
                    else:
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                        conn.send_data(ev.stream_id, b"ok", end_stream=True)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            w.write(conn.data_to_send())
        w.close()

    return await asyncio.start_unix_server(handle, path=str(path))


def test_a_request_without_a_body_that_the_upstream_refused_is_sent_once_more(
    ca: Pki, workdir: Path
) -> None:
    seen: list[str] = []

    async def scenario() -> None:
        app = await _refusing_app(workdir / "inbound-api.sock", seen)
        try:
            mesh = await base.start_mesh(ca, workdir, app_protocol="h2c")
            c = await H2.tls(mesh.port, ca)
            status, _, body, _ = await c.request("/refuse-once")
            assert (status, body) == (200, b"ok")  # refused unprocessed, sent again
            sid = _post(c, "/refuse-always")  # a body: it cannot be sent again
            c.conn.send_data(sid, b"payload", end_stream=True)
            await c.flush()
            await c.until(lambda: _ended(c, sid))
            assert _reset_code(c, sid) == REFUSED_STREAM  # the refusal, passed on
            with pytest.raises(AssertionError, match="reset with code 7"):
                await c.request("/refuse-always")  # retried once, then passed on
            await c.close()
        finally:
            app.close()

    run(scenario())
    assert seen == ["/refuse-once", "/refuse-once", "/refuse-always", "/refuse-always",
                    "/refuse-always"]  # fmt: skip
