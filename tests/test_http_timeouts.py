"""Idle and header timeouts of HTTP connections, inbound (TLS port) and outbound (app socket).

Short configured values (``HttpLimits``) stand for the defaults (1 h idle, 10 s header):
a client that sends half a request head is answered 408 and closed after the header
timeout; a keep-alive connection with no request is closed after the idle timeout; an
HTTP/2 frame (or header block) left incomplete ends the connection with GOAWAY.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import h2.events
import hyperframe.frame
import pytest
import test_http_proxy as base
import yaml

from meshproxy.config import load_marble_config
from meshproxy.errors import ConfigError
from meshproxy.proxy.http import HttpLimits
from meshproxy.proxy.http._model import ENHANCE_YOUR_CALM, NO_ERROR

H2, Pki, Apps, run = base.H2, base.Pki, base.Apps, base.run
ca, workdir, apps = base.ca, base.workdir, base.apps  # the shared fixtures

SHORT = HttpLimits(idle_timeout=0.6, header_timeout=0.4)


async def _open(
    side: str, mesh: base.Mesh, ca: Pki
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if side == "inbound":  # a caller's TLS straight to the inbound port
        return await asyncio.open_connection("127.0.0.1", mesh.port, ssl=_tls(ca))
    return await asyncio.open_unix_connection(str(mesh.outbound))  # the app's side


def _tls(ca: Pki) -> object:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca.trust))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_cert_chain(*ca.files["frontend"])
    return ctx


def _close_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "reason", ""))
        for r in caplog.records
        if getattr(r, "event", "") in ("inbound.close", "outbound.close")
    ]


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_half_a_request_head_gets_408_and_a_close_after_the_header_timeout(
    ca: Pki, workdir: Path, apps: Apps, side: str, caplog: pytest.LogCaptureFixture
) -> None:
    apps.start("http1")
    elapsed: list[float] = []

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir, limits=SHORT)
        r, w = await _open(side, mesh, ca)
        w.write(b"GET /slow HTTP/1.1\r\nhost: backend\r\nx-a: 1\r\n")  # and nothing more
        await w.drain()
        t0 = time.monotonic()
        answer = await asyncio.wait_for(r.read(), 5)  # read() returns at EOF
        elapsed.append(time.monotonic() - t0)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in answer.lower()
        w.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert 0.3 < elapsed[0] < 4.0
    assert any("request head incomplete after 0.4 s" in r for r in _close_reasons(caplog))


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    ca: Pki, workdir: Path, apps: Apps, side: str, caplog: pytest.LogCaptureFixture
) -> None:
    apps.start("http1")
    elapsed: list[float] = []

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir, limits=SHORT)
        r, w = await _open(side, mesh, ca)
        w.write(b"GET /one HTTP/1.1\r\nhost: backend\r\n\r\n")
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length")))  # fmt: skip
        await r.readexactly(length)
        t0 = time.monotonic()  # now idle, kept alive
        assert await asyncio.wait_for(r.read(), 5) == b""
        elapsed.append(time.monotonic() - t0)
        w.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert 0.4 < elapsed[0] < 4.0
    assert any(r == "idle for 0.6 s" for r in _close_reasons(caplog))


def test_a_silent_client_is_closed_after_the_idle_timeout(
    ca: Pki, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir, limits=SHORT)
        r, w = await _open("inbound", mesh, ca)  # TLS done, then not a byte
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert "idle for 0.6 s" in _close_reasons(caplog)


def test_an_idle_http2_connection_gets_goaway_no_error_and_is_closed(
    ca: Pki, workdir: Path, apps: Apps
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir, limits=SHORT)
        c = await H2.tls(mesh.port, ca)
        status, _, _, _ = await c.request("/one")
        assert status == 200
        t0 = time.monotonic()
        while not c.closed:
            await asyncio.wait_for(c.pump(), 5)
        assert 0.4 < time.monotonic() - t0 < 4.0
        goaway = [e for e in c.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [(g.error_code, g.last_stream_id) for g in goaway] == [(NO_ERROR, 1)]
        await c.close()

    run(scenario())


@pytest.mark.parametrize("how", ["half a frame", "headers without their continuation"])
def test_an_http2_frame_left_incomplete_ends_the_connection(
    ca: Pki, workdir: Path, apps: Apps, how: str
) -> None:
    apps.start("http1")

    async def scenario() -> None:
        mesh = await base.start_mesh(ca, workdir, limits=HttpLimits(header_timeout=0.4))
        c = await H2.tls(mesh.port, ca)
        await c.until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged)
                                  for e in c.events))  # fmt: skip
        block = c.conn.encoder.encode(
            [(":method", "GET"), (":scheme", "https"), (":authority", "b"), (":path", "/")]
        )
        frame = hyperframe.frame.HeadersFrame(1, block)
        if how == "half a frame":
            frame.flags.add("END_HEADERS")
            raw = frame.serialize()[:12]
        else:  # a header block that waits for a CONTINUATION frame forever
            raw = frame.serialize()
        c.writer.write(raw)
        await c.writer.drain()
        t0 = time.monotonic()
        data = await asyncio.wait_for(c.reader.read(), 5)  # everything until EOF
        assert 0.3 < time.monotonic() - t0 < 4.0
        frames = []
        while len(data) >= 9:
            f, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
            f.parse_body(memoryview(data[9 : 9 + length]))
            frames.append(f)
            data = data[9 + length :]
        goaways = [f for f in frames if isinstance(f, hyperframe.frame.GoAwayFrame)]
        assert [g.error_code for g in goaways] == [ENHANCE_YOUR_CALM]
        await c.close()

    run(scenario())


# -- the listener config ---------------------------------------------------------------------
def _config(tmp_path: Path, inbound: dict[str, object], outbound: dict[str, object]) -> Path:
    doc = {
        "coordinator": {"address": "127.0.0.1:2001"},
        "marble": {"type": "backend"},
        "attestation": {"provider": "simulation", "enclave": "backend.signed.json"},
        "workdir": "run",
        "inbound": [{"name": "api", "listen": "127.0.0.1:8443", **inbound}],
        "outbound": [{"name": "store", "upstream": "store.mesh:6443", "peer": "store", **outbound}],
    }
    path = tmp_path / "marble.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_timeouts_are_read_from_http_listeners_and_default_to_1h_and_10s(tmp_path: Path) -> None:
    cfg = load_marble_config(
        _config(
            tmp_path,
            {"protocol": "http", "timeouts": {"idle": "90s", "header": "2.5s"}},
            {"protocol": "hbone", "timeouts": {"idle": "5m"}},
        )
    )
    assert (cfg.inbound[0].timeouts.idle, cfg.inbound[0].timeouts.header) == (90.0, 2.5)
    assert (cfg.outbound[0].timeouts.idle, cfg.outbound[0].timeouts.header) == (300.0, 10.0)
    cfg = load_marble_config(_config(tmp_path, {"protocol": "http"}, {}))
    assert (cfg.inbound[0].timeouts.idle, cfg.inbound[0].timeouts.header) == (3600.0, 10.0)
    assert HttpLimits().idle_timeout == 3600.0  # the proxy's defaults are the same
    assert HttpLimits().header_timeout == 10.0


@pytest.mark.parametrize(
    ("inbound", "outbound", "message"),
    [
        ({"timeouts": {"idle": "1h"}}, {},
         r"inbound\[0\]\.timeouts: timeouts are for protocol: http and hbone"),
        ({}, {"timeouts": {"idle": "1h"}},
         r"outbound\[0\]\.timeouts: timeouts are for protocol: http and hbone"),
        ({"protocol": "http", "timeouts": {"idel": "1h"}}, {},
         r"inbound\[0\]\.timeouts: unknown key 'idel' \(did you mean 'idle'\?\)"),
        ({"protocol": "http", "timeouts": {"header": "soon"}}, {},
         r"inbound\[0\]\.timeouts\.header: invalid duration 'soon'"),
        ({"protocol": "http", "timeouts": {"header": 0}}, {},
         r"inbound\[0\]\.timeouts\.header: must be a positive duration"),
    ],
)  # fmt: skip
def test_bad_timeouts_are_refused_naming_the_key(
    tmp_path: Path, inbound: dict[str, object], outbound: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match="^marble.yaml: " + message):
        load_marble_config(_config(tmp_path, inbound, outbound))
