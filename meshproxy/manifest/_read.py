"""Small readers shared by the manifest section parsers, with Go's null semantics.

MarbleRun decodes the manifest with Go's encoding/json, where ``null`` and an absent key
both mean the zero value. These helpers keep that rule in one place; everything else
(types, ranges, unknown keys) is as strict as ``Node``.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

from meshproxy.config import Node

U64_MAX = 2**64 - 1
_HEX = re.compile(r"[0-9a-fA-F]*")
_T = TypeVar("_T")


def present(fields: Mapping[str, Node], key: str) -> Node | None:
    """The child ``key`` unless it is absent or null."""
    node = fields.get(key)
    return None if node is None or node.value is None else node


def opt_bool(fields: Mapping[str, Node], key: str) -> bool:
    node = present(fields, key)
    return False if node is None else node.bool()


def opt_uint(fields: Mapping[str, Node], key: str, maximum: int = U64_MAX) -> int | None:
    node = present(fields, key)
    return None if node is None else node.int(minimum=0, maximum=maximum)


def opt_str(fields: Mapping[str, Node], key: str) -> str:
    node = present(fields, key)
    return "" if node is None else node.str(allow_empty=True)


def names(node: Node | None) -> tuple[str, ...]:
    """A list of non-empty strings (null or absent: empty)."""
    return () if node is None else node.str_list()


def suggest(value: str, options: Iterable[str]) -> str:
    hint = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def utf8(text: str) -> bytes:
    """UTF-8 bytes of a decoded JSON string; lone surrogates become U+FFFD, as in Go."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
        return fixed.encode("utf-8")


def decode_base64(node: Node, text: str) -> bytes:
    # Go's base64.StdEncoding skips CR and LF but is otherwise strict (padding required).
    cleaned = text.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(cleaned.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        node.fail("invalid base64 (standard alphabet, with padding)")


def decode_hex(node: Node, text: str) -> bytes:
    if len(text) % 2 or not _HEX.fullmatch(text):
        node.fail("invalid hex (an even number of the digits 0-9, a-f)")
    return bytes.fromhex(text)


def frozen(items: Mapping[str, _T]) -> Mapping[str, _T]:
    return MappingProxyType(dict(items))


def reject_nul(node: Node, text: str, what: str) -> None:
    if "\x00" in text:
        node.fail(f"{what} must not contain a NUL byte")
