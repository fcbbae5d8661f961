"""Untrusted collateral, Intel JSON, CBOR, DER and RA-TLS evidence: garbage only ever
raises AttestationError (or the codec's ValueError subclass, for the private codecs)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.attestation import (
    _cbor,
    _der,
    _json,
    intel_anchor,
    parse_collateral,
    parse_ratls_extension,
    verify_quote,
    verify_ratls_certificate,
)
from meshproxy.errors import AttestationError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
COLLATERAL = (VECTORS / "dcapqvl_sgx_collateral.json").read_text()
QUOTE = (VECTORS / "dcapqvl_sgx_quote.bin").read_bytes()
GRAMINE = (VECTORS / "gramine-cert.pem").read_bytes()
AT = datetime.fromtimestamp(1750400000, UTC)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _refused(call: object, *args: object) -> str | None:
    assert callable(call)
    try:
        call(*args)
    except AttestationError as exc:
        return exc.check
    return None


@FUZZ
@given(st.binary(max_size=512) | st.text(max_size=512).map(str.encode))
def test_collateral_garbage_is_a_format_error(data: bytes) -> None:
    assert _refused(parse_collateral, data) == "collateral-format"


@FUZZ
@given(key=st.sampled_from(sorted(json.loads(COLLATERAL))), value=json_values)
def test_collateral_with_one_field_replaced_is_refused_cleanly(key: str, value: object) -> None:
    doc = json.loads(COLLATERAL)
    doc[key] = value
    check = _refused(parse_collateral, json.dumps(doc))
    if check is not None:
        assert check == "collateral-format"
        return
    c = parse_collateral(json.dumps(doc))
    check = _refused(lambda: verify_quote(QUOTE, [intel_anchor()], now=AT, collateral=c))
    assert check is None or check.startswith(("collateral", "revoked", "tcb", "qe-identity"))


@FUZZ
@given(value=json_values, which=st.sampled_from(["tcb", "qe"]))
def test_signed_json_parsers_only_raise_format_errors(value: object, which: str) -> None:
    parse = _json.parse_tcb_info if which == "tcb" else _json.parse_qe_identity
    assert _refused(parse, json.dumps(value).encode()) == "collateral-format"


@FUZZ
@given(st.data())
def test_mutated_tcb_info_json_never_escapes(data: st.DataObject) -> None:
    text = bytearray(json.loads(COLLATERAL)["tcb_info"].encode())
    for _ in range(data.draw(st.integers(1, 3))):
        text[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.integers(32, 126))
    assert _refused(_json.parse_tcb_info, bytes(text)) in (None, "collateral-format")


@FUZZ
@given(st.binary(max_size=256))
def test_cbor_and_der_garbage_raise_their_value_errors(data: bytes) -> None:
    for decode in (_cbor.decode, _der.read_all):
        with contextlib.suppress(ValueError):
            decode(data)


@FUZZ
@given(st.binary(max_size=512))
def test_ratls_extension_garbage_is_a_format_error(data: bytes) -> None:
    assert _refused(parse_ratls_extension, data) == "ratls-format"


@FUZZ
@given(
    st.recursive(
        st.integers(-(2**70), 2**70) | st.binary(max_size=16) | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=6), inner, max_size=3)
            | st.builds(_cbor.Tag, st.sampled_from([60000, 0x6D657368, 24]), inner)
        ),
        max_leaves=8,
    )
)
def test_well_formed_cbor_of_the_wrong_shape_is_a_format_error(value: object) -> None:
    try:
        encoded = _cbor.encode(value)
    except ValueError:  # integers beyond 64 bits
        return
    assert _cbor.decode(encoded) == (list(value) if isinstance(value, tuple) else value)
    assert _refused(parse_ratls_extension, encoded) == "ratls-format"


@FUZZ
@given(pos=st.integers(0, len(GRAMINE) - 1), byte=st.integers(0, 255))
def test_mutated_ratls_certificate_is_refused_or_unchanged(pos: int, byte: int) -> None:
    mutated = bytearray(GRAMINE)
    mutated[pos] = byte
    now = datetime(2024, 6, 1, tzinfo=UTC)
    check = _refused(lambda: verify_ratls_certificate(bytes(mutated), [intel_anchor()], now=now))
    assert check is None or check.startswith(("ratls", "pck", "qe", "quote", "format", "att"))
