"""PKI: chains, SANs, lifetimes, identities, and the checks that refuse foreign certs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshproxy._redact import Secret
from meshproxy.errors import PKIError, PolicyError
from meshproxy.pki import (
    Authority,
    check_peer,
    create_intermediate,
    create_root,
    csr_dns_names,
    generate_key,
    identity_of,
    issue_leaf,
    key_from_pem,
    key_to_pem,
    load_csr,
    make_csr,
    verify_issued_by,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def ca(simulated: bool = False) -> tuple[Authority, Authority]:
    root = create_root(now=NOW, dns_names=["coord.test"], simulated=simulated, key=generate_key())
    return root, create_intermediate(root, now=NOW, simulated=simulated, key=generate_key())


def leaf(
    inter: Authority,
    marble_type: str = "backend",
    lifetime: timedelta = timedelta(hours=24),
    dns: tuple[str, ...] = ("backend.svc", "10.0.0.7"),
    simulated: bool = False,
) -> x509.Certificate:
    csr = make_csr(generate_key(), marble_type, list(dns))
    return issue_leaf(
        inter,
        load_csr(csr.public_bytes(Encoding.PEM)),
        trust_domain="td.test",
        marble_type=marble_type,
        instance=uuid.UUID(int=7),
        dns_names=csr_dns_names(csr),
        lifetime=lifetime,
        now=NOW,
        simulated=simulated,
    )


def test_chain_leaf_to_intermediate_to_root() -> None:
    root, inter = ca()
    cert = leaf(inter)
    verify_issued_by(cert, inter.cert, now=NOW)
    verify_issued_by(inter.cert, root.cert, now=NOW)
    with pytest.raises(PKIError, match=r"not issued by|bad signature"):
        verify_issued_by(cert, root.cert, now=NOW)
    bc = inter.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert bc.path_length == 0


def test_leaf_sans_eku_and_identity() -> None:
    _, inter = ca()
    cert = leaf(inter)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://td.test/marble/backend",
        f"urn:uuid:{uuid.UUID(int=7)}",
    ]
    assert san.get_values_for_type(x509.DNSName) == ["backend.svc"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ident = identity_of(cert)
    assert (ident.trust_domain, ident.marble_type, ident.uuid) == (
        "td.test",
        "backend",
        str(uuid.UUID(int=7)),
    )
    assert not ident.simulated


def test_lifetimes_are_short_and_bounded_by_the_issuer() -> None:
    root, inter = ca()
    cert = leaf(inter, lifetime=timedelta(hours=1))
    assert cert.not_valid_after_utc == NOW + timedelta(hours=1)
    assert cert.not_valid_before_utc < NOW  # a little backdated for clock skew
    long = leaf(inter, lifetime=timedelta(days=10_000))
    assert long.not_valid_after_utc == inter.cert.not_valid_after_utc
    assert inter.cert.not_valid_after_utc <= root.cert.not_valid_after_utc
    with pytest.raises(PKIError, match="not valid at"):
        verify_issued_by(cert, inter.cert, now=NOW + timedelta(hours=2))


def test_simulation_is_visible_in_every_subject() -> None:
    root, inter = ca(simulated=True)
    cert = leaf(inter, simulated=True)
    for c in (root.cert, inter.cert, cert):
        assert "SIMULATION" in c.subject.rfc4514_string()
    assert identity_of(cert).simulated


def test_check_peer_refuses_other_types_domains_and_non_marbles() -> None:
    root, inter = ca()
    cert = leaf(inter, "intruder")
    assert check_peer(cert, trust_domain="td.test", allowed_types=["intruder"]).marble_type
    with pytest.raises(PolicyError, match=r"\(marble type 'intruder'\) is not allowed here"):
        check_peer(cert, trust_domain="td.test", allowed_types=["frontend"])
    with pytest.raises(PolicyError, match=r"trust domain .td\.test., expected .other\.test."):
        check_peer(cert, trust_domain="other.test", allowed_types=["intruder"])
    with pytest.raises(PolicyError, match="not a marble"):
        check_peer(root.cert, trust_domain="td.test", allowed_types=["backend"])
    with pytest.raises(PolicyError, match="does not parse"):
        check_peer(b"garbage", trust_domain="td.test", allowed_types=["backend"])
    with pytest.raises(PolicyError, match="allowed: none"):
        check_peer(cert, trust_domain="td.test", allowed_types=[])


def test_csr_must_be_signed_by_its_key() -> None:
    csr = make_csr(generate_key(), "backend", ["a.test"]).public_bytes(Encoding.PEM)
    assert csr_dns_names(load_csr(csr)) == ["a.test"]
    with pytest.raises(PKIError, match="not valid PEM"):
        load_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(PolicyError, match="not valid"):
        leaf(ca()[1], marble_type="bad/type")


def test_keys_round_trip_and_never_show_themselves() -> None:
    key = generate_key()
    pem = key_to_pem(key)
    assert isinstance(pem, Secret)
    assert "PRIVATE" not in repr(pem)
    assert "PRIVATE" not in f"{pem}"
    assert key_from_pem(pem).private_numbers() == key.private_numbers()
    with pytest.raises(PKIError, match="not a valid"):
        key_from_pem(Secret(b"nope"))
    root, _ = ca()
    assert "redacted" in repr(root)
