"""HTTP/2 over a byte stream with h2 (sans-IO), as a server or as a client.

Theory of operation. One reader task feeds received bytes to ``h2.H2Connection`` and
routes each event to its stream: a request starts a handler task (server), a response
resolves the stream's response future (client), DATA goes into the stream's ``Body``.
The reader never waits on writing: every frame h2 queues is written by one writer task,
in order, so two proxies that both send large bodies cannot deadlock on each other.
A sender of DATA waits for flow-control window (woken by WINDOW_UPDATE or a SETTINGS
change), then for the writer to have written its frame, which is how a slow peer slows
the other side down. Received DATA is acknowledged (WINDOW_UPDATE) only when the
consumer has written it on; padding is acknowledged at once.

A stream ends normally, by RST_STREAM (``StreamReset`` with the peer's code, ``remote``
set), or with the connection (``StreamReset`` with ``remote`` unset). The connection
ends at EOF, on a protocol error (h2 queues GOAWAY with the code), or when the peer
resets more streams than its ``ResetBudget`` allows (GOAWAY ENHANCE_YOUR_CALM).

The server also ends it on its own (GOAWAY, then close): after ``idle_timeout`` without
a stream, when a frame stays incomplete for ``header_timeout``, and on ``drain()``
(shutdown), gracefully as RFC 9113 6.8 describes: GOAWAY with the highest stream id and
a PING; one round trip later (the PING's ACK, or a second) GOAWAY with the last stream
it took; the streams up to it finish, later ones are refused, then it closes. A stream
beyond ``max_concurrent_streams`` is refused with RST_STREAM REFUSED_STREAM (RFC 9113
5.1.2: a stream error the client may retry), never a connection error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from meshproxy.proxy._relay import ByteStream
from meshproxy.proxy.http._guard import ResetBudget
from meshproxy.proxy.http._headers import (
    request_from_h2,
    request_to_h2,
    response_from_h2,
    response_to_h2,
    strip_hop_by_hop,
)
from meshproxy.proxy.http._model import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    REFUSED_STREAM,
    Body,
    Headers,
    HttpLimits,
    RequestHead,
    ResponseHead,
    StreamReset,
)

log = logging.getLogger("meshproxy.proxy.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_STREAM_ID = 2**31 - 1
_DRAIN_PING = b"meshdrn!"
_DRAIN_RTT = 1.0  # the longest wait for the drain PING's ACK

_CS = h2.connection.ConnectionState
_CI = h2.connection.ConnectionInputs


class _GracefulGoaway(h2.connection.H2ConnectionStateMachine):
    """h2 closes a connection at the first GOAWAY sent or received (python-hyper/h2#1181),
    but RFC 9113 6.8 lets the streams up to the last stream id finish. So GOAWAY leaves
    an open connection open; the endpoints refuse new streams themselves."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        **{
            (state, goaway): (None, state)
            for state in (_CS.IDLE, _CS.CLIENT_OPEN, _CS.SERVER_OPEN)
            for goaway in (_CI.SEND_GOAWAY, _CI.RECV_GOAWAY)
        },
    }


class _Connection(h2.connection.H2Connection):
    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.state_machine = _GracefulGoaway()

    def clear_outbound_data_buffer(self) -> None:
        """h2 drops the queued frames when GOAWAY arrives; those of the streams that
        still finish (WINDOW_UPDATE, DATA) must leave, so nothing is dropped."""


class _Stream:
    __slots__ = ("body", "id", "local_ended", "reset", "response", "task", "window")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.body = Body()  # what the peer sends on this stream
        self.local_ended = False  # we sent END_STREAM
        self.response: asyncio.Future[ResponseHead] | None = None  # client role
        self.window: asyncio.Future[None] | None = None
        self.reset: StreamReset | None = None
        self.task: asyncio.Task[None] | None = None  # server role: the handler


class H2Endpoint:
    """What both roles share: the connection, the reader, the writer, flow control."""

    def __init__(self, stream: ByteStream, *, client_side: bool, limits: HttpLimits) -> None:
        self._stream = stream
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        self.h2 = _Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        initial: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        }
        if client_side:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values=initial)
        self.h2.decoder.max_header_list_size = limits.max_header_bytes
        self.h2.initiate_connection()
        if not client_side:
            # h2 treats a stream over MAX_CONCURRENT_STREAMS as a connection error; the
            # server refuses it as a stream error instead (_on_request). So the limit we
            # sent stays the advertised one and h2 enforces none.
            initial[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = _MAX_STREAM_ID
            self.h2.local_settings = h2.settings.Settings(client=False, initial_values=initial)
        if limits.connection_window > 65535:
            self.h2.increment_flow_control_window(limits.connection_window - 65535)
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        self.goaway_received = False
        self.error: str | None = None  # why the connection ended, if not cleanly
        self.ended: str | None = None  # why the proxy ended it cleanly (idle, drained)
        self._closer: asyncio.Task[None] | None = None
        # the writer: generation counters tell a sender when its frames were written
        self._dirty = asyncio.Event()
        self._queued = 0
        self._written = 0
        self._write_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._capacity: asyncio.Future[None] | None = None
        self._writer = self._loop.create_task(self._write_loop())
        self._kick()  # the preface and our SETTINGS leave at once

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self) -> None:
        """Read until the connection ends; then every open stream fails."""
        ended = StreamReset(CANCEL, "connection closed")
        try:
            while not self._closed:
                try:
                    data = await self._stream.read()
                except OSError as exc:
                    ended = StreamReset(CANCEL, f"connection lost: {exc}")
                    if not self.goaway_received and self._closer is None:
                        self.error = str(ended)  # after GOAWAY a reset is just a close
                    break
                if not data:
                    ended = StreamReset(CANCEL, "connection closed by peer")
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    # h2 queued GOAWAY with the error code; say why, then close
                    self.error = f"HTTP/2 protocol error: {exc}"
                    ended = StreamReset(CANCEL, self.error)
                    self._kick()
                    break
                for event in events:
                    if self._closed:  # we sent GOAWAY: the rest of the batch is moot
                        break
                    self._dispatch(event)
                self._received()
                self._kick()
        finally:
            if self._closer is not None:  # the proxy ended it: that is the reason
                ended = StreamReset(CANCEL, self.error or self.ended or "closed")
            await self._shutdown(ended)

    async def _shutdown(self, ended: StreamReset) -> None:
        self._closed = True
        for st in list(self._streams.values()):
            self._fail(st, ended)
        self._streams.clear()
        self._wake_capacity()
        if not self._writer.done():  # what is queued (a GOAWAY) still leaves, briefly
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed(), 2.0)
            self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        self._notify_written(everything=True)
        if self._closer is not None:
            await asyncio.gather(self._closer, return_exceptions=True)
        await self._stream.aclose()

    def goaway(self, code: int, reason: str) -> None:
        """Queue GOAWAY; called by the reader, which then ends the connection."""
        if self._closed:
            return
        self.error = reason
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=code)
        self._kick()
        self._closed = True

    def stop(
        self, code: int | None, reason: str, *, clean: bool, last_stream: int | None = None
    ) -> None:
        """End the connection from outside the reader (a timer, the drain): GOAWAY with
        ``code`` (unless ``code`` is None), then close once it was written."""
        if self._closed:
            return
        if clean:
            self.ended = reason
        else:
            self.error = reason
        if code is not None:
            last = self.h2.highest_inbound_stream_id if last_stream is None else last_stream
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(error_code=code, last_stream_id=last)
        self._closed = True
        self._kick()
        self._closer = self._loop.create_task(self._close_when_written())

    async def _close_when_written(self) -> None:
        # closing the stream wakes the reader (EOF or a reset), which then shuts down
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed(), 2.0)
        with contextlib.suppress(OSError):
            await self._stream.aclose()

    # -- the writer --------------------------------------------------------------------
    def _kick(self) -> None:
        self._queued += 1
        self._dirty.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                upto = self._queued
                data = self.h2.data_to_send()
                if data:
                    await self._stream.write(data)
                self._written = upto
                self._notify_written()
        except OSError as exc:
            self.error = self.error or f"write failed: {exc}"
            self._closed = True
            self._stream.abort()
            for st in list(self._streams.values()):
                self._fail(st, StreamReset(CANCEL, self.error))
            self._notify_written(everything=True)

    def _notify_written(self, everything: bool = False) -> None:
        keep = []
        for gen, fut in self._write_waiters:
            if everything or gen <= self._written:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((gen, fut))
        self._write_waiters = keep

    async def _flushed(self) -> None:
        """Queue what h2 has for sending and wait until it was written."""
        self._kick()
        if self._writer.done():
            return
        gen = self._queued
        fut = self._loop.create_future()
        self._write_waiters.append((gen, fut))
        await fut

    # -- sending on a stream -----------------------------------------------------------
    def _check(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            raise StreamReset(CANCEL, "stream is closed")
        if st.reset is not None:
            raise st.reset
        if self._closed:
            raise StreamReset(CANCEL, self.error or "connection closed")
        return st

    async def send_headers(self, stream_id: int, headers: Headers, *, end_stream: bool) -> None:
        st = self._check(stream_id)
        st.local_ended = end_stream
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise StreamReset(CANCEL, f"cannot send headers: {exc}") from None
        await self._flushed()

    async def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        view = memoryview(data)
        while True:
            st = self._check(stream_id)
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError:
                raise StreamReset(CANCEL, "stream is closed") from None
            size = min(len(view), window, self.h2.max_outbound_frame_size)
            if view and size <= 0:
                st.window = self._loop.create_future()
                await st.window
                continue
            chunk, view = view[:size], view[size:]
            st.local_ended = end_stream and not view
            try:
                self.h2.send_data(stream_id, chunk.tobytes(), end_stream=end_stream and not view)
            except h2.exceptions.ProtocolError as exc:
                raise StreamReset(CANCEL, f"cannot send data: {exc}") from None
            await self._flushed()
            if not view:
                return

    def reset(self, stream_id: int, code: int) -> None:
        st = self._streams.get(stream_id)
        if st is not None and st.reset is None:
            st.reset = StreamReset(code, "reset by the proxy")
            st.body.abort(st.reset)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, error_code=code)
        self._kick()

    def forget(self, stream_id: int) -> None:
        st = self._streams.pop(stream_id, None)
        if st is not None:
            st.body.discard()
        self._wake_capacity()

    # -- receiving ---------------------------------------------------------------------
    def _ack(self, stream_id: int, size: int) -> None:
        if self._closed or size <= 0:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, ValueError):
            self.h2.acknowledge_received_data(size, stream_id)
            self._kick()

    def _ack_stream(self, stream_id: int, size: int) -> None:
        self._ack(stream_id, size)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            sid = event.stream_id or 0
            data = event.data or b""
            padding = (event.flow_controlled_length or 0) - len(data)
            self._ack(sid, padding)
            st = self._streams.get(sid)
            if st is None:
                self._ack(sid, len(data))
            elif data:
                st.body.feed(data, functools.partial(self._ack_stream, sid))
        elif isinstance(event, h2.events.StreamEnded):
            st = self._streams.get(event.stream_id or 0)
            if st is not None:
                st.body.end()
        elif isinstance(event, h2.events.TrailersReceived):
            st = self._streams.get(event.stream_id or 0)
            if st is not None:
                st.body.feed_trailers(list(event.headers or []))
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                st = self._streams.get(event.stream_id)
                if st is not None:
                    _wake(st.window)
            else:
                self._wake_windows()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._wake_windows()
            self._wake_capacity()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        else:
            self._on_other(event)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        sid = event.stream_id or 0
        st = self._streams.get(sid)
        if st is None:
            return
        code = int(event.error_code or 0)
        self._fail(st, StreamReset(code, f"stream reset by peer (code {code})", remote=True))
        self._on_peer_reset(st)

    def _fail(self, st: _Stream, error: StreamReset) -> None:
        if st.reset is None:
            st.reset = error
        st.body.abort(error)
        if st.response is not None and not st.response.done():
            st.response.set_exception(error)
            st.response.exception()  # retrieved: the exchange may be gone already
        _wake(st.window)

    def _wake_windows(self) -> None:
        for st in self._streams.values():
            _wake(st.window)

    def _wake_capacity(self) -> None:
        _wake(self._capacity)

    # role hooks
    def _received(self) -> None:
        pass

    def _on_peer_reset(self, st: _Stream) -> None:
        pass

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway_received = True

    def _on_other(self, event: h2.events.Event) -> None:
        pass


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


# -- the server role -----------------------------------------------------------------------
class H2ServerExchange:
    """One request received on an HTTP/2 connection, and the way to answer it."""

    protocol = "h2"

    def __init__(self, conn: H2Server, st: _Stream, request: RequestHead) -> None:
        self._conn = conn
        self._st = st
        self.request = request
        self.body = st.body

    @property
    def gone(self) -> bool:
        """The client reset the stream or the connection ended."""
        return self._st.reset is not None or self._conn.closed

    @property
    def reset_code(self) -> int | None:
        return self._st.reset.code if self._st.reset is not None else None

    async def interim(self, status: int) -> None:
        """1xx responses are not needed on HTTP/2 (no Expect: 100-continue wait)."""

    async def send_head(self, head: ResponseHead, *, end_stream: bool) -> None:
        await self._conn.send_headers(self._st.id, response_to_h2(head), end_stream=end_stream)

    async def send_data(self, data: bytes) -> None:
        await self._conn.send_data(self._st.id, data)

    async def send_trailers(self, headers: Headers) -> None:
        await self._conn.send_headers(self._st.id, strip_hop_by_hop(headers), end_stream=True)

    async def end(self) -> None:
        await self._conn.send_data(self._st.id, b"", end_stream=True)

    def reset(self, code: int) -> None:
        self._conn.reset(self._st.id, code)

    def finish(self) -> None:
        """The response is complete: if the client is still sending, tell it to stop."""
        if self._st.reset is None and not self._st.body.ended:
            self._conn.reset(self._st.id, NO_ERROR)


Handler = Callable[[H2ServerExchange], Coroutine[Any, Any, None]]


class H2Server(H2Endpoint):
    def __init__(
        self,
        stream: ByteStream,
        limits: HttpLimits,
        handler: Handler,
        *,
        on_goaway: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(stream, client_side=False, limits=limits)
        self._handler = handler
        self._budget = ResetBudget(limits.reset_burst, limits.reset_rate, self._loop.time())
        self._on_goaway_sent = on_goaway
        self._running: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.refused = 0  # streams refused with REFUSED_STREAM (over the limit, after GOAWAY)
        self._draining = False
        self._last_stream: int | None = None  # set by the final GOAWAY of a drain
        self._drain_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._arm_idle()

    async def serve(self) -> None:
        try:
            await self.run()
        finally:
            for timer in (self._idle_timer, self._frame_timer, self._drain_timer):
                if timer is not None:
                    timer.cancel()
            tasks = list(self._running)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- timeouts and drain ------------------------------------------------------------
    def _arm_idle(self) -> None:
        if self._idle_timer is None and not self._closed:
            self._idle_timer = self._loop.call_later(self.limits.idle_timeout, self._idle)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if not self._streams:
            self.stop(NO_ERROR, f"idle for {self.limits.idle_timeout:g} s", clean=True)

    def _received(self) -> None:
        # A peer that trickles a frame, or a header block without its CONTINUATION (a
        # slowloris), must complete it within header_timeout. h2 keeps both in its frame
        # buffer and offers no public view of them (test_http_timeouts checks this one).
        buffer = self.h2.incoming_buffer
        partial = bool(getattr(buffer, "_data", b"") or getattr(buffer, "_headers_buffer", ()))
        if partial and self._frame_timer is None:
            self._frame_timer = self._loop.call_later(
                self.limits.header_timeout, self._frame_expired
            )
        elif not partial and self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _frame_expired(self) -> None:
        self._frame_timer = None
        reason = f"a frame stayed incomplete for {self.limits.header_timeout:g} s"
        self.stop(ENHANCE_YOUR_CALM, reason, clean=False)

    def drain(self) -> None:
        """Shutdown: stop taking streams, let those in flight finish, then close."""
        if self._closed or self._draining:
            return
        self._draining = True
        if self._on_goaway_sent is not None:
            self._on_goaway_sent("drain")
        if not self._streams:
            self._last_stream = self.h2.highest_inbound_stream_id
            self.stop(NO_ERROR, "drained", clean=True)
            return
        # first the notice (no new streams, please), then after one round trip the
        # last stream id: streams the client sent meanwhile are still served
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=NO_ERROR, last_stream_id=_MAX_STREAM_ID)
            self.h2.ping(_DRAIN_PING)
        self._kick()
        self._drain_timer = self._loop.call_later(_DRAIN_RTT, self._final_goaway)

    def _final_goaway(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._closed or self._last_stream is not None:
            return
        self._last_stream = self.h2.highest_inbound_stream_id
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=NO_ERROR, last_stream_id=self._last_stream)
        self._kick()
        if not self._streams:
            self.stop(None, "drained", clean=True)

    def forget(self, stream_id: int) -> None:
        super().forget(stream_id)
        if self._streams or self._closed:
            return
        if self._last_stream is not None:
            self.stop(None, "drained", clean=True)
        elif not self._draining:
            self._arm_idle()

    # -- requests ----------------------------------------------------------------------
    def _on_other(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.PingAckReceived) and event.ping_data == _DRAIN_PING:
            self._final_goaway()

    def _refuse(self, stream_id: int, why: str) -> None:
        self.refused += 1
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, error_code=REFUSED_STREAM)
        self._kick()
        log.debug("HTTP/2 stream refused", extra={"event": "http.refused_stream",
                                                  "stream": stream_id, "reason": why})  # fmt: skip

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id or 0
        if self._last_stream is not None and sid > self._last_stream:
            self._refuse(sid, "after GOAWAY")
            return
        if self._open_streams() >= self.limits.max_concurrent_streams:
            # a refused stream cost us its head: it spends the peer's reset budget too
            self._refuse(sid, f"over the limit of {self.limits.max_concurrent_streams} streams")
            self._spend()
            return
        self._disarm_idle()
        ended = event.stream_ended is not None
        st = _Stream(sid)
        if ended:
            st.body.end()
        self._streams[sid] = st
        self.requests += 1
        head = request_from_h2(list(event.headers or []), ended=ended)
        task = self._loop.create_task(self._handler(H2ServerExchange(self, st, head)))
        st.task = task
        self._running.add(task)
        task.add_done_callback(functools.partial(self._handler_done, sid))

    def _open_streams(self) -> int:
        """Streams that count against the limit: not yet closed both ways (RFC 9113 5.1;
        a handler may still be winding up one the client already saw end)."""
        return sum(
            1
            for st in self._streams.values()
            if st.reset is None and not (st.local_ended and st.body.ended)
        )

    def _handler_done(self, stream_id: int, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self.forget(stream_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("HTTP/2 request handler failed", exc_info=task.exception(),
                      extra={"event": "http.internal_error"})  # fmt: skip

    def _on_peer_reset(self, st: _Stream) -> None:
        if st.task is not None and not st.task.done():
            st.task.cancel()
        self._spend()

    def _spend(self) -> None:
        if not self._budget.spend(self._loop.time()):
            reason = (
                f"peer reset (or opened over the limit) {self._budget.spent} streams, more "
                "than the rapid-reset budget "
                f"(burst {self._budget.burst}, {self._budget.rate:g}/s)"
            )
            if self._on_goaway_sent is not None:
                self._on_goaway_sent("rapid_reset")
            log.warning("HTTP/2 GOAWAY ENHANCE_YOUR_CALM",
                        extra={"event": "http.goaway", "reason": reason})  # fmt: skip
            self.goaway(ENHANCE_YOUR_CALM, reason)


# -- the client role -----------------------------------------------------------------------
class H2ClientStream:
    """One request sent on an HTTP/2 client connection."""

    def __init__(self, conn: H2Client, st: _Stream) -> None:
        self._conn = conn
        self._st = st

    async def send_data(self, data: bytes) -> None:
        await self._conn.send_data(self._st.id, data)

    async def send_trailers(self, headers: Headers) -> None:
        await self._conn.send_headers(self._st.id, strip_hop_by_hop(headers), end_stream=True)

    async def end(self) -> None:
        await self._conn.send_data(self._st.id, b"", end_stream=True)

    def reset(self, code: int) -> None:
        if self._st.reset is None:
            self._conn.reset(self._st.id, code)

    async def response(self) -> tuple[ResponseHead, Body]:
        assert self._st.response is not None
        head = await self._st.response
        return head, self._st.body

    def close(self) -> None:
        """The exchange is over: reset the stream if it is still open, then forget it."""
        st = self._st
        if st.reset is None and not (st.local_ended and st.body.ended):
            self._conn.reset(st.id, CANCEL)
        self._conn.forget(self._st.id)


class H2Client(H2Endpoint):
    def __init__(self, stream: ByteStream, limits: HttpLimits) -> None:
        super().__init__(stream, client_side=True, limits=limits)

    @property
    def usable(self) -> bool:
        return not self._closed and not self.goaway_received

    async def open_stream(self, head: RequestHead) -> H2ClientStream:
        while (
            not self._closed
            and self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams
        ):
            self._capacity = self._loop.create_future()
            await self._capacity
        if self._closed or self.goaway_received:
            raise StreamReset(CANCEL, self.error or "upstream connection closed")
        sid = self.h2.get_next_available_stream_id()
        st = _Stream(sid)
        st.response = self._loop.create_future()
        self._streams[sid] = st
        try:
            self.h2.send_headers(sid, request_to_h2(head), end_stream=head.ended)
            st.local_ended = head.ended
        except h2.exceptions.ProtocolError as exc:
            self.forget(sid)
            raise StreamReset(CANCEL, f"cannot send request: {exc}") from None
        self._kick()
        return H2ClientStream(self, st)

    def _on_other(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            st = self._streams.get(event.stream_id or 0)
            if st is not None and st.response is not None and not st.response.done():
                ended = event.stream_ended is not None
                headers = list(event.headers or [])
                st.response.set_result(response_from_h2(headers, ended=ended))
                if ended:
                    st.body.end()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway_received = True
        last = event.last_stream_id or 0
        for st in list(self._streams.values()):
            if st.id > last:  # never processed: safe for the client to retry
                refused = StreamReset(REFUSED_STREAM, "upstream sent GOAWAY before it", remote=True)
                self._fail(st, refused)
