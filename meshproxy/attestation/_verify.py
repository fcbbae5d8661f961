"""One quote verifier for hardware and simulation; only the trust anchor differs.

The checks run in a fixed order and the first failure is an ``AttestationError`` whose
``check`` names it: format, vendor, pck-chain, qe-report-signature, qe-identity,
attestation-key-binding, quote-signature. Time is an argument; nothing here reads a
clock, a file or the network (the Intel root is package data, read on first use).
TCB status needs collateral (TCB info, QE identity, CRLs), which is not evaluated yet:
hardware quotes come back "NotEvaluated", simulated ones "Simulated", and a package
policy decides what it accepts.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning

from meshproxy.attestation._platform import SIM_VENDOR_ID, SimulationPlatform
from meshproxy.attestation._quote import (
    CERT_TYPE_PCK_CHAIN,
    EnclaveIdentity,
    Quote,
    parse_quote,
)
from meshproxy.errors import AttestationError

INTEL_QE_VENDOR_ID = bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
_MAX_CHAIN = 5


@dataclass(frozen=True)
class TrustAnchor:
    name: str
    certificate: x509.Certificate
    simulated: bool
    vendor_id: bytes


@dataclass(frozen=True)
class VerifiedQuote:
    identity: EnclaveIdentity
    report_data: bytes
    simulated: bool
    anchor: str
    tcb_status: str


@functools.cache
def intel_anchor() -> TrustAnchor:
    """Intel's SGX Root CA (the DER shipped in this package)."""
    der = resources.files(__package__).joinpath("intel_root.der").read_bytes()
    return TrustAnchor("intel", x509.load_der_x509_certificate(der), False, INTEL_QE_VENDOR_ID)


def simulation_anchor(platform: SimulationPlatform) -> TrustAnchor:
    return TrustAnchor("simulation", platform.root_certificate, True, SIM_VENDOR_ID)


def _fail(check: str, message: str) -> AttestationError:
    return AttestationError(f"{check}: {message}", check=check)


def verify_quote(quote: bytes, anchors: Sequence[TrustAnchor], *, now: datetime) -> VerifiedQuote:
    if now.tzinfo is None:
        raise ValueError("verify_quote: now must be timezone-aware")
    q = parse_quote(quote)
    candidates = _select_anchors(q, anchors)
    anchor, pck_key = _verify_chain(q, candidates, now)
    _check_signature(
        pck_key,
        q.qe_report_signature,
        q.qe_report.to_bytes(),
        "qe-report-signature",
        "the QE report is not signed by the PCK certificate's key",
    )
    if q.qe_report.debug:
        raise _fail("qe-identity", "the quoting enclave is a debug enclave")
    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report.report_data != expected:
        raise _fail(
            "attestation-key-binding",
            "the QE report data is not SHA-256(attestation key || QE auth data) || zeros",
        )
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + q.attestation_key
        )
    except ValueError:
        raise _fail("quote-signature", "the attestation key is not a P-256 point") from None
    _check_signature(
        att_key,
        q.signature,
        q.signed_region,
        "quote-signature",
        "the quote is not signed by its attestation key (header or report body altered)",
    )
    return VerifiedQuote(
        identity=EnclaveIdentity.from_body(q.body),
        report_data=q.body.report_data,
        simulated=anchor.simulated,
        anchor=anchor.name,
        tcb_status="Simulated" if anchor.simulated else "NotEvaluated",
    )


def _select_anchors(q: Quote, anchors: Sequence[TrustAnchor]) -> list[TrustAnchor]:
    matching = [a for a in anchors if a.vendor_id == q.vendor_id]
    if matching:
        return matching
    trusted = ", ".join(a.name for a in anchors) or "none"
    if q.vendor_id == SIM_VENDOR_ID:
        raise _fail(
            "vendor",
            f"this is a simulated quote (QE vendor id {SIM_VENDOR_ID!r}), and simulation is "
            f"not accepted (trusted: {trusted})",
        )
    if q.vendor_id == INTEL_QE_VENDOR_ID:
        raise _fail(
            "vendor",
            f"this is a hardware quote from Intel's quoting enclave, but Intel is not a "
            f"trusted anchor here (trusted: {trusted})",
        )
    raise _fail(
        "vendor",
        f"QE vendor id {q.vendor_id.hex()} matches no trusted anchor (trusted: {trusted})",
    )


def _verify_chain(
    q: Quote, anchors: Sequence[TrustAnchor], now: datetime
) -> tuple[TrustAnchor, ec.EllipticCurvePublicKey]:
    if q.cert_type != CERT_TYPE_PCK_CHAIN:
        raise _fail(
            "pck-chain",
            f"certification data type {q.cert_type} is not a PCK certificate chain "
            f"({CERT_TYPE_PCK_CHAIN})",
        )
    try:
        certs = x509.load_pem_x509_certificates(q.cert_data)
    except (ValueError, CryptographyDeprecationWarning):
        # The warning is raised only where warnings are errors (as in our tests); either
        # way such a certificate cannot be one the anchor's CA issued.
        raise _fail("pck-chain", "certification data is not a PEM certificate chain") from None
    if len(certs) > _MAX_CHAIN:
        raise _fail("pck-chain", f"{len(certs)} certificates in the chain (at most {_MAX_CHAIN})")
    errors: list[str] = []
    for anchor in anchors:
        try:
            return anchor, _chain_to(certs, anchor, now)
        except AttestationError as exc:
            errors.append(str(exc).removeprefix("pck-chain: "))
    raise _fail("pck-chain", "; ".join(errors))


def _chain_to(
    certs: list[x509.Certificate], anchor: TrustAnchor, now: datetime
) -> ec.EllipticCurvePublicKey:
    """Leaf first; the blob's copy of the root (if any) is dropped, the anchor used."""
    path = list(certs)
    if path and path[-1] == anchor.certificate:
        path.pop()
    if not path:
        raise _fail("pck-chain", "no PCK certificate in the certification data")
    issuers = [*path[1:], anchor.certificate]
    try:
        for depth, (cert, issuer) in enumerate(zip(path, issuers, strict=True)):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                if cert.subject == cert.issuer:
                    raise _fail(
                        "pck-chain",
                        f"the chain ends at the root {_name(cert)}, which is not the "
                        f"{anchor.name!r} trust anchor (another key: another platform?)",
                    ) from None
                raise _fail(
                    "pck-chain",
                    f"{_name(cert)} is not issued by {_name(issuer)} of the "
                    f"{anchor.name!r} trust anchor",
                ) from None
            _check_validity(cert, now)
            _check_issuer(issuer, below=depth)
        _check_validity(anchor.certificate, now)
        leaf = path[0]
        _check_not_ca(leaf)
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm, CryptographyDeprecationWarning) as exc:
        raise _fail("pck-chain", f"malformed certificate in the chain ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise _fail("pck-chain", f"{_name(leaf)} has no ECDSA P-256 key")
    return key


def _check_validity(cert: x509.Certificate, now: datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise _fail(
            "pck-chain",
            f"{_name(cert)} is not valid at {now.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})",
        )


def _check_issuer(issuer: x509.Certificate, *, below: int) -> None:
    """``issuer`` signs a certificate with ``below`` intermediates under that one."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise _fail("pck-chain", f"{_name(issuer)} is not a CA (no basic constraints)") from None
    if not bc.ca:
        raise _fail("pck-chain", f"{_name(issuer)} is not a CA")
    if bc.path_length is not None and below > bc.path_length:
        raise _fail("pck-chain", f"{_name(issuer)} allows {bc.path_length} intermediates")


def _check_not_ca(leaf: x509.Certificate) -> None:
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if bc.ca:
        raise _fail("pck-chain", f"{_name(leaf)} is a CA certificate, not a PCK certificate")


def _name(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except ValueError:
        return "a certificate with a malformed subject"


def _check_signature(
    key: ec.EllipticCurvePublicKey, raw: bytes, data: bytes, check: str, message: str
) -> None:
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _fail(check, message) from None
