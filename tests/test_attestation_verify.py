"""The one quote verifier (hardware and simulation), package policy, ``meshproxy quote``."""

from __future__ import annotations

import base64
import dataclasses
import struct
import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

import meshproxy.cli
from meshproxy.attestation import (
    INTEL_QE_VENDOR_ID,
    EnclaveIdentity,
    PackagePolicy,
    SimulationPlatform,
    TrustAnchor,
    VerifiedQuote,
    check_package,
    intel_anchor,
    simulation_anchor,
    verify_quote,
)
from meshproxy.cli import enclave as enclave_cli
from meshproxy.errors import AttestationError, PolicyError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
SGX_VECTORS = [
    "dcapqvl_sgx_quote.bin",
    "oe_sgx_quote.bin",
    "mc_hw_quote.dat",
    "cosmian_quote.dat",
    "azure_release_quote.bin",
]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
HW_NOW = datetime(2024, 6, 1, tzinfo=UTC)  # inside every vector's PCK chain validity
IDENTITY = EnclaveIdentity(
    unique_id=bytes.fromhex("3f2a" * 16),
    signer_id=bytes.fromhex("5e11" * 16),
    product_id=3,
    security_version=2,
    debug=False,
)


def vector(name: str) -> bytes:
    data = (VECTORS / name).read_bytes()
    if len(data) >= 16:  # an Open Enclave header: version 1, type 2 (SGX remote), u64 size
        version, kind, size = struct.unpack_from("<IIQ", data)
        if version == 1 and kind == 2 and size == len(data) - 16:
            return data[16:]
    return data


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


@pytest.fixture
def platform(tmp_path: Path) -> SimulationPlatform:
    return SimulationPlatform.load_or_create(tmp_path / "platform", now=NOW)


@pytest.fixture
def sim_quote(platform: SimulationPlatform) -> bytes:
    return platform.quote(b"binding", IDENTITY)


def check_of(quote: bytes, anchors: list[TrustAnchor], now: datetime = NOW) -> str:
    with pytest.raises(AttestationError) as info:
        verify_quote(quote, anchors, now=now)
    assert str(info.value).startswith(info.value.check + ": ")
    return info.value.check


# -- simulation ------------------------------------------------------------------------
def test_simulated_quote_verifies_with_the_simulation_anchor(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    v = verify_quote(sim_quote, [simulation_anchor(platform)], now=NOW)
    assert v == VerifiedQuote(
        identity=IDENTITY,
        report_data=b"binding" + bytes(57),
        simulated=True,
        anchor="simulation",
        tcb_status="Simulated",
    )


def test_simulated_quote_verifies_when_both_anchors_are_trusted(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    v = verify_quote(sim_quote, [intel_anchor(), simulation_anchor(platform)], now=NOW)
    assert (v.simulated, v.anchor) == (True, "simulation")


def test_simulated_quote_is_refused_by_an_intel_only_verifier(sim_quote: bytes) -> None:
    with pytest.raises(AttestationError, match=r"simulated quote.*simulation is not accepted") as e:
        verify_quote(sim_quote, [intel_anchor()], now=NOW)
    assert e.value.check == "vendor"


def test_no_anchor_at_all_is_refused(sim_quote: bytes) -> None:
    assert check_of(sim_quote, []) == "vendor"


@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (8, "header qe_svn"),
        (28, "header user data"),
        (112, "MRENCLAVE"),
        (306, "ISVSVN"),
        (96, "debug flags"),
        (368, "report data"),
        (431, "last signed byte"),
    ],
)
def test_flipped_signed_byte_fails_the_quote_signature(
    platform: SimulationPlatform, sim_quote: bytes, offset: int, what: str
) -> None:
    assert check_of(flip(sim_quote, offset), [simulation_anchor(platform)]) == "quote-signature"


def test_flipped_quote_signature_fails_the_quote_signature(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    assert check_of(flip(sim_quote, 440), [simulation_anchor(platform)]) == "quote-signature"


@pytest.mark.parametrize("offset", [564, 564 + 64, 564 + 320, 947, 960])
def test_flipped_qe_report_or_its_signature_fails_the_qe_report_signature(
    platform: SimulationPlatform, sim_quote: bytes, offset: int
) -> None:
    check = check_of(flip(sim_quote, offset), [simulation_anchor(platform)])
    assert check == "qe-report-signature"


def test_replaced_attestation_key_fails_the_binding(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    check = check_of(flip(sim_quote, 520), [simulation_anchor(platform)])
    assert check == "attestation-key-binding"


def test_flipped_qe_auth_data_fails_the_binding(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    check = check_of(flip(sim_quote, 1014), [simulation_anchor(platform)])
    assert check == "attestation-key-binding"


def test_flipped_byte_in_the_pck_chain_fails_the_chain(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    start = sim_quote.index(b"-----BEGIN CERTIFICATE-----") + 28
    for offset in range(start + 200, start + 400, 37):  # inside the PCK cert's base64
        data = bytearray(sim_quote)
        data[offset] = ord("A") if data[offset] != ord("A") else ord("B")
        assert check_of(bytes(data), [simulation_anchor(platform)]) == "pck-chain"


def test_pck_with_a_negative_serial_fails_the_chain(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    der = bytearray(platform.pck_certificate.public_bytes(serialization.Encoding.DER))
    serial = der.index(b"\xa0\x03\x02\x01\x02") + 5  # after the version: INTEGER serial
    der[serial + 2] |= 0x80
    bad = x509_pem(bytes(der))
    good = platform.pck_certificate.public_bytes(serialization.Encoding.PEM)
    assert len(bad) == len(good)
    quote = sim_quote.replace(good, bad)
    assert check_of(quote, [simulation_anchor(platform)]) == "pck-chain"


def x509_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def test_quote_from_another_platform_fails_the_chain(
    platform: SimulationPlatform, tmp_path: Path
) -> None:
    other = SimulationPlatform.load_or_create(tmp_path / "other", now=NOW)
    quote = other.quote(b"", IDENTITY)
    with pytest.raises(AttestationError, match="not the 'simulation' trust anchor") as info:
        verify_quote(quote, [simulation_anchor(platform)], now=NOW)
    assert info.value.check == "pck-chain"
    # Trusting both platforms finds the right one.
    both = [simulation_anchor(platform), simulation_anchor(other)]
    assert verify_quote(quote, both, now=NOW).identity == IDENTITY


def test_chain_outside_its_validity_fails(platform: SimulationPlatform, sim_quote: bytes) -> None:
    anchors = [simulation_anchor(platform)]
    with pytest.raises(AttestationError, match="not valid at") as info:
        verify_quote(sim_quote, anchors, now=NOW + timedelta(days=3651))
    assert info.value.check == "pck-chain"
    assert check_of(sim_quote, anchors, NOW - timedelta(days=1)) == "pck-chain"


def test_naive_time_is_a_programming_error(platform: SimulationPlatform, sim_quote: bytes) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_quote(sim_quote, [simulation_anchor(platform)], now=datetime(2026, 1, 1))


def test_garbage_is_a_format_error(platform: SimulationPlatform) -> None:
    assert check_of(b"\x03\x00garbage", [simulation_anchor(platform)]) == "format"


# -- hardware vectors ------------------------------------------------------------------
@pytest.mark.parametrize("name", SGX_VECTORS)
def test_hardware_quote_verifies_to_the_intel_root(name: str) -> None:
    v = verify_quote(vector(name), [intel_anchor()], now=HW_NOW)
    assert (v.anchor, v.simulated, v.tcb_status) == ("intel", False, "NotEvaluated")
    assert len(v.report_data) == 64


def test_azure_hardware_quote_identity_matches_the_published_values() -> None:
    v = verify_quote(vector("azure_release_quote.bin"), [intel_anchor()], now=HW_NOW)
    assert v.identity.unique_id.hex().upper().startswith("D37D983A85D63FB4")
    assert v.identity.signer_id.hex().upper().startswith("FEB995EB86C349AC")
    assert (v.identity.product_id, v.identity.security_version, v.identity.debug) == (1, 1, False)


@pytest.mark.parametrize("name", SGX_VECTORS)
def test_hardware_quote_fails_with_only_the_simulation_anchor(
    name: str, platform: SimulationPlatform
) -> None:
    with pytest.raises(AttestationError, match="hardware quote") as info:
        verify_quote(vector(name), [simulation_anchor(platform)], now=HW_NOW)
    assert info.value.check == "vendor"


@pytest.mark.parametrize("name", SGX_VECTORS)
def test_hardware_quote_tampering_is_detected(name: str) -> None:
    data, anchors = vector(name), [intel_anchor()]
    assert check_of(flip(data, 112), anchors, HW_NOW) == "quote-signature"
    assert check_of(flip(data, 600), anchors, HW_NOW) == "qe-report-signature"
    assert check_of(flip(data, 12), anchors, HW_NOW) == "vendor"


def test_hardware_quote_chain_to_another_root_fails(platform: SimulationPlatform) -> None:
    impostor = TrustAnchor("intel", platform.root_certificate, False, INTEL_QE_VENDOR_ID)
    assert check_of(vector("dcapqvl_sgx_quote.bin"), [impostor], HW_NOW) == "pck-chain"


def test_hardware_quote_with_an_expired_pck_fails() -> None:
    late = datetime(2031, 1, 1, tzinfo=UTC)
    assert check_of(vector("dcapqvl_sgx_quote.bin"), [intel_anchor()], late) == "pck-chain"


# -- package policy --------------------------------------------------------------------
def verified(hw: str | None = None, **changes: Any) -> VerifiedQuote:
    """A simulated VerifiedQuote of IDENTITY with ``changes``, or a hardware one (status hw)."""
    ident = dataclasses.replace(IDENTITY, **changes)
    if hw:
        return VerifiedQuote(ident, bytes(64), False, "intel", hw)
    return VerifiedQuote(ident, bytes(64), True, "simulation", "Simulated")


SIGNER_POLICY = PackagePolicy(
    unique_id=None, signer_id=IDENTITY.signer_id, product_id=3, security_version=2, debug=False
)


def test_matching_package_is_accepted() -> None:
    check_package(verified(), SIGNER_POLICY, allow_simulation=True)
    check_package(verified(security_version=9), SIGNER_POLICY, allow_simulation=True)
    by_id = PackagePolicy(IDENTITY.unique_id, None, None, None, False)
    check_package(verified(), by_id, allow_simulation=True)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"signer_id": bytes(32)}, "SignerID 0000.* does not match the package's 5e115e11"),
        ({"product_id": 4}, "ProductID 4, package requires 3"),
        ({"security_version": 1}, "SecurityVersion 1 is below the package's minimum 2"),
        ({"debug": True}, "debug enclave, but the package requires Debug false"),
    ],
)
def test_mismatching_enclave_is_refused_with_its_reason(
    changes: dict[str, Any], reason: str
) -> None:
    with pytest.raises(PolicyError, match=reason):
        check_package(verified(**changes), SIGNER_POLICY, allow_simulation=True)


def test_wrong_unique_id_is_refused() -> None:
    policy = PackagePolicy(bytes.fromhex("9c1b" * 16), None, None, None, False)
    with pytest.raises(PolicyError, match=r"UniqueID 3f2a.* does not match the package's 9c1b"):
        check_package(verified(), policy, allow_simulation=True)


def test_debug_must_equal_the_package_setting() -> None:
    policy = dataclasses.replace(SIGNER_POLICY, debug=True)
    with pytest.raises(PolicyError, match="non-debug enclave, but the package requires Debug true"):
        check_package(verified(), policy, allow_simulation=True)
    check_package(verified(debug=True), policy, allow_simulation=True)


def test_simulated_quote_needs_explicit_permission() -> None:
    with pytest.raises(PolicyError, match="simulated quote, but simulation is not accepted"):
        check_package(verified(), SIGNER_POLICY, allow_simulation=False)


def test_hardware_tcb_status_must_be_accepted() -> None:
    with pytest.raises(PolicyError, match="TCB status NotEvaluated is not accepted"):
        check_package(verified(hw="NotEvaluated"), SIGNER_POLICY, allow_simulation=False)
    check_package(verified(hw="UpToDate"), SIGNER_POLICY, allow_simulation=False)
    lenient = dataclasses.replace(SIGNER_POLICY, accepted_tcb_statuses=("NotEvaluated",))
    check_package(verified(hw="NotEvaluated"), lenient, allow_simulation=False)


def test_package_that_pins_nothing_is_refused() -> None:
    loose = PackagePolicy(None, IDENTITY.signer_id, None, None, False)
    with pytest.raises(PolicyError, match="pins neither"):
        check_package(verified(), loose, allow_simulation=True)


def test_verified_simulated_quote_against_a_package(
    platform: SimulationPlatform, sim_quote: bytes
) -> None:
    v = verify_quote(sim_quote, [simulation_anchor(platform)], now=NOW)
    check_package(v, SIGNER_POLICY, allow_simulation=True)
    with pytest.raises(PolicyError, match="simulation is not accepted"):
        check_package(v, SIGNER_POLICY, allow_simulation=False)


# -- meshproxy quote verify ------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this group's commands; other groups are other engineers' work in progress."""
    quote_group = types.ModuleType("_test_quote_group")
    quote_group.register = enclave_cli.register_quote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_test_quote_group", quote_group)
    monkeypatch.setattr(meshproxy.cli, "_GROUPS", ("meshproxy.cli.enclave", "_test_quote_group"))


@pytest.mark.usefixtures("cli")
def test_cli_verifies_a_simulated_quote(
    platform: SimulationPlatform,
    sim_quote: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "quote.bin"
    path.write_bytes(sim_quote)
    argv = [
        "quote",
        "verify",
        str(path),
        "--trust",
        "simulation",
        "--platform",
        str(platform.directory),
    ]
    assert meshproxy.cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "SIMULATED" in out
    assert f"UniqueID: {IDENTITY.unique_id.hex()}" in out
    assert f"SignerID: {IDENTITY.signer_id.hex()}" in out
    assert "ProductID: 3\nSecurityVersion: 2\nDebug: false\n" in out
    assert f"ReportData: {(b'binding' + bytes(57)).hex()}" in out
    assert "TCBStatus: Simulated" in out


@pytest.mark.usefixtures("cli")
def test_cli_refuses_a_simulated_quote_by_default(
    sim_quote: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "quote.bin"
    path.write_bytes(sim_quote)
    assert meshproxy.cli.main(["quote", "verify", str(path)]) != 0
    err = capsys.readouterr().err
    assert "vendor: this is a simulated quote" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("cli")
def test_cli_names_the_failing_check(
    platform: SimulationPlatform,
    sim_quote: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "quote.bin"
    path.write_bytes(flip(sim_quote, 112))
    argv = [
        "quote",
        "verify",
        str(path),
        "--trust",
        "simulation",
        "--platform",
        str(platform.directory),
    ]
    assert meshproxy.cli.main(argv) == 1
    assert "quote-signature" in capsys.readouterr().err


@pytest.mark.usefixtures("cli")
def test_cli_verifies_a_hardware_quote_given_as_hex(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "quote.hex"
    path.write_text(vector("azure_release_quote.bin").hex() + "\n")
    assert meshproxy.cli.main(["quote", "verify", str(path), "--at", "2024-06-01T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "Verified against the intel trust anchor\n" in out
    assert "TCBStatus: NotEvaluated" in out
    assert meshproxy.cli.main(["quote", "verify", str(path), "--at", "2031-01-01"]) == 1
    assert "pck-chain" in capsys.readouterr().err


@pytest.mark.usefixtures("cli")
def test_cli_reports_a_missing_platform_and_a_bad_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "q"
    path.write_bytes(b"\x03")
    argv = [
        "quote",
        "verify",
        str(path),
        "--trust",
        "simulation",
        "--platform",
        str(tmp_path / "x"),
    ]
    assert meshproxy.cli.main(argv) == 2
    assert "no simulation platform" in capsys.readouterr().err
    assert meshproxy.cli.main(["quote", "verify", str(path), "--at", "yesterday"]) == 2
    assert "ISO 8601" in capsys.readouterr().err
