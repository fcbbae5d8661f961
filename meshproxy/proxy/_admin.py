"""The admin endpoint: ``/live``, ``/ready`` and ``/metrics``, HTTP/1.1 on a Unix socket.

Deliberately tiny: one request per connection, a bounded request head, a short timeout.
``/live`` is 200 while the process serves; ``/ready`` is 200 only once the app is running
behind started listeners, and 503 again while shutting down; ``/metrics`` is the
Prometheus text exposition of the proxy's own registry (``_metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from meshproxy.proxy._metrics import CONTENT_TYPE, ProxyMetrics
from meshproxy.proxy._relay import bind_unix_socket

log = logging.getLogger("meshproxy.proxy.admin")
_MAX_HEAD = 8192
_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


_TEXT = "text/plain"


class AdminServer:
    def __init__(
        self, path: Path, ready: Callable[[], bool], metrics: ProxyMetrics | None = None
    ) -> None:
        self.path = path
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> Path:
        sock = bind_unix_socket(self.path)
        self._server = await asyncio.start_unix_server(self._handle, sock=sock)
        return self.path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = b""
        ctype = _TEXT
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            method = head.split(b" ", 1)[0]
            status, body = self._answer(head)
            if status == 200 and self._metrics is not None and _target(head) == b"/metrics":
                data, ctype = self._metrics.render(), CONTENT_TYPE
            else:
                data = body.encode()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, data = 400, b"bad request\n"
        except OSError:
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + (b"" if method == b"HEAD" else data)
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, str]:
        if len(head) > _MAX_HEAD:
            return 400, "request head too large\n"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        targets = (b"/live", b"/ready") + ((b"/metrics",) if self._metrics else ())
        if target not in targets:
            return 404, f"not found (try {', '.join(t.decode() for t in targets)})\n"
        if method not in (b"GET", b"HEAD"):
            return 405, "method not allowed\n"
        if target == b"/live":
            return 200, "live\n"
        if target == b"/metrics":
            return 200, ""
        return (200, "ready\n") if self._ready() else (503, "not ready\n")


def _target(head: bytes) -> bytes:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
