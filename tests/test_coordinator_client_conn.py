"""The coordinator client's connections: pinned to the root, one TLS connection for the
requests inside ``kept_open`` (a marble's nonce and activation), a fresh one otherwise.

The server is a real TLS HTTP/1.1 server (the standard library's) that presents a root
made by ``meshproxy.pki`` and counts the connections it accepts.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshproxy.coordinator.client import Connection
from meshproxy.errors import PKIError
from meshproxy.pki import cert_to_pem, create_root, generate_key, key_to_pem


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: list[tuple[str, int]] = []

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(self.client_address)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.dumps({"status": "success", "data": {"path": self.path}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, object]]:
    root = create_root(
        now=datetime.now(UTC), dns_names=["c.test"], simulated=True, key=generate_key()
    )
    (tmp_path / "root.pem").write_bytes(cert_to_pem(root.cert))
    (tmp_path / "root.key").write_bytes(key_to_pem(root.key).reveal())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "root.pem", tmp_path / "root.key")
    _Handler.connections = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}", root.cert
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_inside_kept_open_share_one_connection(server: tuple[str, object]) -> None:
    address, root = server
    conn = Connection(address, root)  # type: ignore[arg-type]
    with conn.kept_open():
        assert conn.request("POST", "/nonce", {})["path"] == "/nonce"
        assert conn.request("POST", "/activate", {"x": 1})["path"] == "/activate"
    assert len(_Handler.connections) == 1
    conn.request("POST", "/status", {})
    conn.request("POST", "/status", {})
    assert len(_Handler.connections) == 3  # outside kept_open: one connection each


def test_a_kept_connection_still_checks_the_pinned_root(
    server: tuple[str, object], tmp_path: Path
) -> None:
    address, _ = server
    other = create_root(
        now=datetime.now(UTC), dns_names=["x.test"], simulated=True, key=generate_key()
    )
    conn = Connection(address, other.cert)
    with conn.kept_open(), pytest.raises(PKIError, match="pinned root"):
        conn.request("POST", "/nonce", {})
