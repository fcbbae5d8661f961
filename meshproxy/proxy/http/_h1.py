"""HTTP/1.1 over a byte stream with h11 (sans-IO): a server, a client, a client pool.

Theory of operation. h11 owns the framing (Content-Length, chunked, keep-alive,
pipelining) and refuses what is ambiguous (both Content-Length and Transfer-Encoding,
bad chunk sizes, oversized heads), so request smuggling between the client and the app
cannot pass through a misreading of ours. The server handles one exchange at a time:
while the handler forwards the request and answers it, a reader task feeds the request
body into a ``Body`` and stops reading once ``h1_body_buffer`` bytes wait to be written
on. A connection is reused only when both sides finished the exchange cleanly;
anything else (a reset, a body not read to its end) closes it. HTTP/1.1 cannot reset one
exchange, so a reset closes the connection.

Between requests the server waits ``idle_timeout`` for the next one; once its first bytes
arrive, the whole head must follow within ``header_timeout`` (else 408 and close: a
slowloris holds nothing for long). ``drain()`` (shutdown) closes an idle connection at
once and answers the request in progress with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import h11

from meshproxy.proxy._relay import ByteStream
from meshproxy.proxy.http._headers import (
    request_from_h1,
    request_to_h1,
    response_to_h1,
    strip_hop_by_hop,
)
from meshproxy.proxy.http._model import (
    CANCEL,
    INTERNAL_ERROR,
    PROTOCOL_ERROR,
    Body,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    StreamReset,
    UpstreamUnavailable,
)

_NO_BODY_STATUS = (204, 304)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Wire:
    """An h11 connection on a byte stream: read events, send events."""

    def __init__(self, stream: ByteStream, role: Any, limits: HttpLimits) -> None:
        self.stream = stream
        self.h11 = h11.Connection(role, max_incomplete_event_size=limits.max_header_bytes)
        self.limits = limits
        self.broken = False
        self.closing = False  # the next response says Connection: close (drain)
        self._outstanding = 0  # body bytes handed on and not yet written by the other side
        self._credit: asyncio.Future[None] | None = None

    async def next_event(self, on_data: Callable[[], None] | None = None) -> Any:
        """The next h11 event; reads as needed (``on_data`` is told of each read that
        brought bytes). Raises h11.RemoteProtocolError, OSError."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.read()
                if data and on_data is not None:
                    on_data()
                self.h11.receive_data(data)  # b"": the peer closed
                continue
            return event

    async def send(self, event: Any) -> None:
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError as exc:
            self.broken = True
            raise StreamReset(PROTOCOL_ERROR, f"cannot send on HTTP/1.1: {exc}") from None
        if data:
            try:
                await self.stream.write(data)
            except OSError as exc:
                self.broken = True
                raise StreamReset(CANCEL, f"connection lost: {exc}") from None

    def abort(self) -> None:
        self.broken = True
        self.stream.abort()

    @property
    def reusable(self) -> bool:
        return (
            not self.broken and self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
        )

    # -- body credit (the reader stops while the other side lags) ----------------------
    def release(self, size: int) -> None:
        self._outstanding -= size
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)

    async def read_body(self, body: Body, who: str) -> None:
        """Feed a message body from the wire into ``body`` until its end."""
        try:
            while True:
                while self._outstanding >= self.limits.h1_body_buffer:
                    self._credit = asyncio.get_running_loop().create_future()
                    await self._credit
                event = await self.next_event()
                if isinstance(event, h11.Data):
                    self._outstanding += len(event.data)
                    body.feed(bytes(event.data), self.release)
                elif isinstance(event, h11.EndOfMessage):
                    if event.headers:
                        body.feed_trailers(list(event.headers))
                    else:
                        body.end()
                    return
                else:
                    self.broken = True
                    body.abort(StreamReset(CANCEL, f"{who} closed the connection mid-message"))
                    return
        except h11.RemoteProtocolError as exc:
            self.broken = True
            body.abort(StreamReset(PROTOCOL_ERROR, f"{who} sent a malformed body: {exc}"))
        except OSError as exc:
            self.broken = True
            body.abort(StreamReset(CANCEL, f"connection to {who} lost: {exc}"))

    async def start_body(self, who: str) -> tuple[Body, asyncio.Task[None] | None]:
        """After a head: a Body that is already complete, or one a reader task fills."""
        body = Body()
        event = self.h11.next_event()  # no read: only what is already buffered
        if isinstance(event, h11.EndOfMessage):
            if event.headers:
                body.feed_trailers(list(event.headers))
            body.end()
            return body, None
        if isinstance(event, h11.Data):
            self._outstanding += len(event.data)
            body.feed(bytes(event.data), self.release)
        task = asyncio.get_running_loop().create_task(self.read_body(body, who))
        return body, task


# -- the server ----------------------------------------------------------------------------
class H1ServerExchange:
    """One HTTP/1.1 request and the way to answer it."""

    protocol = "http/1.1"

    def __init__(self, wire: _Wire, request: RequestHead, body: Body, version: bytes) -> None:
        self._wire = wire
        self.request = request
        self.body = body
        self._version = version
        self._chunked = False
        self.reset_code: int | None = None

    @property
    def gone(self) -> bool:
        return self._wire.broken

    async def interim(self, status: int) -> None:
        if self._wire.h11.they_are_waiting_for_100_continue:
            await self._wire.send(h11.InformationalResponse(status_code=status, headers=[]))

    async def send_head(self, head: ResponseHead, *, end_stream: bool) -> None:
        headers = response_to_h1(head)
        has_length = any(k == b"content-length" for k, _ in headers)
        head_request = self.request.method == b"HEAD"
        bodiless = head.status in _NO_BODY_STATUS or head_request
        if end_stream and not has_length and not bodiless:
            headers.append((b"content-length", b"0"))
            has_length = True
        if self._wire.closing:
            headers.append((b"connection", b"close"))
        self._chunked = not has_length and not bodiless and self._version == b"1.1"
        await self._wire.send(
            h11.Response(status_code=head.status, headers=headers, reason=_reason(head.status))
        )
        if end_stream:
            await self.end()

    async def send_data(self, data: bytes) -> None:
        if data:
            await self._wire.send(h11.Data(data=data))

    async def send_trailers(self, headers: Headers) -> None:
        # trailers exist only in chunked framing; otherwise they are dropped
        trailers = strip_hop_by_hop(headers) if self._chunked else []
        await self._wire.send(h11.EndOfMessage(headers=trailers))

    async def end(self) -> None:
        await self._wire.send(h11.EndOfMessage())

    def reset(self, code: int) -> None:
        self.reset_code = code
        self._wire.abort()

    def finish(self) -> None:
        """A request body still unread closes the connection (it is not reusable)."""


Handler = Callable[[H1ServerExchange], Coroutine[Any, Any, None]]


class H1Server:
    def __init__(
        self, stream: ByteStream, limits: HttpLimits, handler: Handler, *, scheme: bytes
    ) -> None:
        self._wire = _Wire(stream, h11.SERVER, limits)
        self._handler = handler
        self._scheme = scheme
        self.requests = 0
        self.error: str | None = None
        self.ended: str | None = None  # why the proxy ended it cleanly (idle, drained)
        self._waiting: asyncio.Timeout | None = None  # set while waiting idle for a request

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the current response (Connection: close)."""
        self._wire.closing = True
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())

    async def serve(self) -> None:
        wire = self._wire
        try:
            while not wire.broken:
                try:
                    event = await self._next_request()
                except h11.RemoteProtocolError as exc:
                    self.error = f"malformed HTTP/1.1 request: {exc}"
                    await self._refuse(exc)
                    return
                except OSError as exc:
                    self.error = f"connection lost: {exc}"
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (the client is done) or a timeout
                if not await self._exchange(event) or not wire.reusable:
                    if wire.closing and not self.error:
                        self.ended = "drained"
                    return
                wire.h11.start_next_cycle()
        finally:
            with contextlib.suppress(OSError):
                await wire.stream.aclose()

    async def _next_request(self) -> Any:
        """The next request head within the idle and header timeouts; None if they passed."""
        wire, limits = self._wire, self._wire.limits
        loop = asyncio.get_running_loop()
        started = bool(wire.h11.trailing_data[0])  # a pipelined request is already here
        if wire.closing and not started:
            self.ended = "drained"
            return None
        timeout = limits.header_timeout if started else limits.idle_timeout
        try:
            async with asyncio.timeout(timeout) as deadline:

                def first_bytes() -> None:
                    nonlocal started
                    if not started:
                        started = True
                        self._waiting = None
                        deadline.reschedule(loop.time() + limits.header_timeout)

                self._waiting = None if started else deadline
                return await wire.next_event(on_data=first_bytes)
        except TimeoutError:
            if not started:
                self.ended = "drained" if wire.closing else f"idle for {limits.idle_timeout:g} s"
                return None
            self.error = f"request head incomplete after {limits.header_timeout:g} s"
            await self._refuse(h11.RemoteProtocolError(self.error, 408))
            return None
        finally:
            self._waiting = None

    async def _exchange(self, event: h11.Request) -> bool:
        self.requests += 1
        wire = self._wire
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > wire.limits.max_header_bytes:
            # h11 bounds only heads still incomplete; one that arrived whole is checked here
            limit = wire.limits.max_header_bytes
            await self._refuse(
                h11.RemoteProtocolError(f"request head of {size} bytes exceeds {limit}", 431)
            )
            return False
        try:
            body, reader = await wire.start_body("client")
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc)
            return False
        head = request_from_h1(
            bytes(event.method), bytes(event.target), list(event.headers),
            scheme=self._scheme, ended=body.ended and reader is None,
        )  # fmt: skip
        exchange = H1ServerExchange(wire, head, body, bytes(event.http_version))
        try:
            await self._handler(exchange)
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
                wire.broken = True  # the body was not read to its end
            if reader is not None:
                await asyncio.gather(reader, return_exceptions=True)
            body.discard()
        return not wire.broken

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        if self._wire.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        text = f"bad request: {exc}\n".encode()
        with contextlib.suppress(StreamReset, h11.LocalProtocolError):
            await self._wire.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(text)).encode()),
                        (b"connection", b"close"),
                    ],
                    reason=_reason(status),
                )
            )
            await self._wire.send(h11.Data(data=text))
            await self._wire.send(h11.EndOfMessage())


# -- the client ----------------------------------------------------------------------------
class H1ClientStream:
    """One request on an HTTP/1.1 client connection (the connection is ours until close)."""

    def __init__(self, pool: H1Pool, wire: _Wire, chunked: bool) -> None:
        self._pool = pool
        self._wire = wire
        self._chunked = chunked
        self._reader: asyncio.Task[None] | None = None
        self._body: Body | None = None
        self._closed = False

    async def send_data(self, data: bytes) -> None:
        if data:
            await self._wire.send(h11.Data(data=data))

    async def send_trailers(self, headers: Headers) -> None:
        trailers = strip_hop_by_hop(headers) if self._chunked else []
        await self._wire.send(h11.EndOfMessage(headers=trailers))

    async def end(self) -> None:
        await self._wire.send(h11.EndOfMessage())

    def reset(self, code: int) -> None:
        self._wire.abort()
        if self._body is not None:
            self._body.abort(StreamReset(code, "request reset"))

    async def response(self) -> tuple[ResponseHead, Body]:
        wire = self._wire
        try:
            while True:
                event = await wire.next_event()
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    break
                wire.broken = True
                raise StreamReset(
                    INTERNAL_ERROR, "upstream closed the connection before responding"
                )
            body, self._reader = await wire.start_body("upstream")
        except h11.RemoteProtocolError as exc:
            wire.broken = True
            raise StreamReset(
                INTERNAL_ERROR, f"upstream sent a malformed response: {exc}"
            ) from None
        except OSError as exc:
            wire.broken = True
            raise StreamReset(INTERNAL_ERROR, f"connection to upstream lost: {exc}") from None
        self._body = body
        head = ResponseHead(event.status_code, list(event.headers), body.ended and not self._reader)
        return head, body

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            self._wire.broken = True
        if self._body is not None:
            self._body.discard()
        self._pool.give_back(self._wire)


class H1Pool:
    """HTTP/1.1 connections to one upstream, opened on demand, reused when clean.

    An idle connection is watched by a pending read: if the upstream closes it (or sends
    anything) while idle, it is dropped instead of being handed out; after
    ``idle_timeout`` unused, it is closed.
    """

    def __init__(self, dial: Callable[[], Awaitable[ByteStream]], limits: HttpLimits) -> None:
        self._dial = dial
        self._limits = limits
        self._idle: list[tuple[_Wire, asyncio.Task[bytes], asyncio.TimerHandle]] = []
        self._busy: set[_Wire] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(limits.h1_connections)  # requests beyond it queue
        self._closed = False

    async def open(self, head: RequestHead) -> H1ClientStream:
        await self._slots.acquire()
        try:
            wire = await self._take_idle()
            if wire is None:
                wire = _Wire(await self._dial(), h11.CLIENT, self._limits)
        except BaseException:
            self._slots.release()
            raise
        self._busy.add(wire)
        target, headers = request_to_h1(head)
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        try:
            await wire.send(h11.Request(method=head.method, target=target, headers=headers))
            if head.ended:
                await wire.send(h11.EndOfMessage())
        except StreamReset:
            self.give_back(wire)
            raise UpstreamUnavailable("upstream closed the connection") from None
        return H1ClientStream(self, wire, chunked)

    async def _take_idle(self) -> _Wire | None:
        while self._idle:
            wire, watcher, timer = self._idle.pop()
            timer.cancel()
            if not watcher.done():
                watcher.cancel()
                await asyncio.wait([watcher])
            if watcher.cancelled():
                return wire
            with contextlib.suppress(asyncio.CancelledError):
                watcher.exception()
            wire.abort()  # the upstream spoke or closed while idle
        return None

    def give_back(self, wire: _Wire) -> None:
        if wire in self._busy:
            self._busy.discard(wire)
            self._slots.release()
        if self._closed or not wire.reusable:
            wire.abort()
            return
        wire.h11.start_next_cycle()
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(wire.stream.read())
        timer = loop.call_later(self._limits.idle_timeout, self._expire, wire)
        self._idle.append((wire, watcher, timer))

    def _expire(self, wire: _Wire) -> None:
        for i, (idle, watcher, _) in enumerate(self._idle):
            if idle is wire:
                del self._idle[i]
                task = asyncio.get_running_loop().create_task(self._close_idle(wire, watcher))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                return

    @staticmethod
    async def _close_idle(wire: _Wire, watcher: asyncio.Task[bytes]) -> None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        wire.broken = True
        with contextlib.suppress(OSError):
            await wire.stream.aclose()  # TLS close_notify: the upstream sees a clean close

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for wire, watcher, timer in idle:
            timer.cancel()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            with contextlib.suppress(OSError):
                await wire.stream.aclose()
        for wire in list(self._busy):
            wire.abort()
        await asyncio.gather(*self._closing, return_exceptions=True)
