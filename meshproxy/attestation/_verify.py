"""One quote verifier for hardware and simulation; only the trust anchor differs.

The checks run in a fixed order and the first failure is an ``AttestationError`` whose
``check`` names it: format, vendor, pck-chain, qe-report-signature, qe-identity,
attestation-key-binding, quote-signature; then, when collateral is given, the collateral
checks (collateral-signature, collateral-expired, revoked, qe-identity, tcb; see
``_collateral``). Time is an argument; nothing here reads a clock, a file or the network
(the Intel root is package data, read on first use). Without collateral a hardware quote's
TCB status is "NotEvaluated" and a simulated one's "Simulated"; a package policy decides
what it accepts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.attestation._chain import (
    INTEL_QE_VENDOR_ID,
    TrustAnchor,
    chain_to,
    check_signature,
    fail,
    intel_anchor,
    load_pem_chain,
    p256_key,
    select_anchors,
)
from meshproxy.attestation._platform import SIM_VENDOR_ID, SimulationPlatform
from meshproxy.attestation._quote import (
    CERT_TYPE_PCK_CHAIN,
    EnclaveIdentity,
    ReportBody,
    parse_quote,
)
from meshproxy.errors import AttestationError

if TYPE_CHECKING:  # collateral is loaded only to evaluate some (a quote's TCB)
    from meshproxy.attestation._collateral import Collateral

__all__ = [
    "INTEL_QE_VENDOR_ID",
    "EvidenceCache",
    "TrustAnchor",
    "VerifiedQuote",
    "intel_anchor",
    "simulation_anchor",
    "verify_quote",
]


@dataclass(frozen=True)
class VerifiedQuote:
    identity: EnclaveIdentity
    report_data: bytes
    simulated: bool
    anchor: str
    tcb_status: str
    advisories: tuple[str, ...] = ()


def simulation_anchor(platform: SimulationPlatform) -> TrustAnchor:
    return TrustAnchor("simulation", platform.root_certificate, True, SIM_VENDOR_ID)


class SignedEvidence(Protocol):
    """What SGX and TDX quotes share: the QE part, the PCK chain, the signed region."""

    @property
    def vendor_id(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...
    @property
    def attestation_key(self) -> bytes: ...
    @property
    def qe_report(self) -> ReportBody: ...
    @property
    def qe_report_signature(self) -> bytes: ...
    @property
    def qe_auth_data(self) -> bytes: ...
    @property
    def cert_type(self) -> int: ...
    @property
    def cert_data(self) -> bytes: ...
    @property
    def signed_region(self) -> bytes: ...


class EvidenceCache:
    """Checks that hold for every quote of one platform, remembered by content digest.

    A platform's quotes carry the same PCK chain, and (on hardware, where the attestation
    key lives as long as the quoting enclave) the same QE report and signature: a verifier
    that sees many quotes (the coordinator) checks those once. A cached chain is checked
    again against ``now`` (its validity window) and the anchors given, so only signature
    checks are skipped, never a policy. Bounded: the oldest entries go first.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        # digest of (anchor, chain) -> (anchor, path, valid from, valid until)
        self._chains: dict[bytes, tuple[TrustAnchor, list[x509.Certificate], datetime, datetime]]
        self._chains = {}
        self._qe_reports: dict[bytes, None] = {}  # digests of (PCK leaf, report, signature)
        self._anchors: dict[int, tuple[x509.Certificate, bytes]] = {}

    def __repr__(self) -> str:
        return f"<EvidenceCache chains={len(self._chains)} qe_reports={len(self._qe_reports)}>"

    def _fingerprint(self, cert: x509.Certificate) -> bytes:
        """An anchor's SHA-256 fingerprint (anchors are few and long-lived)."""
        hit = self._anchors.get(id(cert))
        if hit is None or hit[0] is not cert:
            hit = (cert, cert.fingerprint(hashes.SHA256()))
            self._remember(self._anchors, id(cert), hit)
        return hit[1]

    def _remember(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        if len(table) >= self.size:
            del table[next(iter(table))]
        table[key] = value


def verify_quote(
    quote: bytes,
    anchors: Sequence[TrustAnchor],
    *,
    now: datetime,
    collateral: Collateral | None = None,
    cache: EvidenceCache | None = None,
) -> VerifiedQuote:
    if now.tzinfo is None:
        raise ValueError("verify_quote: now must be timezone-aware")
    q = parse_quote(quote)
    anchor, pck_path = verify_signed_evidence(q, anchors, now, cache)
    status = "Simulated" if anchor.simulated else "NotEvaluated"
    advisories: tuple[str, ...] = ()
    if collateral is not None:
        from meshproxy.attestation._collateral import assess_collateral

        tcb = assess_collateral(collateral, q.qe_report, pck_path, anchor, now)
        status, advisories = tcb.status, tcb.advisories
    return VerifiedQuote(
        identity=EnclaveIdentity.from_body(q.body),
        report_data=q.body.report_data,
        simulated=anchor.simulated,
        anchor=anchor.name,
        tcb_status=status,
        advisories=advisories,
    )


def verify_signed_evidence(
    q: SignedEvidence,
    anchors: Sequence[TrustAnchor],
    now: datetime,
    cache: EvidenceCache | None = None,
) -> tuple[TrustAnchor, list[x509.Certificate]]:
    """Anchor, PCK chain, QE report, attestation-key binding, quote signature. Returns
    the anchor and the verified PCK path (leaf first, without the anchor)."""
    candidates = select_anchors(q.vendor_id, anchors)
    anchor, path = _cached_pck_chain(q, candidates, now, cache)
    report = q.qe_report.to_bytes()
    seen = hashlib.sha256(path[0].fingerprint(hashes.SHA256()) + report + q.qe_report_signature)
    if cache is None or seen.digest() not in cache._qe_reports:
        check_signature(
            p256_key(path[0], "pck-chain"),
            q.qe_report_signature,
            report,
            "qe-report-signature",
            "the QE report is not signed by the PCK certificate's key",
        )
        if cache is not None:
            cache._remember(cache._qe_reports, seen.digest(), None)
    if q.qe_report.debug:
        raise fail("qe-identity", "the quoting enclave is a debug enclave")
    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report.report_data != expected:
        raise fail(
            "attestation-key-binding",
            "the QE report data is not SHA-256(attestation key || QE auth data) || zeros",
        )
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + q.attestation_key
        )
    except ValueError:
        raise fail("quote-signature", "the attestation key is not a P-256 point") from None
    check_signature(
        att_key,
        q.signature,
        q.signed_region,
        "quote-signature",
        "the quote is not signed by its attestation key (header or report body altered)",
    )
    return anchor, path


def _cached_pck_chain(
    q: SignedEvidence, anchors: Sequence[TrustAnchor], now: datetime, cache: EvidenceCache | None
) -> tuple[TrustAnchor, list[x509.Certificate]]:
    if cache is None:
        return _verify_pck_chain(q, anchors, now)
    digest = hashlib.sha256(q.cert_data)
    for a in anchors:
        digest.update(cache._fingerprint(a.certificate))
    key = digest.digest()
    hit = cache._chains.get(key)
    if hit is not None and hit[2] <= now <= hit[3]:
        return hit[0], hit[1]
    anchor, path = _verify_pck_chain(q, anchors, now)  # checks validity at now, too
    window = [*path, anchor.certificate]
    start = max(c.not_valid_before_utc for c in window)
    end = min(c.not_valid_after_utc for c in window)
    cache._remember(cache._chains, key, (anchor, path, start, end))
    return anchor, path


def _verify_pck_chain(
    q: SignedEvidence, anchors: Sequence[TrustAnchor], now: datetime
) -> tuple[TrustAnchor, list[x509.Certificate]]:
    if q.cert_type != CERT_TYPE_PCK_CHAIN:
        raise fail(
            "pck-chain",
            f"certification data type {q.cert_type} is not a PCK certificate chain "
            f"({CERT_TYPE_PCK_CHAIN})",
        )
    certs = load_pem_chain(q.cert_data, "pck-chain", "the certification data")
    errors: list[str] = []
    for anchor in anchors:
        try:
            path = chain_to(certs, anchor, now, check="pck-chain")
            p256_key(path[0], "pck-chain")
        except AttestationError as exc:
            errors.append(str(exc).removeprefix("pck-chain: "))
        else:
            return anchor, path
    raise fail("pck-chain", "; ".join(errors))
