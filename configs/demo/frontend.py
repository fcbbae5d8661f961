"""Demo frontend: serves outside clients on its Unix socket and calls the backend.

It calls the backend in plaintext over $MESHPROXY_OUTBOUND_BACKEND, a Unix socket inside
the enclave; its proxy turns that into mTLS to a verified backend marble.
"""

import http.client
import http.server
import json
import os
import socket
import socketserver

SOCKET = os.environ["MESHPROXY_INBOUND_WEB"]
BACKEND = os.environ["MESHPROXY_OUTBOUND_BACKEND"]
GREETING = os.environ.get("GREETING", "")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("backend.demo.meshproxy.local", timeout=10)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        conn = UnixHTTPConnection(BACKEND)
        marker = self.headers.get("X-Demo-Marker", "")
        conn.request("GET", "/data", headers={"X-Demo-Marker": marker})
        backend = json.loads(conn.getresponse().read())
        conn.close()
        body = json.dumps(
            {"service": "frontend", "greeting": GREETING, "backend": backend}, indent=2
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass

    def address_string(self):
        return "unix"


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    with Server(SOCKET, Handler) as server:
        server.serve_forever()
