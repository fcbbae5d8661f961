"""The values every part of the HTTP layer shares: heads, limits, errors, body channels.

A message body crosses the proxy as a ``Body``: the side that receives it from the wire
feeds chunks in, the side that sends it on takes them out. Each chunk carries a
``release`` callback that the consumer calls once the bytes are written on the other
side; only then does the producer grant the sender more credit (an HTTP/2
WINDOW_UPDATE, or reading the next bytes of an HTTP/1.1 body). So flow control is end to
end and at most a window of body bytes per connection sits in the proxy. Body bytes are
never parsed or re-encoded: a chunk is the payload of one DATA frame (or one read of an
HTTP/1.1 body) and is written on unchanged.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from meshproxy.errors import ConnectError, MeshError

Headers = list[tuple[bytes, bytes]]

# HTTP/2 error codes (RFC 9113 section 7) that the proxy itself uses.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of an HTTP listener.

    The defaults follow the peers in ``meshpeers.md``: 100 concurrent streams (Linkerd's
    and ztunnel's pools), a 64 KiB header list (ztunnel; Envoy uses 60 KiB), and the
    rapid-reset budget of nghttp2 1.57 (a burst of 1000 reset streams, refilled at 33 per
    second) after which the connection gets GOAWAY ENHANCE_YOUR_CALM (CVE-2023-44487).

    Timeouts: a connection with no request in progress is closed after ``idle_timeout``
    (Envoy's default for HTTP connections, one hour); a request head (and an HTTP/2
    frame) that started arriving must be complete within ``header_timeout`` (10 s, the
    time Linkerd gives a client to show its protocol), which ends slowloris clients.
    """

    max_concurrent_streams: int = 100
    max_header_bytes: int = 64 * 1024
    stream_window: int = 1024 * 1024
    connection_window: int = 4 * 1024 * 1024
    reset_burst: int = 1000
    reset_rate: float = 33.0
    h1_body_buffer: int = 256 * 1024  # HTTP/1.1 body bytes read ahead of the other side
    h1_connections: int = 32  # HTTP/1.1 upstream connections per downstream connection
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    header_timeout: float = 10.0


@dataclass
class RequestHead:
    """A request's head in HTTP/2 terms; ``headers`` holds no pseudo-headers."""

    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes  # b"" for CONNECT
    headers: Headers
    ended: bool = False  # the head ended the request (no body follows)
    protocol: bytes = b""  # the extended-CONNECT :protocol, if any

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def is_grpc(self) -> bool:
        ctype = self.header(b"content-type") or b""
        return ctype.startswith(b"application/grpc")


@dataclass
class ResponseHead:
    status: int
    headers: Headers
    ended: bool = False  # the head ended the response (trailers-only, 204, HEAD, ...)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class StreamReset(MeshError):
    """A stream ended abnormally; ``code`` is the HTTP/2 error code it implies.

    ``remote`` is set when the peer itself reset the stream with ``code`` (a code worth
    passing on); otherwise the stream broke with its connection or in the proxy.
    """

    def __init__(self, code: int, reason: str, *, remote: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.remote = remote


class UpstreamUnavailable(ConnectError):
    """The app or the upstream marble could not be reached (-> 503 / UNAVAILABLE)."""


# -- body channels -------------------------------------------------------------------------
@dataclass
class Chunk:
    data: bytes
    _release: Callable[[int], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """The bytes were written on: give the sender its credit back (once)."""
        if self._release is not None:
            release, self._release = self._release, None
            release(len(self.data))


@dataclass
class Trailers:
    headers: Headers


class Body:
    """One direction of one message's body, from the wire side to the forwarding side."""

    def __init__(self) -> None:
        self._items: collections.deque[Chunk | Trailers] = collections.deque()
        self._ended = False
        self._error: StreamReset | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._discarded = False

    # -- the producer ------------------------------------------------------------------
    def feed(self, data: bytes, release: Callable[[int], None] | None = None) -> None:
        chunk = Chunk(data, release)
        if self._discarded or self._ended or self._error is not None:
            chunk.release()  # nobody will forward it: keep the sender's window open
            return
        self._items.append(chunk)
        self._wake()

    def feed_trailers(self, headers: Headers) -> None:
        if not self._discarded and not self._ended and self._error is None:
            self._items.append(Trailers(headers))
        self.end()

    def end(self) -> None:
        self._ended = True
        self._wake()

    def abort(self, error: StreamReset) -> None:
        if not self._ended and self._error is None:
            self._error = error
        self._wake()

    @property
    def ended(self) -> bool:
        return self._ended

    # -- the consumer ------------------------------------------------------------------
    async def next(self) -> Chunk | Trailers | None:
        """The next item; None at the end; raises ``StreamReset`` if the stream broke."""
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def discard(self) -> None:
        """The consumer is gone: release what is queued and whatever still arrives."""
        self._discarded = True
        while self._items:
            item = self._items.popleft()
            if isinstance(item, Chunk):
                item.release()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def empty_body() -> Body:
    body = Body()
    body.end()
    return body
