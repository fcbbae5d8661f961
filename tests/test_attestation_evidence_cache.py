"""The evidence cache skips signature checks already made, never a check of time, anchor or
the quote's own signature: cached and uncached verification agree on every outcome."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_attestation_verify import HW_NOW, SGX_VECTORS, vector

from meshproxy.attestation import (
    EnclaveIdentity,
    EvidenceCache,
    SimulationPlatform,
    intel_anchor,
    simulation_anchor,
    verify_quote,
)
from meshproxy.errors import AttestationError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
IDENTITY = EnclaveIdentity(
    unique_id=bytes(range(32)),
    signer_id=bytes(32),
    product_id=1,
    security_version=1,
    debug=False,
)


def test_cached_verification_agrees_and_still_checks_time_and_anchor(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    anchors = [intel_anchor(), simulation_anchor(platform)]
    cache = EvidenceCache()
    first = platform.quote(b"a" * 32, IDENTITY)
    second = platform.quote(b"b" * 32, IDENTITY)
    assert verify_quote(first, anchors, now=NOW, cache=cache) == verify_quote(
        first, anchors, now=NOW
    )
    assert verify_quote(second, anchors, now=NOW, cache=cache).report_data[:32] == b"b" * 32
    # The chain is in the cache, but not valid 20 years later.
    with pytest.raises(AttestationError, match="pck-chain"):
        verify_quote(second, anchors, now=NOW + timedelta(days=20 * 365), cache=cache)
    # Nor is the simulation anchor trusted once it is not given.
    with pytest.raises(AttestationError, match="vendor"):
        verify_quote(second, [intel_anchor()], now=NOW, cache=cache)
    other = SimulationPlatform.load_or_create(tmp_path / "other", now=NOW)
    with pytest.raises(AttestationError, match="pck-chain"):
        verify_quote(second, [simulation_anchor(other)], now=NOW, cache=cache)


def test_a_forged_quote_signature_fails_with_a_warm_cache(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    anchors = [simulation_anchor(platform)]
    cache = EvidenceCache()
    quote = platform.quote(b"a" * 32, IDENTITY)
    verify_quote(quote, anchors, now=NOW, cache=cache)
    forged = bytearray(quote)
    forged[48 + 320] ^= 1  # the report data, inside the signed region
    with pytest.raises(AttestationError, match="quote-signature"):
        verify_quote(bytes(forged), anchors, now=NOW, cache=cache)


@pytest.mark.parametrize("name", SGX_VECTORS)
def test_hardware_quotes_verify_the_same_with_the_cache(name: str) -> None:
    cache = EvidenceCache(size=2)
    quote = vector(name)
    try:
        expected = verify_quote(quote, [intel_anchor()], now=HW_NOW)
    except AttestationError as exc:
        with pytest.raises(AttestationError, match=exc.check):
            verify_quote(quote, [intel_anchor()], now=HW_NOW, cache=cache)
        return
    for _ in range(2):  # cold, then warm
        assert verify_quote(quote, [intel_anchor()], now=HW_NOW, cache=cache) == expected


def test_a_forged_qe_report_signature_fails_with_a_warm_cache(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    anchors = [simulation_anchor(platform)]
    cache = EvidenceCache()
    verify_quote(platform.quote(b"a" * 32, IDENTITY), anchors, now=NOW, cache=cache)
    quote = bytearray(platform.quote(b"b" * 32, IDENTITY))  # the same QE report as before
    qe_report_signature = 48 + 384 + 4 + 64 + 64 + 384  # header, body, length, sig, key, report
    quote[qe_report_signature] ^= 1
    with pytest.raises(AttestationError, match="qe-report-signature"):
        verify_quote(bytes(quote), anchors, now=NOW, cache=cache)
