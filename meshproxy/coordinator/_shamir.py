"""Shamir secret sharing over GF(2^8), in HashiCorp's layout (what MarbleRun vendors).

Theory of operation: every byte of the secret is the constant term of its own random
polynomial of degree ``threshold - 1`` over GF(2^8) with the AES reduction polynomial
x^8 + x^4 + x^3 + x + 1 (0x11b). Share i holds the polynomials' values at one x-coordinate
(distinct, non-zero, random), followed by that x as the last byte, so a 32-byte secret gives
33-byte shares. Any ``threshold`` shares interpolate (Lagrange, at x = 0) to the secret;
fewer give a value independent of it.

The field arithmetic uses log/exp tables over the generator 3; the tests check every product
against the bitwise multiplication HashiCorp uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from meshproxy.errors import PolicyError

_EXP = [0] * 510
_LOG = [0] * 256


def _init_tables() -> None:
    x = 1
    for i in range(255):
        _EXP[i] = x
        _LOG[x] = i
        # multiply by the generator 3: x*2 (reduced) xor x
        doubled = (x << 1) ^ (0x11B if x & 0x80 else 0)
        x = doubled ^ x
    for i in range(255, 510):
        _EXP[i] = _EXP[i - 255]


_init_tables()


def mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(256)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] - _LOG[b]) % 255]


def split(
    secret: bytes,
    parts: int,
    threshold: int,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> list[bytes]:
    """``parts`` shares of ``secret``; any ``threshold`` of them recover it."""
    if not secret:
        raise ValueError("cannot split an empty secret")
    if not 2 <= threshold <= parts <= 255:
        raise ValueError(f"need 2 <= threshold ({threshold}) <= parts ({parts}) <= 255")
    xs = _distinct_xs(parts, randbytes)
    shares = [bytearray() for _ in range(parts)]
    for byte in secret:
        coeffs = [byte, *randbytes(threshold - 1)]
        for share, x in zip(shares, xs, strict=True):
            share.append(_evaluate(coeffs, x))
    for share, x in zip(shares, xs, strict=True):
        share.append(x)
    return [bytes(s) for s in shares]


def combine(shares: Sequence[bytes]) -> bytes:
    """The secret interpolated from ``shares`` (all of them; give exactly enough)."""
    if len(shares) < 2:
        raise PolicyError("at least two shares are needed")
    length = len(shares[0])
    if length < 2 or any(len(s) != length for s in shares):
        raise PolicyError("shares differ in length: they are not from one split")
    xs = [s[-1] for s in shares]
    if 0 in xs or len(set(xs)) != len(xs):
        raise PolicyError("shares repeat an x-coordinate: the same share was given twice")
    secret = bytearray()
    for i in range(length - 1):
        secret.append(_interpolate_at_zero(xs, [s[i] for s in shares]))
    return bytes(secret)


def _distinct_xs(parts: int, randbytes: Callable[[int], bytes]) -> list[int]:
    xs: list[int] = []
    while len(xs) < parts:
        for candidate in randbytes(parts):
            if candidate != 0 and candidate not in xs and len(xs) < parts:
                xs.append(candidate)
    return xs


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    # Horner's rule, highest coefficient first.
    out = 0
    for c in reversed(coeffs):
        out = mul(out, x) ^ c
    return out


def _interpolate_at_zero(xs: Sequence[int], ys: Sequence[int]) -> int:
    result = 0
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        basis = 1
        for j, xj in enumerate(xs):
            if i != j:
                # l_i(0) = prod_j x_j / (x_j - x_i); subtraction is xor in GF(2^8)
                basis = mul(basis, div(xj, xj ^ xi))
        result ^= mul(yi, basis)
    return result
