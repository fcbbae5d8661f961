"""Intel PCS collateral: parse it, prove it is Intel's and current, and rate a quote by it.

Theory of operation: the collateral file is the JSON object dcap-qvl uses (its
``QuoteCollateralV3``): TCB info and QE identity as the exact JSON text Intel signed,
their signatures (hex r || s), PEM issuer chains, and the root CA and PCK CRLs (hex DER).
``parse_collateral`` only checks that shape; the signed JSON is interpreted only after
its signature verified, so a flipped byte is "collateral-signature", never a parse
error. ``assess_collateral`` then checks, in order: the TCB-info and QE-identity signing
chains and signatures, and the CRLs' signatures (collateral-signature); validity windows
of all of them (collateral-expired); that no certificate of the PCK chain, of the
collateral's chains, or the root is revoked, and that a CRL covers each (revoked); then
the QE identity and TCB levels (qe-identity, tcb; see ``_tcb``). Time is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.attestation import _json
from meshproxy.attestation._chain import (
    CERT_ERRORS,
    TrustAnchor,
    chain_to,
    check_signature,
    fail,
    load_pem_chain,
    name,
    p256_key,
)
from meshproxy.attestation._quote import ReportBody
from meshproxy.attestation._tcb import (
    QeIdentity,
    TcbEvaluation,
    TcbInfo,
    evaluate_tcb,
    pck_extension,
)
from meshproxy.errors import AttestationError

MAX_COLLATERAL_SIZE = 4 << 20
_KEYS = (
    "tcb_info",
    "tcb_info_signature",
    "tcb_info_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
    "qe_identity_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "pck_crl_issuer_chain",
)
_OPTIONAL = ("pck_certificate_chain",)
_FORMAT = "collateral-format"


@dataclass(frozen=True)
class Collateral:
    """Collateral as Intel served it; nothing in it is trusted before ``assess_collateral``."""

    tcb_info: bytes  # the signed JSON text
    tcb_info_signature: bytes  # r || s
    tcb_info_issuer_chain: tuple[x509.Certificate, ...]
    qe_identity: bytes
    qe_identity_signature: bytes
    qe_identity_issuer_chain: tuple[x509.Certificate, ...]
    root_ca_crl: x509.CertificateRevocationList
    pck_crl: x509.CertificateRevocationList
    pck_crl_issuer_chain: tuple[x509.Certificate, ...]


def parse_collateral(data: bytes | str) -> Collateral:
    """The dcap-qvl collateral JSON; any malformation is ``AttestationError``
    (check "collateral-format") naming the key."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_COLLATERAL_SIZE:
        raise fail(_FORMAT, f"collateral is {len(raw)} bytes, more than {MAX_COLLATERAL_SIZE}")
    doc = _json.loads(raw, _FORMAT, "collateral")
    if not isinstance(doc, dict):
        raise fail(_FORMAT, "collateral: expected a JSON object")
    unknown = sorted(set(doc) - set(_KEYS) - set(_OPTIONAL))
    if unknown:
        raise fail(_FORMAT, f"collateral: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    missing = [k for k in _KEYS if k not in doc]
    if missing:
        raise fail(_FORMAT, f"collateral: missing key {missing[0]!r}")
    if doc.get("pck_certificate_chain") is not None:
        raise fail(
            _FORMAT,
            "collateral: pck_certificate_chain is not supported: the quote must carry its "
            "PCK chain (certification data type 5)",
        )
    return Collateral(
        tcb_info=_text(doc, "tcb_info").encode(),
        tcb_info_signature=_signature(doc, "tcb_info_signature"),
        tcb_info_issuer_chain=_chain(doc, "tcb_info_issuer_chain"),
        qe_identity=_text(doc, "qe_identity").encode(),
        qe_identity_signature=_signature(doc, "qe_identity_signature"),
        qe_identity_issuer_chain=_chain(doc, "qe_identity_issuer_chain"),
        root_ca_crl=_crl(doc, "root_ca_crl"),
        pck_crl=_crl(doc, "pck_crl"),
        pck_crl_issuer_chain=_chain(doc, "pck_crl_issuer_chain"),
    )


def _text(doc: dict[str, object], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise fail(_FORMAT, f"collateral: {key}: expected a non-empty string")
    return value


def _signature(doc: dict[str, object], key: str) -> bytes:
    text = _text(doc, key)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise fail(_FORMAT, f"collateral: {key}: not hex") from None
    if len(value) != 64:
        raise fail(_FORMAT, f"collateral: {key}: {len(value)} bytes, expected 64 (r || s)")
    return value


def _chain(doc: dict[str, object], key: str) -> tuple[x509.Certificate, ...]:
    certs = load_pem_chain(_text(doc, key).encode(), _FORMAT, f"collateral: {key}")
    if not certs:
        raise fail(_FORMAT, f"collateral: {key}: no certificate")
    return tuple(certs)


def _crl(doc: dict[str, object], key: str) -> x509.CertificateRevocationList:
    text = _text(doc, key).strip()
    try:
        if text.startswith("-----BEGIN"):
            return x509.load_pem_x509_crl(text.encode())
        return x509.load_der_x509_crl(bytes.fromhex(text))
    except CERT_ERRORS:
        raise fail(_FORMAT, f"collateral: {key}: not a CRL (hex DER or PEM)") from None


# -- verification ----------------------------------------------------------------------
def assess_collateral(
    collateral: Collateral,
    qe_report: ReportBody,
    pck_path: Sequence[x509.Certificate],
    anchor: TrustAnchor,
    now: datetime,
) -> TcbEvaluation:
    """Rate a verified quote (its QE report and verified PCK path) by ``collateral``."""
    if anchor.simulated:
        raise fail(
            "collateral-signature",
            f"collateral is Intel's, but this quote chains to the {anchor.name!r} anchor, "
            "which has no collateral",
        )
    tcb_info, qe_identity = verify_collateral(collateral, anchor, now)
    crls = (collateral.root_ca_crl, collateral.pck_crl)
    for cert in (*pck_path, anchor.certificate):
        check_not_revoked(cert, crls)
    return evaluate_tcb(qe_report, pck_extension(pck_path[0]), tcb_info, qe_identity)


def verify_collateral(
    c: Collateral, anchor: TrustAnchor, now: datetime
) -> tuple[TcbInfo, QeIdentity]:
    """Signatures, chains, CRLs and validity windows; then the signed JSON, parsed."""
    tcb_signer = _signer(c.tcb_info_issuer_chain, anchor, now, "TCB info")
    check_signature(
        tcb_signer,
        c.tcb_info_signature,
        c.tcb_info,
        "collateral-signature",
        "the TCB info is not signed by its issuer (Intel SGX TCB Signing): altered?",
    )
    qe_signer = _signer(c.qe_identity_issuer_chain, anchor, now, "QE identity")
    check_signature(
        qe_signer,
        c.qe_identity_signature,
        c.qe_identity,
        "collateral-signature",
        "the QE identity is not signed by its issuer (Intel SGX TCB Signing): altered?",
    )
    crl_path = chain_to(
        c.pck_crl_issuer_chain,
        anchor,
        now,
        check="collateral-signature",
        expired_check="collateral-expired",
        end_entity=False,
    )
    _check_crl_signature(c.root_ca_crl, anchor.certificate, "root CA CRL")
    _check_crl_signature(c.pck_crl, crl_path[0], "PCK CRL")
    tcb_info = _json.parse_tcb_info(c.tcb_info)
    qe_identity = _json.parse_qe_identity(c.qe_identity)
    _check_window("TCB info", tcb_info.issue_date, tcb_info.next_update, now)
    _check_window("QE identity", qe_identity.issue_date, qe_identity.next_update, now)
    for crl, what in ((c.root_ca_crl, "root CA CRL"), (c.pck_crl, "PCK CRL")):
        next_update = crl.next_update_utc
        if next_update is None:
            raise fail("collateral-format", f"the {what} has no next update time")
        _check_window(what, crl.last_update_utc, next_update, now)
    crls = (c.root_ca_crl, c.pck_crl)
    for chain in (c.tcb_info_issuer_chain, c.qe_identity_issuer_chain, c.pck_crl_issuer_chain):
        for cert in chain:
            if cert != anchor.certificate:
                check_not_revoked(cert, crls)
    return tcb_info, qe_identity


def _signer(
    chain: Sequence[x509.Certificate], anchor: TrustAnchor, now: datetime, what: str
) -> ec.EllipticCurvePublicKey:
    try:
        path = chain_to(
            chain, anchor, now, check="collateral-signature", expired_check="collateral-expired"
        )
        return p256_key(path[0], "collateral-signature")
    except AttestationError as exc:
        detail = str(exc).removeprefix(f"{exc.check}: ")
        raise fail(exc.check, f"the {what} issuer chain: {detail}") from None


def _check_crl_signature(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str
) -> None:
    try:
        key = issuer.public_key()
        valid = (
            crl.issuer == issuer.subject
            and isinstance(key, ec.EllipticCurvePublicKey)
            and crl.is_signature_valid(key)
        )
    except CERT_ERRORS:
        valid = False
    if not valid:
        raise fail("collateral-signature", f"the {what} is not signed by {name(issuer)}")


def _check_window(what: str, issued: datetime, next_update: datetime, now: datetime) -> None:
    if now < issued:
        raise fail(
            "collateral-expired",
            f"the {what} is issued {issued.isoformat()}, after {now.isoformat()}: "
            "is the verification time right?",
        )
    if now > next_update:
        raise fail(
            "collateral-expired",
            f"the {what} expired at {next_update.isoformat()} (now {now.isoformat()}): "
            "fetch current collateral",
        )


def check_not_revoked(
    cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList]
) -> None:
    """Fail closed: a certificate no CRL of the collateral speaks for is not accepted."""
    for crl in crls:
        if crl.issuer == cert.issuer:
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise fail(
                    "revoked",
                    f"{name(cert)} (serial {cert.serial_number:x}) is revoked by its issuer",
                )
            return
    raise fail(
        "revoked",
        f"the collateral has no CRL from the issuer of {name(cert)}, so its revocation "
        "cannot be checked (collateral for another PCK CA?)",
    )
