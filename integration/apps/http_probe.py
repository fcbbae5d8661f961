"""Test app: HTTP on the Unix socket named by the env var argv[1], as argv[2] (http1 | h2c).

* ``GET /headers`` (and any other path): JSON ``{"method", "path", "protocol",
  "headers": [[name, value], ...]}`` of the request as the app received it;
* ``POST /sha256``: JSON ``{"length", "sha256"}`` of the request body;
* ``GET /bytes/N``: N bytes of the pattern ``i % 251`` (large responses, flow control).

Written directly on h2 and http.server so it shares no code with the proxy under test.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import socketserver
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.settings

_BLOCK = bytes(i % 251 for i in range(251 * 1024))


def pattern(n: int) -> bytes:
    reps = n // len(_BLOCK) + 1
    return (_BLOCK * reps)[:n]


def answer(method: str, path: str, headers: list[tuple[str, str]], body: bytes, proto: str):
    if path.startswith("/bytes/"):
        return 200, "application/octet-stream", pattern(int(path.rsplit("/", 1)[1]))
    if path.startswith("/sha256"):
        doc = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    else:
        doc = {"method": method, "path": path, "protocol": proto, "headers": headers}
    return 200, "application/json", json.dumps(doc).encode()


# -- HTTP/1.1 ------------------------------------------------------------------------------
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._body()
        headers = [(k.lower(), v) for k, v in self.headers.items()]
        status, ctype, data = answer(self.command, self.path, headers, body, "http/1.1")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"


class H1Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


# -- h2c -----------------------------------------------------------------------------------
def serve_h2(sock: socket.socket) -> None:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 24)
    sock.sendall(conn.data_to_send())
    requests: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
    sending: dict[int, memoryview] = {}
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    requests[ev.stream_id] = (list(ev.headers), bytearray())
                elif isinstance(ev, h2.events.DataReceived):
                    requests[ev.stream_id][1].extend(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    headers, body = requests.pop(ev.stream_id)
                    pseudo = dict(h for h in headers if h[0].startswith(":"))
                    regular = [h for h in headers if not h[0].startswith(":")]
                    regular.insert(0, ("host", pseudo.get(":authority", "")))
                    status, ctype, out = answer(
                        pseudo[":method"], pseudo[":path"], regular, bytes(body), "h2c"
                    )
                    conn.send_headers(
                        ev.stream_id,
                        [(":status", str(status)), ("content-type", ctype),
                         ("content-length", str(len(out)))],
                    )  # fmt: skip
                    sending[ev.stream_id] = memoryview(out)
                elif isinstance(ev, h2.events.StreamReset):
                    requests.pop(ev.stream_id, None)
                    sending.pop(ev.stream_id, None)
            for sid in list(sending):
                view = sending[sid]
                while True:
                    n = min(len(view), conn.local_flow_control_window(sid),
                            conn.max_outbound_frame_size)  # fmt: skip
                    if n <= 0 and view:
                        break
                    conn.send_data(sid, view[:n].tobytes(), end_stream=n == len(view))
                    view = view[n:]
                    if not view:
                        break
                if view:
                    sending[sid] = view
                else:
                    del sending[sid]
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        return
    finally:
        sock.close()


def main() -> None:
    path = os.environ[sys.argv[1]]
    if sys.argv[2] == "http1":
        with H1Server(path, Handler) as server:
            server.serve_forever()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_h2, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
