"""RA-TLS in marble certificates: the leaf the coordinator issues carries the marble's quote
in extension 2.23.133.5.4.9, bound to the leaf's key the way RA-TLS verifiers check it.

The verifier here is ``verify_ratls_certificate``, the one that verifies the Gramine and
Intel SDK certificates of the vectors (``test_attestation_ratls``).
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_coordinator_env import NOW, World, identity, package

from meshproxy.attestation import (
    RATLS_EVIDENCE_OID,
    intel_anchor,
    parse_ratls_extension,
    ratls_claims,
    simulation_anchor,
    verify_ratls_certificate,
)
from meshproxy.errors import AttestationError


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
