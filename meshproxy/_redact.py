"""Secret bytes that never show themselves in a repr, str, log line or error."""

from __future__ import annotations

import hashlib


class Secret:
    """Opaque holder for key material and secret values.

    ``repr``/``str``/``format`` print a redaction marker with a short, non-reversible
    fingerprint so two secrets can be told apart in a log without leaking either.
    The bytes are reachable only through ``reveal()``, which makes every use greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray):
            raise TypeError("Secret holds bytes")
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        import hmac

        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        tag = hashlib.sha256(b"meshproxy-redact" + self._value).hexdigest()[:8]
        return f"<redacted {len(self._value)} bytes #{tag}>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret is not picklable")
