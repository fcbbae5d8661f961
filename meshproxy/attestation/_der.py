"""Just enough DER to walk what ``cryptography`` hands back raw: Intel's PCK extension and
certificates it refuses to parse (Gramine's RA-TLS certificates encode the ECDSA
signature algorithm with a NULL parameter, which cryptography 50 rejects outright).

Definite lengths only, each length minimal, nothing read past its enclosing element; any
violation is a ``DerError`` (a ``ValueError``) that callers turn into their own check.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
ENUMERATED = 0x0A
_MAX_LENGTH_BYTES = 4  # lengths beyond 2**32 never occur in what we read


class DerError(ValueError):
    """Malformed DER (the message says what and at which offset)."""


@dataclass(frozen=True)
class Tlv:
    tag: int
    start: int  # offset of the tag byte
    content: int  # offset of the first content byte
    end: int  # offset just past the element
    data: bytes

    @property
    def value(self) -> bytes:
        return self.data[self.content : self.end]

    @property
    def raw(self) -> bytes:
        return self.data[self.start : self.end]

    def children(self) -> list[Tlv]:
        """The elements of a constructed value, in order; they must fill it exactly."""
        if not self.tag & 0x20:
            raise DerError(f"element at offset {self.start} (tag 0x{self.tag:02x}) is primitive")
        out: list[Tlv] = []
        pos = self.content
        while pos < self.end:
            child = read(self.data, pos, self.end)
            out.append(child)
            pos = child.end
        return out


def read(data: bytes, pos: int = 0, end: int | None = None) -> Tlv:
    """The element starting at ``pos``; it must end at or before ``end``."""
    limit = len(data) if end is None else end
    if pos + 2 > limit:
        raise DerError(f"truncated element at offset {pos}")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tag at offset {pos} is not supported")
    first = data[pos + 1]
    content = pos + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_BYTES:
            raise DerError(f"unsupported length encoding at offset {pos + 1}")
        if content + count > limit:
            raise DerError(f"truncated length at offset {pos + 1}")
        length = int.from_bytes(data[content : content + count], "big")
        if length < 0x80 or data[content] == 0:
            raise DerError(f"non-minimal length at offset {pos + 1}")
        content += count
    if content + length > limit:
        raise DerError(f"element at offset {pos} runs past its container")
    return Tlv(tag, pos, content, content + length, data)


def read_all(data: bytes) -> Tlv:
    """Exactly one element filling ``data``."""
    tlv = read(data)
    if tlv.end != len(data):
        raise DerError(f"{len(data) - tlv.end} bytes after the element")
    return tlv


def expect(tlv: Tlv, tag: int, what: str) -> Tlv:
    if tlv.tag != tag:
        raise DerError(f"{what} at offset {tlv.start}: tag 0x{tlv.tag:02x}, expected 0x{tag:02x}")
    return tlv


def integer(tlv: Tlv, what: str) -> int:
    if tlv.tag not in (INTEGER, ENUMERATED):
        raise DerError(f"{what} at offset {tlv.start}: tag 0x{tlv.tag:02x} is not an integer")
    body = tlv.value
    if not body:
        raise DerError(f"{what} at offset {tlv.start} is empty")
    return int.from_bytes(body, "big", signed=True)


def oid_text(content: bytes) -> str:
    """Dotted text of OID content bytes (also of bytes that are not a valid OID's, such
    as Gramine's legacy extension id, whose content includes a tag and length)."""
    if not content or content[-1] & 0x80:
        raise DerError("truncated object identifier")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])
