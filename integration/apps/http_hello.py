"""Test app: HTTP/1.1 on the Unix socket named by the env var given as argv[1].

Answers every GET with the request path and the value of the env var named by argv[2]
(if any), so tests can see that the manifest's Env reached the app.
"""

import http.server
import os
import socketserver
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        extra = os.environ.get(sys.argv[2], "") if len(sys.argv) > 2 else ""
        body = f"hello {self.path} {extra}\n".encode()
        self.send_response(200)
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
    with Server(os.environ[sys.argv[1]], Handler) as server:
        server.serve_forever()
