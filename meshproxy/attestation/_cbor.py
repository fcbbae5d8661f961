"""The CBOR subset RA-TLS evidence uses (RFC 8949): unsigned and negative integers, byte
and text strings, arrays, maps and tags. Encoding is deterministic (shortest heads, map
keys sorted by their encoded bytes: RFC 8949 section 4.2.1), so a hash over encoded
claims is reproducible. Decoding accepts definite lengths only, caps nesting, sizes and
counts, and raises ``CborError`` (a ``ValueError``) for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_DEPTH = 16
_MAX_ITEMS = 1 << 16


class CborError(ValueError):
    """Malformed or unsupported CBOR; the message gives the offset."""


@dataclass(frozen=True)
class Tag:
    number: int
    value: object


def encode(value: object) -> bytes:
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def _head(major: int, n: int, out: bytearray) -> None:
    if n < 0 or n >= 1 << 64:
        raise ValueError(f"CBOR argument {n} out of range")
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes((major << 5 | 24, n))
    elif n < 1 << 16:
        out.append(major << 5 | 25)
        out += n.to_bytes(2, "big")
    elif n < 1 << 32:
        out.append(major << 5 | 26)
        out += n.to_bytes(4, "big")
    else:
        out.append(major << 5 | 27)
        out += n.to_bytes(8, "big")


def _encode(value: object, out: bytearray) -> None:
    if isinstance(value, bool) or value is None:
        raise TypeError("booleans and null are not in meshproxy's CBOR subset")
    if isinstance(value, int):
        if value >= 0:
            _head(0, value, out)
        else:
            _head(1, -1 - value, out)
    elif isinstance(value, bytes | bytearray):
        _head(2, len(value), out)
        out += value
    elif isinstance(value, str):
        data = value.encode()
        _head(3, len(data), out)
        out += data
    elif isinstance(value, list | tuple):
        _head(4, len(value), out)
        for item in value:
            _encode(item, out)
    elif isinstance(value, dict):
        _head(5, len(value), out)
        for key, item in sorted((encode(k), v) for k, v in value.items()):
            out += key
            _encode(item, out)
    elif isinstance(value, Tag):
        _head(6, value.number, out)
        _encode(value.value, out)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as CBOR")


def decode(data: bytes) -> object:
    """Exactly one data item filling ``data``."""
    value, end = _decode(bytes(data), 0, 0)
    if end != len(data):
        raise CborError(f"{len(data) - end} bytes after the CBOR item at offset {end}")
    return value


def _argument(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, offset after the head)."""
    if pos >= len(data):
        raise CborError(f"truncated CBOR at offset {pos}")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise CborError(
            f"indefinite length or reserved head 0x{initial:02x} at offset {pos} is not supported"
        )
    size = 1 << (info - 24)
    if pos + 1 + size > len(data):
        raise CborError(f"truncated CBOR head at offset {pos}")
    return major, int.from_bytes(data[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


def _decode(data: bytes, pos: int, depth: int) -> tuple[object, int]:
    if depth > _MAX_DEPTH:
        raise CborError(f"CBOR nested deeper than {_MAX_DEPTH} at offset {pos}")
    major, arg, pos = _argument(data, pos)
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major in (2, 3):
        if arg > len(data) - pos:
            raise CborError(f"string of {arg} bytes at offset {pos} runs past the data")
        raw = data[pos : pos + arg]
        if major == 2:
            return raw, pos + arg
        try:
            return raw.decode(), pos + arg
        except UnicodeDecodeError:
            raise CborError(f"text string at offset {pos} is not UTF-8") from None
    if major in (4, 5):
        if arg > _MAX_ITEMS or arg > len(data) - pos:
            raise CborError(f"{arg} items at offset {pos} cannot fit in the data")
        if major == 4:
            items: list[object] = []
            for _ in range(arg):
                item, pos = _decode(data, pos, depth + 1)
                items.append(item)
            return items, pos
        mapping: dict[object, object] = {}
        for _ in range(arg):
            at = pos
            key, pos = _decode(data, pos, depth + 1)
            if not isinstance(key, int | str | bytes):
                raise CborError(f"map key at offset {at} is not an integer or a string")
            if key in mapping:
                raise CborError(f"duplicate map key {key!r} at offset {at}")
            mapping[key], pos = _decode(data, pos, depth + 1)
        return mapping, pos
    if major == 6:
        value, pos = _decode(data, pos, depth + 1)
        return Tag(arg, value), pos
    raise CborError(f"CBOR simple values and floats (at offset {pos - 1}) are not supported")
