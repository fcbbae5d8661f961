"""One exchange through the proxy: a request from a server side to an upstream and back.

Theory of operation. The request head goes upstream first; then two things run at
once, because gRPC streams both ways: a pump copies the request body (and trailers)
upstream, and this task copies the response head, body and trailers back. Body chunks
go through unchanged. How it can end besides success:

* the upstream cannot be reached: a local 503 (gRPC: UNAVAILABLE, trailers-only);
* the upstream refuses the stream unprocessed (RST_STREAM REFUSED_STREAM, or a GOAWAY
  below its id: a draining or full upstream): a request without a body is sent once
  more, on a new connection if the old one is going away (what Envoy's default
  ``refused-stream`` retry does); otherwise the refusal goes to the client;
* the upstream resets the stream: the same RST_STREAM code goes to the client (HTTP/2),
  so gRPC clients see what the server meant; on HTTP/1.1 a 502, or a closed connection
  once the response has started;
* the upstream connection breaks mid-response: a gRPC response ends with trailers
  ``grpc-status: 14`` (what a direct client would see), anything else is reset;
* the client resets the stream (a gRPC deadline or cancel): its handler is cancelled and
  the upstream stream is reset with the client's code.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol
from urllib.parse import quote

from meshproxy.proxy.http._model import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    Body,
    Chunk,
    Headers,
    RequestHead,
    ResponseHead,
    StreamReset,
    UpstreamUnavailable,
)

GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14
GRPC_INTERNAL = 13
GRPC_INVALID_ARGUMENT = 3
GRPC_UNAUTHENTICATED = 16


class ServerExchange(Protocol):
    protocol: str
    request: RequestHead
    body: Body

    @property
    def gone(self) -> bool: ...
    @property
    def reset_code(self) -> int | None: ...
    async def interim(self, status: int) -> None: ...
    async def send_head(self, head: ResponseHead, *, end_stream: bool) -> None: ...
    async def send_data(self, data: bytes) -> None: ...
    async def send_trailers(self, headers: Headers) -> None: ...
    async def end(self) -> None: ...
    def reset(self, code: int) -> None: ...
    def finish(self) -> None: ...


class ClientStream(Protocol):
    async def send_data(self, data: bytes) -> None: ...
    async def send_trailers(self, headers: Headers) -> None: ...
    async def end(self) -> None: ...
    def reset(self, code: int) -> None: ...
    async def response(self) -> tuple[ResponseHead, Body]: ...
    def close(self) -> None: ...


class Upstream(Protocol):
    async def open(self, head: RequestHead) -> ClientStream: ...
    async def close(self) -> None: ...


class Observer(Protocol):
    """What the metrics see of one exchange."""

    def responded(self, status: int) -> None: ...
    def finished(self, status: int, grpc_status: str | None, *, ok: bool) -> None: ...


class _Quiet:
    def responded(self, status: int) -> None:
        pass

    def finished(self, status: int, grpc_status: str | None, *, ok: bool) -> None:
        pass


QUIET: Observer = _Quiet()


def grpc_status_of(headers: Headers) -> str | None:
    for k, v in headers:
        if k == b"grpc-status":
            return v.decode("ascii", "replace")
    return None


def _header_value(text: str) -> bytes:
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).encode("ascii")


async def local_reply(
    ex: ServerExchange, status: int, grpc_code: int, reason: str, observer: Observer = QUIET
) -> None:
    """A response made by the proxy: plain text, or for gRPC a trailers-only response."""
    with contextlib.suppress(StreamReset):
        if ex.request.is_grpc and ex.protocol == "h2":
            headers: Headers = [
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(grpc_code).encode()),
                # the gRPC spec's percent-encoding: everything outside 0x20-0x7E and '%'
                (b"grpc-message", quote(reason, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
                 .encode()),
                (b"meshproxy-error", _header_value(reason)),
            ]  # fmt: skip
            await ex.send_head(ResponseHead(200, headers), end_stream=True)
            observer.finished(200, str(grpc_code), ok=False)
        else:
            text = (reason + "\n").encode()
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(text)).encode()),
                (b"meshproxy-error", _header_value(reason)),
            ]
            await ex.send_head(ResponseHead(status, headers), end_stream=False)
            await ex.send_data(text)
            await ex.end()
            observer.finished(status, None, ok=False)
        ex.finish()


_RETRY = "retry"


async def forward(
    ex: ServerExchange, upstream: Upstream, head: RequestHead, observer: Observer = QUIET
) -> str | None:
    """Forward one exchange; returns why it failed, or None when it completed."""
    await ex.interim(100)  # an HTTP/1.1 client waiting on Expect: 100-continue may send now
    retries = 1 if head.ended else 0  # only a request without a body can be sent again
    while True:
        try:
            stream = await upstream.open(head)
        except (UpstreamUnavailable, StreamReset) as exc:
            await local_reply(ex, 503, GRPC_UNAVAILABLE, f"upstream unavailable: {exc}", observer)
            return f"upstream unavailable: {exc}"
        why = await _exchange(ex, stream, head, observer, may_retry=retries > 0)
        if why != _RETRY:
            return why
        retries -= 1


async def _exchange(
    ex: ServerExchange, stream: ClientStream, head: RequestHead, observer: Observer,
    *, may_retry: bool,
) -> str | None:  # fmt: skip
    pump = asyncio.ensure_future(_pump(ex.body, stream)) if not head.ended else None
    started = False
    status = 0
    body: Body | None = None
    try:
        response, body = await stream.response()
        status = response.status
        observer.responded(status)
        await ex.send_head(response, end_stream=response.ended)
        started = True
        grpc = grpc_status_of(response.headers)
        if not response.ended:
            trailers = None
            while (item := await body.next()) is not None:
                if isinstance(item, Chunk):
                    await ex.send_data(item.data)
                    item.release()
                else:
                    trailers = item.headers
                    await ex.send_trailers(trailers)
            if trailers is None:
                await ex.end()
            else:
                grpc = grpc_status_of(trailers)
        observer.finished(status, grpc, ok=status < 500 and grpc in (None, "0"))
        ex.finish()
        return None
    except StreamReset as exc:
        if may_retry and not started and exc.code == REFUSED_STREAM and not ex.gone:
            return _RETRY  # the upstream did not process it: safe to send again
        if ex.gone:
            stream.reset(ex.reset_code if ex.reset_code is not None else CANCEL)
            observer.finished(status, None, ok=False)
            return f"client went away: {exc.reason}"
        await _fail(ex, exc, started, observer, status)
        return exc.reason
    except asyncio.CancelledError:  # the client reset the stream, or shutdown
        stream.reset(ex.reset_code if ex.reset_code is not None else CANCEL)
        observer.finished(status, None, ok=False)
        raise
    finally:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        ex.body.discard()
        if body is not None:
            body.discard()
        stream.close()


async def _pump(body: Body, stream: ClientStream) -> None:
    """Copy the request body upstream; a broken side resets the upstream stream."""
    try:
        while (item := await body.next()) is not None:
            if isinstance(item, Chunk):
                await stream.send_data(item.data)
                item.release()
            else:
                await stream.send_trailers(item.headers)
                return
        await stream.end()
    except StreamReset as exc:
        stream.reset(exc.code if exc.remote else CANCEL)


async def _fail(
    ex: ServerExchange, exc: StreamReset, started: bool, observer: Observer, status: int
) -> None:
    if not started:
        if exc.remote and ex.protocol == "h2" and exc.code != NO_ERROR:
            ex.reset(exc.code)  # the app's own reset code, e.g. REFUSED_STREAM
            observer.finished(status, None, ok=False)
            return
        await local_reply(ex, 502, GRPC_UNAVAILABLE, f"upstream failed: {exc.reason}", observer)
        return
    observer.finished(status, None, ok=False)
    if exc.remote:
        ex.reset(exc.code)
    elif ex.request.is_grpc and ex.protocol == "h2":
        with contextlib.suppress(StreamReset):
            await ex.send_trailers(
                [(b"grpc-status", str(GRPC_UNAVAILABLE).encode()),
                 (b"grpc-message", b"upstream connection lost")]
            )  # fmt: skip
            ex.finish()
    else:
        ex.reset(INTERNAL_ERROR)
