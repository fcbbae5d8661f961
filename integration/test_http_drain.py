"""SIGTERM to a real ``meshproxy run``: its HTTP/2 connections drain with GOAWAY.

The app (written here, on the standard library only) answers ``/slow`` after a second and
keeps serving for a few seconds after its own SIGTERM, as a well-behaved server does. A
client on raw h2 has ``/slow`` in flight when the marble gets SIGTERM: it sees GOAWAY, its
request still completes, a stream it opens after the final GOAWAY is refused and never
reaches the app, and the proxy exits with the app's status.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from integration.conftest import Mesh, Signer, package, port, root_certificate
from integration.harness import wait_for
from meshproxy.proxy.http._h2 import _GracefulGoaway

APP = r"""
import http.server, os, signal, socketserver, sys, threading, time

hits = open(sys.argv[2], "a", buffering=1)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        hits.write(self.path + "\n")
        if self.path == "/slow":
            time.sleep(1.0)
        body = ("done " + self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

def later(*_):  # finish what is in flight, then go
    threading.Timer(2.5, os._exit, (0,)).start()

signal.signal(signal.SIGTERM, later)
Server(os.environ[sys.argv[1]], Handler).serve_forever()
"""


def test_sigterm_drains_http2_with_goaway_and_the_request_in_flight_completes(
    mesh: Mesh, signer: Signer, tmp_path: Path
) -> None:
    app_file, hits = tmp_path / "slow_app.py", tmp_path / "hits.txt"
    app_file.write_text(APP)
    hits.touch()
    mesh.set_manifest({"Packages": {"p": package(signer, 1)}, "Marbles": {"web": {"Package": "p"}}})
    web = port()
    app = [sys.executable, str(app_file), "MESHPROXY_INBOUND_PUB", str(hits)]
    cfg = mesh.marble_config(
        "web", "web", app=app,
        inbound=[{"name": "pub", "listen": f"127.0.0.1:{web}", "protocol": "http",
                  "clients": "public"}],
    )  # fmt: skip
    proc = mesh.start("web", cfg, app)
    root = root_certificate(mesh, tmp_path / "root.pem")

    ctx = ssl.create_default_context(cafile=str(root))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", web), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="web.test.local")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.state_machine = _GracefulGoaway()  # a client that reads on after GOAWAY
    conn.initiate_connection()
    events: list[h2.events.Event] = []

    def send(path: str) -> int:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "https"), (":authority", "web.test.local"),
             (":path", path)],
            end_stream=True,
        )  # fmt: skip
        tls.sendall(conn.data_to_send())
        return sid

    def pump() -> bool:
        data = tls.recv(65536)
        if not data:
            return False
        for ev in conn.receive_data(data):
            events.append(ev)
            if isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        tls.sendall(conn.data_to_send())  # the ACK of the drain PING, among others
        return True

    slow = send("/slow")
    wait_for(lambda: "/slow" in hits.read_text(), 10, "the app to get /slow")
    proc.popen.send_signal(15)  # SIGTERM, as the kubelet sends it
    started = time.monotonic()
    goaways: list[int] = []
    while len(goaways) < 2:  # the notice (2^31-1), then the last stream it took
        assert pump(), "closed before the final GOAWAY"
        goaways = [int(e.last_stream_id) for e in events
                   if isinstance(e, h2.events.ConnectionTerminated)]  # fmt: skip
    assert goaways == [2**31 - 1, slow]
    late = send("/late")
    while pump():  # until the proxy closes the connection
        pass
    elapsed = time.monotonic() - started
    tls.close()

    status = {
        e.stream_id: dict(e.headers)[b":status"]
        for e in events
        if isinstance(e, h2.events.ResponseReceived)
    }
    body = b"".join(
        e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == slow
    )
    resets = {e.stream_id: e.error_code for e in events if isinstance(e, h2.events.StreamReset)}
    assert status == {slow: b"200"}
    assert body == b"done /slow"
    assert resets == {late: 7}  # REFUSED_STREAM: safe to retry elsewhere
    assert elapsed < 5.0
    assert "/late" not in hits.read_text()
    assert proc.stop() == 0  # the app's status
    closes = [e for e in proc.log_events() if e.get("event") == "inbound.close"]
    assert any(e.get("reason") == "drained" for e in closes), closes
