"""Shutdown drain of HTTP connections (what the runtime starts on SIGTERM), on loopback.

HTTP/2: GOAWAY(2^31-1) and a PING, then GOAWAY(last stream) one round trip later; the
stream in flight finishes, a stream opened after the final GOAWAY is refused and never
reaches the app, then the connection closes. HTTP/1.1: the response in progress says
``Connection: close`` and the connection closes after it; an idle one closes at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path

import h2.events
import pytest
import test_http_proxy as base

from meshproxy.proxy.http import Drain, InboundHttp
from meshproxy.proxy.http._h2 import _GracefulGoaway
from meshproxy.proxy.http._model import NO_ERROR, REFUSED_STREAM

H2, Pki, Apps, run = base.H2, base.Pki, base.Apps, base.run
ca, workdir, apps = base.ca, base.workdir, base.apps  # the shared fixtures


def _drain_of(mesh: base.Mesh, which: int = 0) -> Drain:
    http = mesh.closers[which].spec.http
    assert http is not None
    return http.drain


def _goaways(c: H2) -> list[int]:
    return [
        int(e.last_stream_id)
        for e in c.events
        if isinstance(e, h2.events.ConnectionTerminated) and e.error_code == NO_ERROR
    ]


def _requests_seen(mesh: base.Mesh) -> float:
    text = mesh.metrics.render().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("request_total{") and 'direction="inbound"' in line
    )


def test_http2_in_flight_stream_finishes_and_a_new_one_after_goaway_is_refused(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir)
        c = await H2.tls(mesh.port, ca)
        c.conn.state_machine = _GracefulGoaway()  # a client that reads on after GOAWAY
        slow = c.conn.get_next_available_stream_id()
        c.conn.send_headers(
            slow,
            [(":method", "POST"), (":scheme", "https"), (":authority", "backend"),
             (":path", "/sha256")],
        )  # fmt: skip
        c.conn.ping(b"12345678")  # its ACK says the server took the request
        await c.flush()
        await c.until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in c.events))
        _drain_of(mesh).begin()
        await c.until(lambda: len(_goaways(c)) == 2)  # the notice, then the last stream
        assert _goaways(c) == [2**31 - 1, slow]
        late = c.conn.get_next_available_stream_id()  # the client missed the GOAWAY
        c.conn.send_headers(
            late,
            [(":method", "GET"), (":scheme", "https"), (":authority", "backend"),
             (":path", "/late")],
            end_stream=True,
        )  # fmt: skip
        await c.flush()
        await c.until(lambda: any(isinstance(e, h2.events.StreamReset) for e in c.events))
        (reset,) = [e for e in c.events if isinstance(e, h2.events.StreamReset)]
        assert (reset.stream_id, reset.error_code) == (late, REFUSED_STREAM)
        body = b"in flight " * 1000
        c.conn.send_data(slow, body, end_stream=True)  # the slow request completes
        await c.flush()
        while not c.closed:  # and then the server closes the connection
            await asyncio.wait_for(c.pump(), 5)
        head = next(e for e in c.events if isinstance(e, h2.events.ResponseReceived))
        assert dict(head.headers)[":status"] == "200"
        data = b"".join(e.data for e in c.events if isinstance(e, h2.events.DataReceived))
        assert json.loads(data)["sha256"] == hashlib.sha256(body).hexdigest()
        assert _requests_seen(mesh) == 1.0  # /late never went upstream
        await c.close()

    run(scenario())


def test_http2_connection_without_streams_closes_at_once_on_drain(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir)
        c = await H2.tls(mesh.port, ca)
        c.conn.state_machine = _GracefulGoaway()
        status, _, _, _ = await c.request("/one")
        assert status == 200
        t0 = time.monotonic()
        _drain_of(mesh).begin()
        while not c.closed:
            await asyncio.wait_for(c.pump(), 5)
        assert time.monotonic() - t0 < 2.0
        assert _goaways(c)[-1] == 1  # (the notice first if the stream was still winding up)
        await c.close()

    run(scenario())


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_http1_response_in_progress_says_connection_close_and_idle_ones_close_at_once(
    ca: Pki, workdir: Path, apps: Apps, side: str, caplog: pytest.LogCaptureFixture
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir)
        which = 0 if side == "inbound" else 1
        busy = await _open(side, mesh, ca)
        idle = await _open(side, mesh, ca)
        idle[1].write(b"GET /warm HTTP/1.1\r\nhost: backend\r\n\r\n")
        await idle[1].drain()
        first = await _response(idle[0])
        assert b"connection: close" not in first.lower()  # kept alive before the drain
        busy[1].write(b"POST /sha256 HTTP/1.1\r\nhost: backend\r\ncontent-length: 10\r\n\r\n01234")
        await busy[1].drain()
        await asyncio.sleep(0.2)  # the head is on its way to the app
        t0 = time.monotonic()
        _drain_of(mesh, which).begin()
        assert await asyncio.wait_for(idle[0].read(), 2) == b""  # idle: closed at once
        assert time.monotonic() - t0 < 2.0
        busy[1].write(b"56789")  # the request in progress completes
        await busy[1].drain()
        answer = await _response(busy[0])
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" in answer.lower()
        assert hashlib.sha256(b"0123456789").hexdigest().encode() in answer
        assert await asyncio.wait_for(busy[0].read(), 2) == b""
        for _, w in (busy, idle):
            w.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    reasons = [getattr(r, "reason", "") for r in caplog.records
               if getattr(r, "event", "").endswith(".close")]  # fmt: skip
    assert reasons.count("drained") >= 2


async def _open(
    side: str, mesh: base.Mesh, ca: Pki
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if side == "inbound":
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(ca.trust))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.load_cert_chain(*ca.files["frontend"])
        return await asyncio.open_connection("127.0.0.1", mesh.port, ssl=ctx)
    return await asyncio.open_unix_connection(str(mesh.outbound))


async def _response(r: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )  # fmt: skip
    return head + await asyncio.wait_for(r.readexactly(length), 5)


def test_drain_tells_subscribers_once_and_late_subscribers_at_once() -> None:
    drain, calls = Drain(), []
    unsubscribe = drain.subscribe(lambda: calls.append("a"))
    drain.subscribe(lambda: calls.append("b"))
    unsubscribe()
    drain.begin()
    drain.begin()
    drain.subscribe(lambda: calls.append("late"))
    assert calls == ["b", "late"]
    assert InboundHttp("http1", "x").drain is not InboundHttp("http1", "x").drain
