"""Test app: reads the PROXY v2 header on the Unix socket named by the env var argv[1].

Per connection it parses the header with ``meshproxy.proxy._proxyproto`` (what a Python
app would do), answers one JSON line ``{"spiffe_id", "uuid", "family", "source",
"ssl_version", "verify"}`` and then echoes everything else it receives.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

from meshproxy.proxy import _proxyproto as pp


def serve(conn: socket.socket) -> None:
    with conn:
        data = b""
        while (parsed := pp.parse(data)) is None:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        header, used = parsed
        ssl = header.ssl
        uuid = header.tlv(pp.TLV_INSTANCE_UUID)
        doc = {
            "spiffe_id": header.spiffe_id,
            "uuid": uuid.decode() if uuid else None,
            "family": header.family,
            "source": header.source,
            "ssl_version": ssl.version if ssl else None,
            "verify": ssl.verify if ssl else None,
        }
        conn.sendall(json.dumps(doc).encode() + b"\n" + data[used:])
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


def main() -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.environ[sys.argv[1]])
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
