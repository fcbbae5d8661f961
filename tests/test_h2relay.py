"""The native HTTP/2 relay core (native_tls/h2relay.c) between two real HTTP/2 peers.

``H2Relay`` is the engine's relay without I/O: the client and the app are python-hyper
``h2`` connections (real HTTP/2 state machines that validate every frame they get), and
bytes move client -> relay -> app and back until nobody has anything to say. Malformed
input is hand-built frames; hypothesis feeds garbage. Each test asserts what a peer saw.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

native = pytest.importorskip("meshproxy._native_tls")
H2Relay = native.H2Relay

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
IDENTITY = [
    (b"x-forwarded-client-cert", b"By=spiffe://td/marble/app;Hash=ab;URI=spiffe://td/marble/fe"),
    (b"l5d-client-id", b"fe.td"),
    (b"forwarded", b"for=_fe;proto=https"),
]
ADMIN_DENIED = b"route /admin* does not allow marble type 'fe'"
ALLOW_API = [
    (
        b"no manifest route rule matches",
        [((b"GET",), b"/api", False, True, b"r1"), ((), b"/admin", False, False, ADMIN_DENIED)],
    )
]


def policy(
    tables: Sequence[Any] = (),
    *,
    streams: int = 100,
    header_bytes: int = 64 * 1024,
    burst: int = 1000,
    rate: float = 33.0,
) -> tuple[Any, ...]:
    return (list(IDENTITY), list(tables), streams, header_bytes, burst, rate)


class Pair:
    """client <-> relay <-> app, with the events each side saw."""

    def __init__(self, spec: tuple[Any, ...], *, validate: bool = True) -> None:
        self.relay = H2Relay(spec)
        self.now = 1_000_000_000
        cfg = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )  # fmt: skip
        self.client = h2.connection.H2Connection(cfg)
        self.app = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.client_events: list[h2.events.Event] = []
        self.app_events: list[h2.events.Event] = []
        self.client.initiate_connection()
        self.app.initiate_connection()
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            if data := self.client.data_to_send():
                self.relay.feed_client(data, self.now)
                moved = True
            if data := self.app.data_to_send():
                self.relay.feed_app(data, self.now)
                moved = True
            if data := self.relay.take_app():
                self.app_events += self.app.receive_data(data)
                moved = True
            if data := self.relay.take_client():
                self.client_events += self.client.receive_data(data)
                moved = True
            if not moved:
                return
        raise AssertionError("the peers never went quiet")

    def request(
        self, path: bytes = b"/api/x", *, method: bytes = b"GET", extra: Sequence[Any] = (),
        end: bool = True,
    ) -> int:  # fmt: skip
        sid = self.client.get_next_available_stream_id()
        head = [(b":method", method), (b":scheme", b"https"), (b":authority", b"app"),
                (b":path", path), *extra]  # fmt: skip
        self.client.send_headers(sid, head, end_stream=end)
        self.pump()
        return sid

    def of(self, side: str, kind: type) -> list[Any]:
        events = self.client_events if side == "client" else self.app_events
        return [e for e in events if isinstance(e, kind)]

    def respond(self, sid: int, body: bytes = b"ok", headers: Sequence[Any] = ()) -> None:
        self.app.send_headers(sid, [(b":status", b"200"), *headers])
        self.app.send_data(sid, body, end_stream=True)
        self.pump()


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid)
    return head + payload


# -- what crosses -------------------------------------------------------------------------------
def test_identity_headers_a_client_sent_are_replaced_by_the_connections() -> None:
    p = Pair(policy())
    forged = [
        (b"x-forwarded-client-cert", b"By=evil"),
        (b"l5d-client-id", b"admin.td"),
        (b"forwarded", b"for=_admin"),
        (b"l5d-anything", b"x"),
        (b"user-agent", b"t/1"),
    ]
    sid = p.request(extra=forged)
    [req] = p.of("app", h2.events.RequestReceived)
    assert req.stream_id == sid
    headers = list(req.headers)
    assert (b"user-agent", b"t/1") in headers
    assert (b":path", b"/api/x") in headers
    for name, value in IDENTITY:
        assert [v for k, v in headers if k == name] == [value]
    assert not any(k.startswith(b"l5d-") and k != b"l5d-client-id" for k, _ in headers)


def test_a_response_and_its_body_reach_the_client_and_are_counted() -> None:
    p = Pair(policy())
    sid = p.request()
    p.now += 3_500_000  # 3.5 ms to the response head
    p.respond(sid, b"x" * 100)
    [resp] = p.of("client", h2.events.ResponseReceived)
    assert dict(resp.headers)[b":status"] == b"200"
    assert b"".join(e.data for e in p.of("client", h2.events.DataReceived)) == b"x" * 100
    assert p.of("client", h2.events.StreamEnded)
    stats = p.relay.stats()
    assert stats["requests"] == 1
    [(status, grpc, ok, count, timed, buckets, total)] = stats["outcomes"]
    assert (status, grpc, ok, count, timed) == (200, None, True, 1, 1)
    assert buckets[3] == 1
    assert total == pytest.approx(3.5)


def test_a_large_body_crosses_both_ways_with_flow_control_end_to_end() -> None:
    p = Pair(policy())
    sid = p.request(method=b"POST", end=False)
    sent = 0
    while sent < 300_000:  # the client may send only what the app's windows allow
        window = min(p.client.local_flow_control_window(sid), 16384)
        assert window > 0, "the app's WINDOW_UPDATEs did not reach the client"
        p.client.send_data(sid, b"u" * window)
        sent += window
        p.pump()
        for e in p.of("app", h2.events.DataReceived):
            p.app.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        p.app_events.clear()
        p.pump()
    p.client.end_stream(sid)
    p.respond(sid)
    assert p.of("client", h2.events.StreamEnded)


def test_trailers_cross_without_identity_headers() -> None:
    p = Pair(policy())
    sid = p.request(method=b"POST", end=False, extra=[(b"te", b"trailers")])
    p.client.send_data(sid, b"abc")
    p.client.send_headers(sid, [(b"x-forwarded-client-cert", b"By=evil"), (b"x-sum", b"6")],
                          end_stream=True)  # fmt: skip
    p.pump()
    [trailers] = p.of("app", h2.events.TrailersReceived)
    assert list(trailers.headers) == [(b"x-sum", b"6")]


def test_many_requests_keep_the_hpack_state_of_both_sides_in_step() -> None:
    p = Pair(policy())
    for i in range(300):
        sid = p.request(f"/api/{i}".encode(), extra=[(b"x-n", str(i).encode())])
        p.respond(sid, headers=[(b"x-r", str(i).encode())])
    got = p.of("app", h2.events.RequestReceived)
    assert [dict(r.headers)[b"x-n"] for r in got] == [str(i).encode() for i in range(300)]
    resps = p.of("client", h2.events.ResponseReceived)
    assert [dict(r.headers)[b"x-r"] for r in resps] == [str(i).encode() for i in range(300)]
    assert p.relay.stats()["outcomes"][0][3] == 300


# -- route rules ----------------------------------------------------------------------------------
def test_a_denied_request_is_answered_403_and_never_reaches_the_app() -> None:
    p = Pair(policy(ALLOW_API))
    sid = p.request(b"/admin/users")
    assert not p.of("app", h2.events.RequestReceived)
    [resp] = p.of("client", h2.events.ResponseReceived)
    headers = dict(resp.headers)
    assert headers[b":status"] == b"403"
    assert headers[b"meshproxy-error"] == b"route /admin* does not allow marble type 'fe'"
    assert p.relay.refusals() == [
        (sid, 403, "GET", "/admin/users", "route /admin* does not allow marble type 'fe'")
    ]
    stats = p.relay.stats()
    assert stats["rule_deny"] == [0, 1]
    assert stats["outcomes"][0][:3] == (403, None, False)
    ok = p.request(b"/api/ok")  # the connection goes on, HPACK intact
    assert [r.stream_id for r in p.of("app", h2.events.RequestReceived)] == [ok]


def test_no_matching_rule_and_a_wrong_method_are_refused() -> None:
    p = Pair(policy(ALLOW_API))
    p.request(b"/other")
    p.request(b"/api/x", method=b"DELETE")
    assert not p.of("app", h2.events.RequestReceived)
    reasons = [r[4] for r in p.relay.refusals()]
    assert reasons == ["no manifest route rule matches GET /other",
                       "no manifest route rule matches DELETE /api/x"]  # fmt: skip


@pytest.mark.parametrize(
    "path", [b"/api/../admin", b"/api//x", b"/api/%2e%2e/admin", b"/api/./x", b"api", b"/a\\b"]
)
def test_a_path_not_in_normal_form_is_refused_with_400(path: bytes) -> None:
    p = Pair(policy(ALLOW_API))
    p.request(path)
    assert not p.of("app", h2.events.RequestReceived)
    [resp] = p.of("client", h2.events.ResponseReceived)
    assert dict(resp.headers)[b":status"] == b"400"


def test_a_denied_grpc_call_gets_permission_denied_in_a_trailers_only_response() -> None:
    p = Pair(policy(ALLOW_API))
    p.request(b"/admin/Do", method=b"POST", extra=[(b"content-type", b"application/grpc")])
    [resp] = p.of("client", h2.events.ResponseReceived)
    headers = dict(resp.headers)
    assert headers[b":status"] == b"200"
    assert headers[b"grpc-status"] == b"7"
    assert b"does not allow" in headers[b"grpc-message"]
    assert p.of("client", h2.events.StreamEnded)


def test_the_body_of_a_denied_request_is_dropped_and_its_credit_given_back() -> None:
    p = Pair(policy(ALLOW_API))
    window = p.client.outbound_flow_control_window
    sid = p.request(b"/admin/x", method=b"POST", end=False)
    assert [e.error_code for e in p.of("client", h2.events.StreamReset)] == [
        h2.errors.ErrorCodes.NO_ERROR
    ]
    # frames already in flight when the reset arrives: build them by hand
    p.relay.feed_client(frame(0, 0, sid, b"d" * 5000), p.now)
    p.pump()
    assert not p.of("app", h2.events.DataReceived)
    assert p.client.outbound_flow_control_window == window + 5000  # nothing was subtracted
    assert p.of("client", h2.events.WindowUpdated)


# -- limits ---------------------------------------------------------------------------------------
def test_streams_over_the_limit_are_refused_and_the_apps_settings_capped() -> None:
    p = Pair(policy(streams=2))
    assert p.client.remote_settings.max_concurrent_streams == 2  # the app said 100
    p.request(end=False)
    p.request(end=False)
    # a client that ignores the limit: a third HEADERS by hand (static-table entries only)
    p.relay.feed_client(frame(1, 5, 5, b"\x82\x87\x84"), p.now)
    out = p.relay.take_client()
    assert frame(3, 0, 5, struct.pack(">I", 7)) in out  # RST_STREAM REFUSED_STREAM
    assert p.relay.take_app() == b""
    assert len(p.of("app", h2.events.RequestReceived)) == 2
    assert p.relay.stats()["refused_streams"] == 1


def test_rapid_resets_end_the_connection_with_enhance_your_calm() -> None:
    p = Pair(policy(burst=5, rate=0.0))
    for _ in range(6):
        sid = p.request(end=False)
        p.client.reset_stream(sid)
        p.pump()
        if p.relay.failed:
            break
    assert p.relay.failed
    assert "rapid reset" in (p.relay.error or "")
    [goaway] = p.of("client", h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_block_over_the_limit_ends_the_connection_cleanly() -> None:
    p = Pair(policy(header_bytes=4096))
    p.client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"https"),
                              (b":authority", b"a"), (b":path", b"/"),
                              (b"x-big", b"\x01" * 6000)], end_stream=True)  # fmt: skip
    p.pump()
    assert p.relay.failed
    assert not p.of("app", h2.events.RequestReceived)
    [goaway] = p.of("client", h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_list_over_the_limit_gets_431() -> None:
    p = Pair(policy(header_bytes=4096))
    sid = p.request(extra=[(b"x-big", b"a" * 5000)])  # Huffman: ~3.1 KiB encoded
    assert not p.relay.failed
    [resp] = p.of("client", h2.events.ResponseReceived)
    assert resp.stream_id == sid
    assert dict(resp.headers)[b":status"] == b"431"
    assert not p.of("app", h2.events.RequestReceived)


def test_a_continuation_flood_ends_with_goaway_not_unbounded_memory() -> None:
    p = Pair(policy(header_bytes=8192))
    block = b"\x82\x87\x84"  # :method GET, :scheme https, :path /
    data = frame(1, 0, 1, block)  # HEADERS without END_HEADERS
    for _ in range(10_000):
        if not p.relay.feed_client(data, p.now):
            break
        data = frame(9, 0, 1, b"\x00" * 16)  # CONTINUATION, never ending
    assert p.relay.failed
    assert "size limit" in (p.relay.error or "")
    p.pump()
    [goaway] = p.of("client", h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (frame(9, 4, 1, b"\x82"), "CONTINUATION without HEADERS"),
        (frame(1, 4, 2, b"\x82"), "stream id"),
        (frame(1, 0x0C, 1, b"\xff"), "padding"),
        (frame(4, 0, 0, b"\x00" * 5), "multiple of 6"),
        (frame(5, 4, 1, b"\x00" * 8), "PUSH_PROMISE"),
        (frame(1, 4, 1, b"\xff\xff\xff\xff"), "HPACK"),
        (frame(0, 0, 0, b"x"), "stream 0"),
    ],
)
def test_malformed_frames_fail_the_connection_with_a_reason(raw: bytes, why: str) -> None:
    p = Pair(policy())
    assert not p.relay.feed_client(raw, p.now)
    assert why in (p.relay.error or "")
    p.pump()
    assert p.of("client", h2.events.ConnectionTerminated)


def test_a_client_that_does_not_speak_http2_is_refused() -> None:
    relay = H2Relay(policy())
    assert not relay.feed_client(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0)
    assert "preface" in (relay.error or "")
    assert relay.take_app() == b""


def test_open_streams_count_as_reset_when_the_connection_ends() -> None:
    p = Pair(policy())
    p.request(end=False)
    stats = p.relay.stats(p.now + 1, True)
    assert stats["outcomes"][0][:3] == (0, None, False)


# -- garbage never crashes ---------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client=st.lists(st.binary(max_size=300), max_size=8),
    app=st.lists(st.binary(max_size=300), max_size=8),
)
def test_garbage_from_either_side_never_crashes_the_relay(
    client: list[bytes], app: list[bytes]
) -> None:
    relay = H2Relay(policy(ALLOW_API, header_bytes=2048, streams=4, burst=3, rate=0.0))
    relay.feed_client(PREFACE, 0)
    for i in range(max(len(client), len(app))):
        if i < len(client):
            relay.feed_client(client[i], i)
        if i < len(app):
            relay.feed_app(app[i], i)
        relay.take_app()
        relay.take_client()
    relay.refusals()
    relay.stats(10, True)


_frames = st.builds(
    frame,
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xFF]),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client=st.lists(_frames, max_size=12), app=st.lists(_frames, max_size=12))
def test_well_framed_nonsense_never_crashes_the_relay(
    client: list[bytes], app: list[bytes]
) -> None:
    p = Pair(policy(ALLOW_API, header_bytes=2048, streams=4, burst=3, rate=0.0))
    p.request()
    for i, raw in enumerate(client):
        p.relay.feed_client(raw, p.now + i)
        if i < len(app):
            p.relay.feed_app(app[i], p.now + i)
    out = p.relay.take_client() + p.relay.take_app()
    assert isinstance(out, bytes)
    p.relay.stats(p.now, True)


def test_a_reply_of_ours_announces_a_header_table_size_the_client_set() -> None:
    """RFC 7541 4.2: the first header block after the new size took effect starts with a
    size update; when that block is a refusal of ours, ours carries it."""
    p = Pair(policy(ALLOW_API))
    p.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    p.pump()  # the app ACKs: the client's decoder now expects the update
    p.request(b"/admin/x")
    [resp] = p.of("client", h2.events.ResponseReceived)
    assert dict(resp.headers)[b":status"] == b"403"
    assert p.client.decoder.header_table_size == 1024
    p.relay.feed_client(frame(1, 5, 7, b"\x82\x87\x84"), p.now)  # GET / : refused again
    out = p.relay.take_client()
    assert out[9:10] != b"\x3f"  # announced once only


def test_without_a_size_change_a_reply_carries_no_size_update() -> None:
    p = Pair(policy(ALLOW_API))
    p.relay.feed_client(frame(1, 5, 1, b"\x82\x87\x84"), p.now)  # GET /: no rule matches
    out = p.relay.take_client()
    assert out[3] == 1  # HEADERS
    assert out[9] & 0xE0 != 0x20


def test_nothing_of_ours_reaches_the_client_before_the_apps_settings() -> None:
    """RFC 9113 3.4: a server's first frame is SETTINGS. A request refused in the client's
    first flight is answered only after the app's SETTINGS went through."""
    relay = H2Relay(policy(ALLOW_API))
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    head = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"),
            (b":path", b"/admin/x")]  # fmt: skip
    client.send_headers(1, head, end_stream=True)
    relay.feed_client(client.data_to_send(), 0)
    assert relay.take_client() == b""
    app = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    app.initiate_connection()
    relay.feed_app(app.data_to_send(), 0)
    out = relay.take_client()
    assert out[3] == 4  # SETTINGS first
    events = client.receive_data(out)
    [resp] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"403"


def test_a_failure_before_the_apps_settings_still_starts_with_settings() -> None:
    relay = H2Relay(policy())
    relay.feed_client(PREFACE, 0)
    assert not relay.feed_client(frame(9, 4, 1, b"\x82"), 0)
    out = relay.take_client()
    assert out[3] == 4  # SETTINGS
    assert out[9 + 3] == 7  # then GOAWAY


def test_a_drain_sends_goaway_refuses_new_streams_and_ends_when_streams_are_done() -> None:
    p = Pair(policy())
    sid = p.request(method=b"POST", end=False)
    p.relay.drain()
    p.pump()
    [goaway] = p.of("client", h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == sid
    assert not p.relay.drained
    p.relay.feed_client(frame(1, 5, sid + 2, b"\x82\x87\x84"), p.now)  # a late new stream
    assert frame(3, 0, sid + 2, struct.pack(">I", 7)) in p.relay.take_client()
    # h2's client takes no more input after a GOAWAY: its last DATA and what it gets by hand
    p.relay.feed_client(frame(0, 1, sid, b"last"), p.now)
    p.app_events += p.app.receive_data(p.relay.take_app())
    assert [e.data for e in p.app_events if isinstance(e, h2.events.DataReceived)] == [b"last"]
    assert not p.relay.drained  # the response is still to come
    p.app.send_headers(sid, [(b":status", b"200")])
    p.app.send_data(sid, b"done", end_stream=True)
    p.relay.feed_app(p.app.data_to_send(), p.now)
    assert frame(0, 1, sid, b"done") in p.relay.take_client()
    assert p.relay.drained
