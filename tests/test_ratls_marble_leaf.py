"""RA-TLS in marble certificates: the leaf the coordinator issues carries the marble's quote
in extension 2.23.133.5.4.9, bound to the leaf's key the way RA-TLS verifiers check it.

The verifier here is ``verify_ratls_certificate``, the one that verifies the Gramine and
Intel SDK certificates of the vectors (``test_attestation_ratls``).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from test_coordinator_env import NOW, World, identity, package

from meshproxy.attestation import (
    RATLS_EVIDENCE_OID,
    intel_anchor,
    parse_ratls_extension,
    ratls_claims,
    ratls_extension,
    simulation_anchor,
    verify_ratls_certificate,
)
from meshproxy.errors import AttestationError
from meshproxy.pki import issue_leaf, make_csr


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.set_manifest({"Packages": {"p": package()}, "Marbles": {"web": {"Package": "p"}}})
    return w


def _leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_activated_leaf_carries_a_quote_that_binds_its_key(world: World) -> None:
    req = world.request("web")
    leaf = _leaf(world.core.activate(req, now=NOW).leaf_pem)
    ext = leaf.extensions.get_extension_for_oid(RATLS_EVIDENCE_OID)
    assert ext.critical is False  # OpenSSL and mbedTLS refuse unknown critical extensions
    evidence = parse_ratls_extension(ext.value.public_bytes())
    assert evidence.quote == req.quote
    assert evidence.nonce == req.nonce
    assert evidence.claims == ratls_claims(leaf.public_key(), nonce=req.nonce)

    verified = verify_ratls_certificate(
        leaf, [simulation_anchor(world.platform)], now=NOW, nonce=req.nonce
    )
    assert verified.simulated
    assert verified.identity == identity()
    assert verified.report_data[:32] == hashlib.sha256(evidence.claims).digest()


def test_the_leafs_evidence_does_not_verify_against_intel_alone(world: World) -> None:
    leaf = _leaf(world.core.activate(world.request("web"), now=NOW).leaf_pem)
    with pytest.raises(AttestationError) as exc:
        verify_ratls_certificate(leaf, [intel_anchor()], now=NOW)
    assert exc.value.check == "vendor"


def _with_foreign_key(leaf: x509.Certificate) -> x509.Certificate:
    """The leaf's evidence extension copied into a certificate for another key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    ext = leaf.extensions.get_extension_for_oid(RATLS_EVIDENCE_OID)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(ext.value, critical=False)
        .sign(key, hashes.SHA256())
    )


def test_the_evidence_in_a_certificate_for_a_foreign_key_fails(world: World) -> None:
    leaf = _leaf(world.core.activate(world.request("web"), now=NOW).leaf_pem)
    with pytest.raises(AttestationError) as exc:
        verify_ratls_certificate(
            _with_foreign_key(leaf), [simulation_anchor(world.platform)], now=NOW
        )
    assert exc.value.check == "ratls-binding"
    assert "another public key" in str(exc.value)


def test_a_wrong_nonce_is_refused_by_the_verifier(world: World) -> None:
    leaf = _leaf(world.core.activate(world.request("web"), now=NOW).leaf_pem)
    with pytest.raises(AttestationError) as exc:
        verify_ratls_certificate(
            leaf, [simulation_anchor(world.platform)], now=NOW, nonce=b"\0" * 32
        )
    assert exc.value.check == "ratls-binding"


def test_a_renewed_leaf_carries_the_renewal_quote(world: World) -> None:
    first = world.request("web")
    world.core.activate(first, now=NOW)
    again = world.request("web", instance=first.uuid)
    leaf = _leaf(world.core.renew(again, now=NOW).leaf_pem)
    verified = verify_ratls_certificate(
        leaf, [simulation_anchor(world.platform)], now=NOW, nonce=again.nonce
    )
    assert verified.identity == identity()


# Gramine's verifier (tools/sgx/ra-tls/ra_tls_verify_common.c) does not parse the
# certificate's extensions: it looks for the raw OID bytes, then expects an optional
# BOOLEAN FALSE, an OCTET STRING with a two-byte length from 128 to SGX_QUOTE_MAX_SIZE
# (8192), and CBOR tag 60000 over [bstr quote, bstr claims] inside.
_EVIDENCE_OID_RAW = bytes.fromhex("0606678105050409")
_GRAMINE_MAX = 8192
_TAG_60000 = b"\xd9\xea\x60\x82"  # tag 60000, array of 2
_TAG_SIMULATED = b"\xdamesh\x82"  # meshproxy's private tag: never taken for Intel evidence


def _gramine_view(der: bytes, tag: bytes) -> bytes:
    at = der.index(_EVIDENCE_OID_RAW) + len(_EVIDENCE_OID_RAW)
    if der[at] == 0x01:  # criticality BOOLEAN: must be FALSE
        assert der[at : at + 3] == b"\x01\x01\x00"
        at += 3
    assert der[at : at + 2] == b"\x04\x82"
    size = int.from_bytes(der[at + 2 : at + 4], "big")
    assert 128 <= size <= _GRAMINE_MAX
    value = der[at + 4 : at + 4 + size]
    assert value[: len(tag)] == tag
    return value


def _pem_der(path: Path) -> bytes:
    return base64.b64decode(b"".join(path.read_bytes().split(b"-----")[2].split()))


def test_leaves_are_laid_out_the_way_gramines_verifier_reads_them(world: World) -> None:
    vectors = Path(__file__).parent / "vectors" / "attestation"
    _gramine_view(_pem_der(vectors / "gramine-cert.pem"), _TAG_60000)  # what Gramine emits

    # A simulated marble's leaf: the same layout under the private tag.
    req = world.request("web")
    leaf = _leaf(world.core.activate(req, now=NOW).leaf_pem)
    value = _gramine_view(leaf.public_bytes(Encoding.DER), _TAG_SIMULATED)
    assert parse_ratls_extension(value).hash_alg == 1  # SHA-256: every verifier supports it

    # A hardware quote (Intel's, from the vectors) goes under tag 60000, within Gramine's
    # size limit, in a leaf issued the way the coordinator issues marble leaves.
    intel_quote = (vectors / "cosmian_quote.dat").read_bytes()  # the largest SGX vector
    key = ec.generate_private_key(ec.SECP256R1())
    claims = ratls_claims(key.public_key(), nonce=bytes(32))
    csr = make_csr(key, "web", ["svc.test"])
    hardware_leaf = issue_leaf(
        world.core.intermediate, csr, trust_domain="t.local", marble_type="web",
        instance=uuid.uuid4(), dns_names=[], lifetime=timedelta(hours=1), now=NOW,
        simulated=False, evidence=ratls_extension(intel_quote, claims),
    )  # fmt: skip
    value = _gramine_view(hardware_leaf.public_bytes(Encoding.DER), _TAG_60000)
    assert parse_ratls_extension(value).quote == intel_quote


# -- meshproxy quote verify CERTIFICATE ---------------------------------------------------------
def test_quote_verify_checks_a_marble_leaf(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshproxy.cli import main

    leaf_pem = world.core.activate(world.request("web"), now=NOW).leaf_pem
    path = tmp_path / "leaf.pem"
    path.write_bytes(leaf_pem)
    trust = ["--trust", "simulation", "--platform", str(world.platform.directory)]
    at = ["--at", NOW.isoformat()]
    assert main(["quote", "verify", str(path), *trust, *at]) == 0
    out = capsys.readouterr().out
    assert "RA-TLS certificate: its quote verifies and binds the certificate's key" in out
    assert f"SignerID: {identity().signer_id.hex()}" in out

    foreign = tmp_path / "foreign.der"
    foreign.write_bytes(_with_foreign_key(_leaf(leaf_pem)).public_bytes(Encoding.DER))
    assert main(["quote", "verify", str(foreign), *trust, *at]) != 0
    err = capsys.readouterr().err
    assert "RA-TLS certificate does not verify: ratls-binding" in err
    assert "Traceback" not in err


def test_quote_verify_checks_gramines_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    from meshproxy.cli import main

    vector = Path(__file__).parent / "vectors" / "attestation" / "gramine-cert.pem"
    assert main(["quote", "verify", str(vector), "--at", "2024-06-01T00:00:00+00:00"]) == 0
    assert "Verified against the intel trust anchor" in capsys.readouterr().out
