"""Marble identities in certificates, and the identity check after every handshake.

A marble's certificate names it with a SPIFFE URI ``spiffe://<trust-domain>/marble/<type>``
and carries its instance UUID in a second URI ``urn:uuid:<uuid>``. Peers are accepted by
chain (checked by the TLS library against the current intermediate) *and* by identity
(checked here), never by chain alone.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshproxy.errors import PKIError, PolicyError

if TYPE_CHECKING:  # loaded when a certificate is parsed (10 MB the proxy avoids at idle)
    from cryptography import x509

SIMULATION_MARK = "SIMULATION"
_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


def check_marble_type(name: str) -> str:
    if not _TYPE_RE.match(name):
        raise PolicyError(
            f"marble type {name!r} is not valid: use letters, digits, '.', '_' and '-'"
        )
    return name


def check_trust_domain(name: str) -> str:
    if not _DOMAIN_RE.match(name):
        raise PolicyError(f"trust domain {name!r} is not a valid lower-case DNS name")
    return name


def spiffe_id(trust_domain: str, marble_type: str) -> str:
    return f"spiffe://{trust_domain}/marble/{marble_type}"


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified certificate says its holder is."""

    spiffe_id: str
    trust_domain: str
    marble_type: str
    uuid: str | None
    simulated: bool

    def __str__(self) -> str:
        return self.spiffe_id


@dataclass(frozen=True)
class CertNames:
    """The names an identity is read from: the subjectAltName URIs and the subject's
    organizations, as a TLS library decoded them from a verified certificate (Python's
    ``SSLObject.getpeercert()``), so checking a peer does not need ``cryptography``."""

    uris: tuple[str, ...]
    organizations: tuple[str, ...]

    @classmethod
    def from_ssl(cls, decoded: Mapping[str, Any]) -> CertNames:
        """From ``getpeercert()``'s dict (empty when the peer was not verified)."""
        san = decoded.get("subjectAltName") or ()
        subject = decoded.get("subject") or ()
        uris = tuple(str(v) for k, v in san if k == "URI")
        orgs = tuple(str(v) for rdn in subject for k, v in rdn if k == "organizationName")
        return cls(uris, orgs)


def names_of(cert: x509.Certificate) -> CertNames:
    """A certificate's names (PKIError when it has no subjectAltName)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate has no subjectAltName: not a marble certificate") from None
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return CertNames(
        tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        tuple(str(o.value) for o in orgs),
    )


def identity_of(cert: x509.Certificate | CertNames) -> PeerIdentity:
    """The marble identity in a certificate; PKIError when it carries none."""
    names = cert if isinstance(cert, CertNames) else names_of(cert)
    uris = names.uris
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise PKIError(f"certificate must carry exactly one SPIFFE URI, found {len(spiffe)}")
    rest = spiffe[0][len("spiffe://") :]
    domain, _, path = rest.partition("/")
    kind, _, marble_type = path.partition("/")
    if kind != "marble" or not marble_type or "/" in marble_type:
        raise PKIError(f"SPIFFE ID {spiffe[0]!r} is not a marble identity")
    uuids = [u[len("urn:uuid:") :] for u in uris if u.startswith("urn:uuid:")]
    simulated = any(SIMULATION_MARK in o for o in names.organizations)
    return PeerIdentity(spiffe[0], domain, marble_type, uuids[0] if uuids else None, simulated)


def check_peer(
    cert: x509.Certificate | bytes | CertNames,
    *,
    trust_domain: str,
    allowed_types: Collection[str],
    role: str = "peer",
) -> PeerIdentity:
    """Accept a chain-verified peer only if it is one of ``allowed_types`` in our domain."""
    if isinstance(cert, bytes):
        from cryptography import x509

        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError:
            raise PolicyError(f"{role} sent a certificate that does not parse") from None
    try:
        ident = identity_of(cert)
    except PKIError as exc:
        raise PolicyError(f"{role} is not a marble: {exc}") from None
    if ident.trust_domain != trust_domain:
        raise PolicyError(
            f"{role} {ident.spiffe_id} is from trust domain {ident.trust_domain!r}, "
            f"expected {trust_domain!r}"
        )
    if ident.marble_type not in allowed_types:
        allowed = ", ".join(sorted(allowed_types)) or "none"
        raise PolicyError(
            f"{role} {ident.spiffe_id} (marble type {ident.marble_type!r}) is not allowed "
            f"here (allowed: {allowed})"
        )
    return ident
