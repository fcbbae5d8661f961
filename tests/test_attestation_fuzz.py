"""Untrusted quote bytes: the parser and verifier only ever raise AttestationError."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.attestation import (
    EnclaveIdentity,
    ReportBody,
    SimulationPlatform,
    TrustAnchor,
    intel_anchor,
    parse_quote,
    simulation_anchor,
    verify_quote,
)
from meshproxy.errors import AttestationError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HW_NOW = datetime(2024, 6, 1, tzinfo=UTC)
HW_QUOTE = (
    Path(__file__).parent / "vectors" / "attestation" / "dcapqvl_sgx_quote.bin"
).read_bytes()
IDENTITY = EnclaveIdentity(bytes(range(32)), bytes(range(32, 64)), 1, 1, False)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[TrustAnchor]]:
    platform = SimulationPlatform.load_or_create(tmp_path_factory.mktemp("sim") / "p", now=NOW)
    return platform.quote(b"fuzz", IDENTITY), [simulation_anchor(platform), intel_anchor()]


CHECKS = {
    "format",
    "vendor",
    "pck-chain",
    "qe-report-signature",
    "qe-identity",
    "attestation-key-binding",
    "quote-signature",
}


def refusal(data: bytes, anchors: list[TrustAnchor], now: datetime) -> str | None:
    """The failing check's name, or None if the quote verified."""
    try:
        verify_quote(data, anchors, now=now)
    except AttestationError as exc:
        return exc.check
    return None


def parse_refusal(data: bytes) -> str | None:
    try:
        parse_quote(data)
    except AttestationError as exc:
        return exc.check
    return None


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_another_exception(data: bytes) -> None:
    assert parse_refusal(data) == "format"
    assert refusal(data, [intel_anchor()], NOW) == "format"


@FUZZ
@given(length=st.integers(min_value=0, max_value=len(HW_QUOTE) - 1))
def test_every_truncation_is_a_format_error(length: int) -> None:
    with pytest.raises(AttestationError) as info:
        parse_quote(HW_QUOTE[:length])
    assert info.value.check == "format"


@FUZZ
@given(data=st.data())
def test_mutated_simulated_quote_is_refused_or_unchanged(
    sim: tuple[bytes, list[TrustAnchor]], data: st.DataObject
) -> None:
    quote, anchors = sim
    original = verify_quote(quote, anchors, now=NOW)
    mutated = bytearray(quote)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(mutated)))
        mutated[cut:cut] = data.draw(st.binary(min_size=1, max_size=8))
    if refusal(bytes(mutated), anchors, NOW) is None:
        # Only bytes nobody relies on (PEM line breaks, say) may change without failing.
        assert verify_quote(bytes(mutated), anchors, now=NOW) == original


@FUZZ
@given(pos=st.integers(0, 431), bit=st.integers(0, 7))
def test_any_signed_bit_of_a_hardware_quote_matters(pos: int, bit: int) -> None:
    mutated = bytearray(HW_QUOTE)
    mutated[pos] ^= 1 << bit
    assert refusal(bytes(mutated), [intel_anchor()], HW_NOW) in CHECKS


@FUZZ
@given(
    st.builds(
        ReportBody,
        cpu_svn=st.binary(min_size=16, max_size=16),
        misc_select=st.integers(0, 2**32 - 1),
        attributes=st.binary(min_size=16, max_size=16),
        mr_enclave=st.binary(min_size=32, max_size=32),
        mr_signer=st.binary(min_size=32, max_size=32),
        isv_prod_id=st.integers(0, 0xFFFF),
        isv_svn=st.integers(0, 0xFFFF),
        report_data=st.binary(min_size=64, max_size=64),
        isv_ext_prod_id=st.binary(min_size=16, max_size=16),
        config_id=st.binary(min_size=64, max_size=64),
        config_svn=st.integers(0, 0xFFFF),
        isv_family_id=st.binary(min_size=16, max_size=16),
    )
)
def test_report_body_round_trips(body: ReportBody) -> None:
    assert ReportBody.parse(body.to_bytes()) == body
