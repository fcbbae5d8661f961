"""The coordinator client's connections: pinned to the root, one TLS connection for the
requests inside ``kept_open`` (a marble's nonce and activation), a fresh one otherwise.

The activation's one TLS connection: the coordinator's quote is fetched unpinned, the
root it binds is pinned on that same connection (``Connection.pin``), and nonce and
activation follow on it only when the certificate that connection was handshaken with is
that root.

The server is a real TLS HTTP/1.1 server (the standard library's) that presents a root
made by ``meshproxy.pki`` and counts the connections it accepts.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshproxy.coordinator.client import Connection
from meshproxy.errors import PKIError
from meshproxy.pki import cert_to_pem, create_root, generate_key, key_to_pem


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: list[tuple[str, int]] = []

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(self.client_address)

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.dumps({"status": "success", "data": {"path": self.path}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, x509.Certificate]]:
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


def test_requests_inside_kept_open_share_one_connection(
    server: tuple[str, x509.Certificate],
) -> None:
    address, root = server
    conn = Connection(address, root)
    with conn.kept_open():
        assert conn.request("POST", "/nonce", {})["path"] == "/nonce"
        assert conn.request("POST", "/activate", {"x": 1})["path"] == "/activate"
    assert len(_Handler.connections) == 1
    conn.request("POST", "/status", {})
    conn.request("POST", "/status", {})
    assert len(_Handler.connections) == 3  # outside kept_open: one connection each


def test_a_kept_connection_still_checks_the_pinned_root(
    server: tuple[str, x509.Certificate], tmp_path: Path
) -> None:
    address, _ = server
    other = create_root(
        now=datetime.now(UTC), dns_names=["x.test"], simulated=True, key=generate_key()
    )
    conn = Connection(address, other.cert)
    with conn.kept_open(), pytest.raises(PKIError, match="pinned root"):
        conn.request("POST", "/nonce", {})


def test_pinning_the_presented_root_keeps_the_connection(
    server: tuple[str, x509.Certificate],
) -> None:
    address, root = server
    conn = Connection(address, None)
    with conn.kept_open():
        assert conn.request("GET", "/quote")["path"] == "/quote"
        conn.pin(root)
        with conn.kept_open():  # nested, as _post_attested opens it again
            conn.request("POST", "/nonce", {})
        conn.request("POST", "/activate", {})
    assert len(_Handler.connections) == 1
    assert conn.root is root


def test_pinning_another_root_refuses_the_kept_connection(
    server: tuple[str, x509.Certificate],
) -> None:
    address, _ = server
    other = create_root(
        now=datetime.now(UTC), dns_names=["x.test"], simulated=True, key=generate_key()
    ).cert
    conn = Connection(address, None)
    with conn.kept_open():
        conn.request("GET", "/quote")
        with pytest.raises(PKIError, match="does not present the pinned root"):
            conn.pin(other)
        # what follows is checked as a new pinned connection is: refused again
        with pytest.raises(PKIError, match="pinned root"):
            conn.request("POST", "/nonce", {})


def test_pinning_a_root_outside_its_validity_refuses_the_kept_connection(
    server: tuple[str, x509.Certificate],
) -> None:
    address, root = server
    conn = Connection(address, None)
    with conn.kept_open():
        conn.request("GET", "/quote")
        with pytest.raises(PKIError, match="does not present the pinned root"):
            conn.pin(root, now=root.not_valid_after_utc + timedelta(seconds=1))
