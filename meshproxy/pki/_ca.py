"""The coordinator's certificate authority: root, intermediate, and marble leaves.

* The root is created once and is what clients pin; the coordinator's own TLS listeners
  present it (as MarbleRun's do), so a client that pinned it checks one exact certificate.
* The intermediate is signed by the root and replaced whenever the manifest changes;
  marbles use it as their trust anchor, so marbles of an outdated manifest cannot talk to
  current ones.
* Leaves are issued from a marble's CSR (its key never leaves it), short-lived, with the
  marble's SPIFFE ID, instance UUID and DNS names.
In simulation every certificate's subject says so.
"""

from __future__ import annotations

import functools
import ipaddress
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.errors import PKIError
from meshproxy.pki._identity import SIMULATION_MARK, check_marble_type, spiffe_id

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
_BACKDATE = timedelta(minutes=5)  # tolerate clock skew between nodes


def _name(common_name: str, simulated: bool) -> x509.Name:
    org = "meshproxy" + (f" {SIMULATION_MARK} (no hardware isolation)" if simulated else "")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _sans(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


@dataclass(frozen=True)
class Authority:
    """A CA certificate with its key; the key is never logged (no repr)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"<Authority {self.cert.subject.rfc4514_string()} key=<redacted>>"


def create_root(
    *, now: datetime, dns_names: Sequence[str], simulated: bool, key: ec.EllipticCurvePrivateKey
) -> Authority:
    name = _name("meshproxy Coordinator Root CA", simulated)
    names = list(dict.fromkeys([*dns_names, "localhost", "127.0.0.1", "::1"]))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.SubjectAlternativeName(_sans(names)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def create_intermediate(
    root: Authority, *, now: datetime, simulated: bool, key: ec.EllipticCurvePrivateKey
) -> Authority:
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"meshproxy Intermediate CA {now:%Y%m%dT%H%M%S}", simulated))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + INTERMEDIATE_LIFETIME, root.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), False
        )
        .sign(root.key, hashes.SHA256())
    )
    return Authority(cert, key)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def make_csr(
    key: ec.EllipticCurvePrivateKey, marble_type: str, dns_names: Sequence[str]
) -> x509.CertificateSigningRequest:
    """The marble's CSR: its fresh public key and the DNS names it asks for."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, marble_type)])
    )
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(dns_names)), False)
    return builder.sign(key, hashes.SHA256())


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    return load_csr_key(pem)[0]


def load_csr_key(
    pem: bytes,
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    """A CSR whose signature verifies, and its ECDSA public key (decoded and checked once:
    ``public_key()`` validates the point each time it is called)."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise PKIError("CSR is not valid PEM") from None
    if not csr.is_signature_valid:
        raise PKIError("CSR signature does not verify: the sender does not hold the key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError("CSR key must be an ECDSA key")
    return csr, key


def csr_dns_names(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def issue_leaf(
    issuer: Authority,
    csr: x509.CertificateSigningRequest,
    *,
    trust_domain: str,
    marble_type: str,
    instance: uuidlib.UUID,
    dns_names: Sequence[str],
    lifetime: timedelta,
    now: datetime,
    simulated: bool,
    evidence: x509.ExtensionType | None = None,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> x509.Certificate:
    """A marble leaf for the CSR's key: SPIFFE ID + UUID URIs, DNS names, server+client auth.

    ``evidence`` (the marble's RA-TLS extension, 2.23.133.5.4.9) is added non-critical:
    OpenSSL and mbedTLS refuse certificates with unknown critical extensions.
    ``public_key``: the CSR's own key as ``load_csr_key`` returned it with the CSR (saves
    decoding and validating the point again); without it the CSR's key is decoded here."""
    check_marble_type(marble_type)
    if public_key is None:
        public_key = _ec_key(csr.public_key())
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(trust_domain, marble_type)),
        x509.UniformResourceIdentifier(f"urn:uuid:{instance}"),
        *_sans(list(dict.fromkeys(dns_names))),
    ]
    issuer_name, issuer_end, key_id = _issuer_parts(issuer)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_leaf_name(marble_type, simulated))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + lifetime, issuer_end))
        .add_extension(_LEAF_CONSTRAINTS, critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EXTENDED_KEY_USAGE, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(key_id, False)
    )
    if evidence is not None:
        builder = builder.add_extension(evidence, critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


# What every leaf carries, made once (the builder copies nothing it is given).
_LEAF_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EXTENDED_KEY_USAGE = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_ISSUERS: dict[x509.Certificate, tuple[x509.Name, datetime, x509.AuthorityKeyIdentifier]] = {}


def _issuer_parts(issuer: Authority) -> tuple[x509.Name, datetime, x509.AuthorityKeyIdentifier]:
    """The issuer's name, end of validity and key identifier, decoded once per issuer
    certificate (an intermediate signs every leaf of a manifest's lifetime)."""
    parts = _ISSUERS.get(issuer.cert)
    if parts is None:
        if len(_ISSUERS) >= 16:
            _ISSUERS.clear()
        key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        parts = _ISSUERS[issuer.cert] = (
            issuer.cert.subject,
            issuer.cert.not_valid_after_utc,
            key_id,
        )
    return parts


@functools.lru_cache(maxsize=256)
def _leaf_name(marble_type: str, simulated: bool) -> x509.Name:
    return _name(marble_type, simulated)


def _ec_key(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError("CSR key must be an ECDSA key")
    return key


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate, *, now: datetime) -> None:
    """Check one link of a chain: signature, issuer name, validity at ``now``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError) as exc:
        raise PKIError(
            f"certificate {cert.subject.rfc4514_string()} not issued by "
            f"{issuer.subject.rfc4514_string()}: {exc}"
        ) from None
    except Exception as exc:  # cryptography raises InvalidSignature, not a ValueError
        raise PKIError(f"certificate {cert.subject.rfc4514_string()}: bad signature") from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PKIError(
            f"certificate {cert.subject.rfc4514_string()} is not valid at {now:%Y-%m-%dT%H:%M:%SZ} "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )
