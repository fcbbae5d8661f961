"""Demo backend: a plain HTTP service that listens only on the Unix socket its proxy gives it.

It knows nothing about TLS or attestation: the proxy in front of it terminated mTLS and
checked that the caller is a frontend marble before a single byte arrived here.
"""

import hashlib
import http.server
import json
import os
import socketserver

SOCKET = os.environ["MESHPROXY_INBOUND_API"]
DB_KEY_FILE = os.path.join(os.environ["MESHPROXY_FILES_ROOT"], "config/db-key.hex")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        with open(DB_KEY_FILE) as f:
            db_key = f.read().strip()
        body = json.dumps(
            {
                "service": "backend",
                "message": "hello from the attested backend",
                "path": self.path,
                # A fingerprint, never the key: shows the manifest's secret arrived.
                "db_key_sha256": hashlib.sha256(bytes.fromhex(db_key)).hexdigest()[:16],
                "marker": self.headers.get("X-Demo-Marker", ""),
            }
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
