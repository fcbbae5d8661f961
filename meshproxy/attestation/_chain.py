"""Trust anchors and X.509 chain checks shared by quotes (PCK chain) and collateral (TCB
signing and CRL issuer chains): each hop signed by the next, valid at ``now``, issuers
are CAs within their path length, the last hop signed by the pinned anchor itself.

Every failure is an ``AttestationError`` under the caller's check name; validity failures
may carry a separate one (collateral reports them as "collateral-expired").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning

from meshproxy.attestation._platform import SIM_VENDOR_ID
from meshproxy.errors import AttestationError

INTEL_QE_VENDOR_ID = bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
MAX_CHAIN = 5
CERT_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, CryptographyDeprecationWarning)


@dataclass(frozen=True)
class TrustAnchor:
    name: str
    certificate: x509.Certificate
    simulated: bool
    vendor_id: bytes


@functools.cache
def intel_anchor() -> TrustAnchor:
    """Intel's SGX Root CA (the DER shipped in this package)."""
    # Next to this module: part of the measured package (an importlib.resources lookup
    # would load that machinery for one file that is always a plain file here).
    der = (Path(__file__).parent / "intel_root.der").read_bytes()
    return TrustAnchor("intel", x509.load_der_x509_certificate(der), False, INTEL_QE_VENDOR_ID)


def fail(check: str, message: str) -> AttestationError:
    return AttestationError(f"{check}: {message}", check=check)


def select_anchors(vendor_id: bytes, anchors: Sequence[TrustAnchor]) -> list[TrustAnchor]:
    matching = [a for a in anchors if a.vendor_id == vendor_id]
    if matching:
        return matching
    trusted = ", ".join(a.name for a in anchors) or "none"
    if vendor_id == SIM_VENDOR_ID:
        raise fail(
            "vendor",
            f"this is a simulated quote (QE vendor id {SIM_VENDOR_ID!r}), and simulation is "
            f"not accepted (trusted: {trusted})",
        )
    if vendor_id == INTEL_QE_VENDOR_ID:
        raise fail(
            "vendor",
            f"this is a hardware quote from Intel's quoting enclave, but Intel is not a "
            f"trusted anchor here (trusted: {trusted})",
        )
    raise fail(
        "vendor", f"QE vendor id {vendor_id.hex()} matches no trusted anchor (trusted: {trusted})"
    )


def load_pem_chain(data: bytes, check: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, CryptographyDeprecationWarning):
        # The warning is raised only where warnings are errors (as in our tests); either
        # way such a certificate cannot be one the anchor's CA issued.
        raise fail(check, f"{what} is not a PEM certificate chain") from None
    if len(certs) > MAX_CHAIN:
        raise fail(check, f"{len(certs)} certificates in {what} (at most {MAX_CHAIN})")
    return certs


def chain_to(
    certs: Sequence[x509.Certificate],
    anchor: TrustAnchor,
    now: datetime,
    *,
    check: str,
    expired_check: str | None = None,
    end_entity: bool = True,
) -> list[x509.Certificate]:
    """Leaf first; the blob's copy of the root (if any) is dropped, the anchor used.
    Returns the verified path (leaf, intermediates) without the anchor. The leaf must be
    an end-entity certificate, or (``end_entity=False``: a CRL issuer) a CA."""
    path = list(certs)
    if path and path[-1] == anchor.certificate:
        path.pop()
    if not path:
        raise fail(check, "no certificate below the root in the chain")
    issuers = [*path[1:], anchor.certificate]
    try:
        for depth, (cert, issuer) in enumerate(zip(path, issuers, strict=True)):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                if cert.subject == cert.issuer:
                    raise fail(
                        check,
                        f"the chain ends at the root {name(cert)}, which is not the "
                        f"{anchor.name!r} trust anchor (another key: another platform?)",
                    ) from None
                raise fail(
                    check,
                    f"{name(cert)} is not issued by {name(issuer)} of the "
                    f"{anchor.name!r} trust anchor",
                ) from None
            check_validity(cert, now, expired_check or check)
            _check_issuer(issuer, below=depth, check=check)
        check_validity(anchor.certificate, now, expired_check or check)
        if end_entity:
            _check_not_ca(path[0], check)
        else:
            _check_issuer(path[0], below=0, check=check)
    except CERT_ERRORS as exc:
        raise fail(check, f"malformed certificate in the chain ({exc})") from None
    return path


def p256_key(cert: x509.Certificate, check: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except CERT_ERRORS as exc:
        raise fail(check, f"{name(cert)} has a malformed key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise fail(check, f"{name(cert)} has no ECDSA P-256 key")
    return key


def check_validity(cert: x509.Certificate, now: datetime, check: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise fail(
            check,
            f"{name(cert)} is not valid at {now.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})",
        )


def _check_issuer(issuer: x509.Certificate, *, below: int, check: str) -> None:
    """``issuer`` signs a certificate with ``below`` intermediates under that one."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise fail(check, f"{name(issuer)} is not a CA (no basic constraints)") from None
    if not bc.ca:
        raise fail(check, f"{name(issuer)} is not a CA")
    if bc.path_length is not None and below > bc.path_length:
        raise fail(check, f"{name(issuer)} allows {bc.path_length} intermediates")


def _check_not_ca(leaf: x509.Certificate, check: str) -> None:
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if bc.ca:
        raise fail(check, f"{name(leaf)} is a CA certificate, not an end-entity certificate")


def name(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except ValueError:
        return "a certificate with a malformed subject"


def check_signature(
    key: ec.EllipticCurvePublicKey, raw: bytes, data: bytes, check: str, message: str
) -> None:
    """``raw`` is r || s (big-endian halves), as quotes and Intel's collateral carry it."""
    if len(raw) != 64:
        raise fail(check, f"{message} (the signature is {len(raw)} bytes, not 64)")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise fail(check, message) from None
