"""PROXY protocol v2: the header an inbound ``protocol: tcp`` listener can send the app.

With ``proxy_protocol: v2`` the app's Unix socket receives, before the first byte of the
connection, a PROXY v2 header (haproxy's ``proxy-protocol.txt`` section 2.2) that says
who the verified peer is:

* command PROXY, family INET/INET6 + STREAM with the TCP addresses the listener saw
  (informational only: addresses are host-visible and never an identity), or UNSPEC when
  they are unknown;
* ``PP2_TYPE_SSL`` (0x20): ``client`` = SSL | CERT_CONN | CERT_SESS (SSL only for
  public clients), ``verify`` = 0 (the certificate verified), and the sub-TLV
  ``PP2_SUBTYPE_SSL_VERSION`` (0x21) = ``TLSv1.3``;
* ``0xE0`` (the first of the range the spec reserves for applications,
  PP2_TYPE_MIN_CUSTOM; Linkerd's proposal uses it too): the peer's SPIFFE ID, UTF-8;
* ``0xE1``: the peer's instance UUID, when its certificate carries one.

Both TLVs are absent for a public client. The parser is strict (signature, version,
command, family, lengths, TLVs that exactly fill the header) and is what tests and apps
written in Python can use; it refuses PROXY v1. Sans-IO: bytes in, values out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from meshproxy.errors import MeshError
from meshproxy.pki import PeerIdentity

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_MIN = 16
MAX_LENGTH = 65535 + HEADER_MIN

LOCAL, PROXY = 0x0, 0x1
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3
STREAM = 0x1
_ADDR_LEN = {UNSPEC: 0, INET: 12, INET6: 36, UNIX: 216}

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
TLV_SPIFFE_ID = 0xE0
TLV_INSTANCE_UUID = 0xE1


class ProxyProtocolError(MeshError):
    """A PROXY header is malformed (the connection must be dropped)."""


@dataclass(frozen=True)
class SSLInfo:
    client: int
    verify: int
    subtlvs: tuple[tuple[int, bytes], ...]

    @property
    def version(self) -> str | None:
        for kind, value in self.subtlvs:
            if kind == PP2_SUBTYPE_SSL_VERSION:
                return value.decode("ascii", "replace")
        return None


@dataclass(frozen=True)
class ProxyHeader:
    command: int
    family: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    transport: int = STREAM

    def tlv(self, kind: int) -> bytes | None:
        for k, value in self.tlvs:
            if k == kind:
                return value
        return None

    @property
    def spiffe_id(self) -> str | None:
        value = self.tlv(TLV_SPIFFE_ID)
        return None if value is None else value.decode("utf-8")

    @property
    def ssl(self) -> SSLInfo | None:
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _parse_ssl(value)


# -- encoding ------------------------------------------------------------------------------
def encode(header: ProxyHeader) -> bytes:
    family, addrs = header.family, b""
    if header.command == PROXY and family in (INET, INET6):
        if header.source is None or header.destination is None:
            raise ValueError("INET and INET6 headers need both addresses")
        version = 4 if family == INET else 6
        src = ipaddress.ip_address(header.source[0])
        dst = ipaddress.ip_address(header.destination[0])
        if src.version != version or dst.version != version:
            raise ValueError("addresses do not match the family")
        addrs = (
            src.packed + dst.packed + struct.pack("!HH", header.source[1], header.destination[1])
        )
    elif family != UNSPEC:
        raise ValueError(f"cannot encode family {family}")
    body = addrs + b"".join(_tlv(k, v) for k, v in header.tlvs)
    if len(body) > 65535:
        raise ValueError("PROXY header too long")
    fam = (family << 4) | (header.transport if family != UNSPEC else 0)
    return SIGNATURE + bytes([0x20 | header.command, fam]) + struct.pack("!H", len(body)) + body


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 255 or len(value) > 65535:
        raise ValueError("TLV out of range")
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def ssl_tlv(*, client: int, verify: int = 0, version: str = "TLSv1.3") -> bytes:
    return (
        bytes([client])
        + struct.pack("!I", verify)
        + _tlv(PP2_SUBTYPE_SSL_VERSION, version.encode())
    )


def for_peer(
    peer: PeerIdentity | None, source: str | None, destination: tuple[str, int] | None
) -> bytes:
    """The header for one accepted connection (``source`` as the listener logs it).

    Addresses that are not both IPv4 or both IPv6 (a DNS name, a wildcard of the other
    family) give family UNSPEC; the identity TLVs are there either way.
    """
    src = parse_hostport(source) if source else None
    dst = parse_hostport(f"[{destination[0]}]:{destination[1]}") if destination else None
    family = UNSPEC
    if src is not None and dst is not None:
        versions = {ipaddress.ip_address(src[0]).version, ipaddress.ip_address(dst[0]).version}
        family = {frozenset({4}): INET, frozenset({6}): INET6}.get(frozenset(versions), UNSPEC)
    if family == UNSPEC:
        src = dst = None
    if peer is None:
        tlvs = [(PP2_TYPE_SSL, ssl_tlv(client=PP2_CLIENT_SSL))]
    else:
        flags = PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
        tlvs = [(PP2_TYPE_SSL, ssl_tlv(client=flags)), (TLV_SPIFFE_ID, peer.spiffe_id.encode())]
        if peer.uuid:
            tlvs.append((TLV_INSTANCE_UUID, peer.uuid.encode()))
    return encode(ProxyHeader(PROXY, family, src, dst, tuple(tlvs)))


def parse_hostport(text: str) -> tuple[str, int] | None:
    """``1.2.3.4:5`` or ``[::1]:5`` into (address, port); None when it is not that."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None


# -- parsing -------------------------------------------------------------------------------
def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length; None if more bytes are needed."""
    if len(data) < HEADER_MIN:
        if not SIGNATURE.startswith(data[: len(SIGNATURE)]):
            raise ProxyProtocolError(_not_v2(data))
        return None
    if not data.startswith(SIGNATURE):
        raise ProxyProtocolError(_not_v2(data))
    ver_cmd, fam = data[12], data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY protocol version {ver_cmd >> 4} (expected 2)")
    command = ver_cmd & 0x0F
    if command not in (LOCAL, PROXY):
        raise ProxyProtocolError(f"PROXY command {command} is not LOCAL or PROXY")
    family, transport = fam >> 4, fam & 0x0F
    if family not in _ADDR_LEN or transport > 2:
        raise ProxyProtocolError(f"PROXY address family byte 0x{fam:02x} is not valid")
    if len(data) < HEADER_MIN + length:
        return None
    body = data[HEADER_MIN : HEADER_MIN + length]
    need = _ADDR_LEN[family]
    if length < need:
        raise ProxyProtocolError(f"PROXY header length {length} is below its addresses ({need})")
    source = destination = None
    if family == INET:
        source = (str(ipaddress.IPv4Address(body[0:4])), struct.unpack_from("!H", body, 8)[0])
        destination = (str(ipaddress.IPv4Address(body[4:8])), struct.unpack_from("!H", body, 10)[0])
    elif family == INET6:
        source = (str(ipaddress.IPv6Address(body[0:16])), struct.unpack_from("!H", body, 32)[0])
        destination = (
            str(ipaddress.IPv6Address(body[16:32])),
            struct.unpack_from("!H", body, 34)[0],
        )
    tlvs = _parse_tlvs(body[need:], "TLV")
    for kind, value in tlvs:
        if kind == PP2_TYPE_SSL:
            _parse_ssl(value)
        elif kind == TLV_SPIFFE_ID:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProxyProtocolError("SPIFFE ID TLV is not UTF-8") from None
    header = ProxyHeader(command, family, source, destination, tuple(tlvs), transport)
    return header, HEADER_MIN + length


def _parse_tlvs(data: bytes, what: str) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError(f"{what} truncated at offset {i}")
        kind = data[i]
        (size,) = struct.unpack_from("!H", data, i + 1)
        if i + 3 + size > len(data):
            raise ProxyProtocolError(f"{what} 0x{kind:02x} overruns the header")
        out.append((kind, bytes(data[i + 3 : i + 3 + size])))
        i += 3 + size
    return out


def _parse_ssl(value: bytes) -> SSLInfo:
    if len(value) < 5:
        raise ProxyProtocolError("PP2_TYPE_SSL value is shorter than 5 bytes")
    (verify,) = struct.unpack_from("!I", value, 1)
    return SSLInfo(value[0], verify, tuple(_parse_tlvs(value[5:], "SSL sub-TLV")))


def _not_v2(data: bytes) -> str:
    if data.startswith(b"PROXY "):
        return "PROXY protocol v1 is refused (only v2 is accepted)"
    return "not a PROXY protocol v2 header"
