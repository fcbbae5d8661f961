"""RA-TLS certificates: the interoperable 2.23.133.5.4.9 evidence (Gramine, Intel SGX SDK)
and Gramine's legacy extension verify to the Intel root and bind the certificate's key;
certificates built here with simulated quotes round-trip; wrong bindings fail."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshproxy.attestation import (
    RATLS_EVIDENCE_OID,
    EnclaveIdentity,
    SimulationPlatform,
    TrustAnchor,
    _cbor,
    intel_anchor,
    parse_ratls_extension,
    ratls_claims,
    ratls_extension,
    ratls_report_data,
    simulation_anchor,
    verify_ratls_certificate,
)
from meshproxy.attestation._ratls import SIMULATED_QUOTE_TAG, TEE_QUOTE_TAG
from meshproxy.errors import AttestationError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
HW_NOW = datetime(2024, 6, 1, tzinfo=UTC)  # inside the PCK chains of both certificates
NOW = datetime(2026, 1, 1, tzinfo=UTC)
IDENTITY = EnclaveIdentity(bytes(range(32)), bytes(range(32, 64)), 7, 3, False)


def check_of(cert: x509.Certificate | bytes, anchors: list[TrustAnchor], **kw: object) -> str:
    with pytest.raises(AttestationError) as info:
        verify_ratls_certificate(cert, anchors, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]
    assert str(info.value).startswith(info.value.check + ": ")
    return info.value.check


@pytest.mark.parametrize("name", ["gramine-cert.pem", "intel-sgxsdk-cert.pem"])
def test_interop_certificates_verify_and_bind_their_key(name: str) -> None:
    pem = (VECTORS / name).read_bytes()
    v = verify_ratls_certificate(pem, [intel_anchor()], now=HW_NOW)
    assert (v.anchor, v.simulated) == ("intel", False)
    # The binding, recomputed here: report_data[0:32] = SHA-256(claims), and the claims
    # name SHA-256 of the certificate's SubjectPublicKeyInfo.
    der = _der_of(pem)
    evidence = parse_ratls_extension(_extension(der, "678105050409"))
    assert evidence.tag == TEE_QUOTE_TAG
    assert v.report_data[:32] == hashlib.sha256(evidence.claims).digest()
    assert (evidence.hash_alg, evidence.pubkey_hash) == (1, hashlib.sha256(_spki(der)).digest())


def test_gramines_legacy_extension_alone_verifies() -> None:
    der = _der_of((VECTORS / "gramine-cert.pem").read_bytes())
    ext_oid = bytes.fromhex("06092a864886f84d8a3906")
    assert ext_oid in der
    # Rename the interoperable extension's OID (same length) so only the legacy one counts.
    stripped = der.replace(bytes.fromhex("0606678105050409"), bytes.fromhex("0606678105050408"))
    v = verify_ratls_certificate(stripped, [intel_anchor()], now=HW_NOW)
    assert v.report_data[:32] == hashlib.sha256(_spki(der)).digest()


def test_interop_certificate_outside_the_pck_validity_fails() -> None:
    pem = (VECTORS / "intel-sgxsdk-cert.pem").read_bytes()
    assert check_of(pem, [intel_anchor()], now=datetime(2015, 1, 1, tzinfo=UTC)) in (
        "ratls-certificate",
        "pck-chain",
    )
    assert check_of(pem, [intel_anchor()], now=datetime(2031, 1, 1, tzinfo=UTC)) == "pck-chain"


# -- certificates built here ----------------------------------------------------------------
@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulationPlatform:
    return SimulationPlatform.load_or_create(tmp_path_factory.mktemp("sim") / "p", now=NOW)


def build(key: ec.EllipticCurvePrivateKey, quote: bytes, claims: bytes) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(ratls_extension(quote, claims), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_simulated_certificate_round_trips(platform: SimulationPlatform) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    nonce = b"coordinator-nonce"
    quote = platform.quote(ratls_report_data(key.public_key(), nonce=nonce), IDENTITY)
    cert = build(key, quote, ratls_claims(key.public_key(), nonce=nonce))
    anchors = [simulation_anchor(platform)]
    v = verify_ratls_certificate(cert, anchors, now=NOW, nonce=nonce)
    assert (v.identity, v.simulated, v.tcb_status) == (IDENTITY, True, "Simulated")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert verify_ratls_certificate(pem, anchors, now=NOW) == v
    # Simulated evidence never carries the Intel TEE quote tag.
    ext = cert.extensions.get_extension_for_oid(RATLS_EVIDENCE_OID).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    assert parse_ratls_extension(ext.value).tag == SIMULATED_QUOTE_TAG
    assert check_of(cert, [intel_anchor()]) == "vendor"
    assert check_of(cert, anchors, nonce=b"another nonce") == "ratls-binding"


def test_certificate_for_another_key_fails_the_binding(platform: SimulationPlatform) -> None:
    bound, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    quote = platform.quote(ratls_report_data(bound.public_key()), IDENTITY)
    cert = build(other, quote, ratls_claims(bound.public_key()))
    with pytest.raises(AttestationError, match="another public key") as info:
        verify_ratls_certificate(cert, [simulation_anchor(platform)], now=NOW)
    assert info.value.check == "ratls-binding"


def test_claims_the_quote_does_not_bind_fail(platform: SimulationPlatform) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    quote = platform.quote(ratls_report_data(key.public_key()), IDENTITY)
    cert = build(key, quote, ratls_claims(key.public_key(), nonce=b"added later"))
    assert check_of(cert, [simulation_anchor(platform)]) == "ratls-binding"


def test_simulated_quote_under_the_intel_tag_is_refused(platform: SimulationPlatform) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    quote = platform.quote(ratls_report_data(key.public_key()), IDENTITY)
    claims = ratls_claims(key.public_key())
    value = _cbor.encode(_cbor.Tag(TEE_QUOTE_TAG, [quote, claims]))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(RATLS_EVIDENCE_OID, value), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    assert check_of(cert, [simulation_anchor(platform)]) == "ratls-format"


def test_expired_certificate_and_missing_evidence(platform: SimulationPlatform) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    quote = platform.quote(ratls_report_data(key.public_key()), IDENTITY)
    cert = build(key, quote, ratls_claims(key.public_key()))
    late = NOW + timedelta(days=2)
    assert check_of(cert, [simulation_anchor(platform)], now=late) == "ratls-certificate"
    plain = _der_of(cert.public_bytes(serialization.Encoding.PEM)).replace(
        bytes.fromhex("0606678105050409"), bytes.fromhex("0606678105050408")
    )
    assert check_of(plain, [simulation_anchor(platform)]) == "ratls-format"
    assert check_of(b"not a certificate", [simulation_anchor(platform)]) == "ratls-format"


def test_report_data_is_the_claims_hash() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    rd = ratls_report_data(key.public_key())
    assert rd == hashlib.sha256(ratls_claims(key.public_key())).digest() + bytes(32)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = _cbor.encode({"pubkey-hash": _cbor.encode([1, hashlib.sha256(spki).digest()])})
    assert ratls_claims(key.public_key()) == expected
    # The same bytes Gramine writes: a1 6b "pubkey-hash" 58 24 82 01 58 20 <hash>.
    assert expected.startswith(bytes.fromhex("a16b7075626b65792d68617368582482015820"))


# -- helpers ---------------------------------------------------------------------------
def _der_of(pem: bytes) -> bytes:
    import base64

    body = pem.split(b"-----BEGIN CERTIFICATE-----")[1].split(b"-----END CERTIFICATE-----")[0]
    return base64.b64decode(b"".join(body.split()))


def _extension(der: bytes, oid_hex: str) -> bytes:
    from meshproxy.attestation import _der

    tbs = _der.read_all(der).children()[0].children()
    (exts,) = next(t for t in tbs if t.tag == 0xA3).children()
    for ext in exts.children():
        fields = ext.children()
        if fields[0].value.hex() == oid_hex:
            return fields[-1].value
    raise AssertionError("extension not found")


def _spki(der: bytes) -> bytes:
    from meshproxy.attestation import _der

    tbs = _der.read_all(der).children()[0].children()
    return tbs[6].raw  # [0] version, serial, sigalg, issuer, validity, subject, spki
