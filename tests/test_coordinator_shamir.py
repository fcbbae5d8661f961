"""Shamir secret sharing over GF(256): the field, splitting, combining, and refusals."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.coordinator import _shamir
from meshproxy.errors import PolicyError


def hashicorp_mult(a: int, b: int) -> int:
    """HashiCorp's constant-time GF(2^8) multiplication (reduction 0x1B), transcribed."""
    r = 0
    for i in range(7, -1, -1):
        bit = (b >> i) & 1
        r = ((-bit & a) ^ (-(r >> 7) & 0x1B) ^ (r + r)) & 0xFF
    return r


def test_table_multiplication_equals_hashicorps_for_every_pair() -> None:
    for a in range(256):
        for b in range(256):
            assert _shamir.mul(a, b) == hashicorp_mult(a, b), (a, b)


def test_every_nonzero_element_has_an_inverse() -> None:
    for a in range(1, 256):
        assert _shamir.mul(a, _shamir.div(1, a)) == 1
    with pytest.raises(ZeroDivisionError):
        _shamir.div(1, 0)


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=40),
    parts=st.integers(min_value=2, max_value=7),
    data=st.data(),
)
def test_any_threshold_subset_recovers_the_secret(
    secret: bytes, parts: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(min_value=2, max_value=parts))
    shares = _shamir.split(secret, parts, threshold)
    assert len(shares) == parts
    assert all(len(s) == len(secret) + 1 for s in shares)
    assert len({s[-1] for s in shares}) == parts
    assert all(s[-1] for s in shares)
    subset = data.draw(st.permutations(shares))[:threshold]
    assert _shamir.combine(subset) == secret
    # All shares together recover it too (more points on the same polynomial).
    assert _shamir.combine(shares) == secret


def test_every_subset_of_the_threshold_works_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = _shamir.split(secret, 5, 3)
    for subset in itertools.combinations(shares, 3):
        assert _shamir.combine(list(subset)) == secret
    for subset in itertools.combinations(shares, 2):
        # With fewer than the threshold the interpolation is unrelated to the secret.
        assert _shamir.combine(list(subset)) != secret


def test_fixed_randomness_gives_a_known_answer() -> None:
    # Pins the layout: y-bytes then x; polynomial 0x42 + 0x01*x with x = 1, 2, 3.
    stream = iter([bytes([1, 2, 3]), bytes([1])])
    shares = _shamir.split(b"\x42", 3, 2, randbytes=lambda n: next(stream)[:n])
    assert shares == [bytes([0x43, 1]), bytes([0x40, 2]), bytes([0x41, 3])]
    assert _shamir.combine(shares[1:]) == b"\x42"


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ([b"\x01\x02"], "at least two"),
        ([b"\x01\x02", b"\x01\x02\x03"], "differ in length"),
        ([b"\x01\x02", b"\x05\x02"], "twice"),
        ([b"\x01\x00", b"\x05\x02"], "twice"),
    ],
)
def test_malformed_share_sets_are_refused(shares: list[bytes], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        _shamir.combine(shares)


@pytest.mark.parametrize(("parts", "threshold"), [(1, 1), (3, 1), (2, 3), (256, 2)])
def test_split_refuses_impossible_parameters(parts: int, threshold: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        _shamir.split(b"x", parts, threshold)
