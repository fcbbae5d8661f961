"""PROXY protocol v2 (sans-IO): the header inbound tcp listeners send, and its parser.

Valid, invalid and tampered cases, plus hypothesis: round trips, truncations, arbitrary
bytes and single-byte mutations never escape as anything but ``ProxyProtocolError``.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.pki import PeerIdentity
from meshproxy.proxy import _proxyproto as pp

PEER = PeerIdentity("spiffe://t.test/marble/frontend", "t.test", "frontend", "0f6e-uuid", True)


def test_header_for_a_marble_carries_its_spiffe_id_in_tlv_0xe0() -> None:
    data = pp.for_peer(PEER, "127.0.0.1:40000", ("127.0.0.1", 8443))
    header, used = pp.parse(data + b"app bytes") or (None, 0)
    assert header is not None
    assert used == len(data)
    assert (header.command, header.family) == (pp.PROXY, pp.INET)
    assert header.source == ("127.0.0.1", 40000)
    assert header.destination == ("127.0.0.1", 8443)
    assert header.spiffe_id == "spiffe://t.test/marble/frontend"
    assert header.tlv(pp.TLV_INSTANCE_UUID) == b"0f6e-uuid"
    ssl = header.ssl
    assert ssl is not None
    assert ssl.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert ssl.verify == 0
    assert ssl.version == "TLSv1.3"


def test_exact_bytes_of_a_known_header() -> None:
    """A fixed vector, so the wire format cannot drift unnoticed."""
    data = pp.for_peer(
        PeerIdentity("spiffe://a/marble/b", "a", "b", None, False), "10.0.0.1:1", ("10.0.0.2", 2)
    )
    ssl_value = b"\x07" + b"\0\0\0\0" + b"\x21\x00\x07TLSv1.3"
    body = (
        bytes([10, 0, 0, 1, 10, 0, 0, 2])
        + struct.pack("!HH", 1, 2)
        + b"\x20"
        + struct.pack("!H", len(ssl_value))
        + ssl_value
        + b"\xe0\x00\x13spiffe://a/marble/b"
    )
    assert data == pp.SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def test_ipv6_and_unknown_addresses() -> None:
    v6 = pp.parse(pp.for_peer(PEER, "[::1]:5", ("::", 443)))
    assert v6 is not None
    assert v6[0].family == pp.INET6
    assert v6[0].source == ("::1", 5)
    mixed = pp.parse(pp.for_peer(PEER, "127.0.0.1:5", ("::", 443)))
    assert mixed is not None
    assert (mixed[0].family, mixed[0].source, mixed[0].destination) == (pp.UNSPEC, None, None)
    assert mixed[0].spiffe_id == PEER.spiffe_id
    named = pp.parse(pp.for_peer(PEER, "?", ("host.example", 443)))
    assert named is not None
    assert named[0].family == pp.UNSPEC


def test_public_client_has_no_identity_tlvs() -> None:
    parsed = pp.parse(pp.for_peer(None, "127.0.0.1:5", ("127.0.0.1", 6)))
    assert parsed is not None
    header = parsed[0]
    assert header.spiffe_id is None
    assert header.ssl is not None
    assert header.ssl.client == pp.PP2_CLIENT_SSL


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY protocol v1 is refused"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a PROXY protocol v2 header"),
        (pp.SIGNATURE + b"\x11\x11\x00\x00", "PROXY protocol version 1"),
        (pp.SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12, "command 2 is not LOCAL or PROXY"),
        (pp.SIGNATURE + b"\x21\x41\x00\x00", "address family byte 0x41"),
        (pp.SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4, "below its addresses"),
        (pp.SIGNATURE + b"\x21\x00\x00\x02" + b"\xe0\x00", "TLV truncated"),
        (pp.SIGNATURE + b"\x21\x00\x00\x04" + b"\xe0\x00\x05x", "overruns the header"),
        (pp.SIGNATURE + b"\x21\x00\x00\x05" + b"\x20\x00\x02ab", "shorter than 5 bytes"),
        (pp.SIGNATURE + b"\x21\x00\x00\x04" + b"\xe0\x00\x01\xff", "SPIFFE ID TLV is not UTF-8"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(pp.ProxyProtocolError, match=message):
        pp.parse(data)


def test_incomplete_headers_ask_for_more() -> None:
    data = pp.for_peer(PEER, "127.0.0.1:1", ("127.0.0.1", 2))
    for cut in range(len(data)):
        assert pp.parse(data[:cut]) is None


def test_local_command_parses() -> None:
    header = pp.parse(pp.encode(pp.ProxyHeader(pp.LOCAL, pp.UNSPEC, None, None)))
    assert header is not None
    assert header[0].command == pp.LOCAL


# -- fuzzing ---------------------------------------------------------------------------------
ipv4 = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)
tlvs = st.lists(
    st.tuples(
        st.integers(0, 255).filter(lambda k: k not in (pp.PP2_TYPE_SSL, pp.TLV_SPIFFE_ID)),
        st.binary(max_size=64),
    ),
    max_size=5,
)


@given(ipv4, ports, ipv4, ports, tlvs, st.text(max_size=80))
def test_encode_then_parse_is_the_identity(
    sa: str, sp: int, da: str, dp: int, extra: list[tuple[int, bytes]], spiffe: str
) -> None:
    items = ((pp.TLV_SPIFFE_ID, spiffe.encode()), *extra)
    header = pp.ProxyHeader(pp.PROXY, pp.INET, (sa, sp), (da, dp), items)
    data = pp.encode(header)
    parsed = pp.parse(data + b"tail")
    assert parsed == (header, len(data))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_proxy_protocol_error(data: bytes) -> None:
    with contextlib.suppress(pp.ProxyProtocolError):
        pp.parse(data)


@settings(max_examples=300)
@given(st.data())
def test_single_byte_mutations_never_escape_as_other_errors(data: st.DataObject) -> None:
    good = pp.for_peer(PEER, "127.0.0.1:1", ("127.0.0.1", 2))
    i = data.draw(st.integers(0, len(good) - 1))
    b = data.draw(st.integers(0, 255))
    mutated = good[:i] + bytes([b]) + good[i + 1 :]
    try:
        result = pp.parse(mutated)
    except pp.ProxyProtocolError:
        return
    if result is not None:
        assert result[1] <= len(mutated)
