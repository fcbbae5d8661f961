"""Intel TDX quotes (v4: TD report 1.0; v5: TD report 1.0 or 1.5): parse and verify.

Separate from the SGX path on purpose: a TD is attested by MRTD and RTMRs, not by an
enclave identity, so no caller can mistake one for the other. The layout is
``sgx_quote_4.h``/``sgx_quote_5.h``: a 48-byte header (TEE type 0x81); v5 then a u16 body
type and u32 body size; the TD report (584 bytes, or 648 for 1.5); then the v4 signature
data (quote signature, attestation key, certification data type 6 wrapping the QE report,
its PCK signature, QE auth data and the PCK chain). The quote signature covers header and
body (632 bytes for v4, 702 for v5 with a 1.5 body). Verification is the SGX one: PCK
chain to the anchor, QE report signed by the PCK key, attestation key bound by the QE
report, quote signed by the attestation key. TCB levels need TDX collateral and are not
evaluated: ``tcb_status`` is "NotEvaluated".

Readers that fill a fixed-size buffer (tappd, configfs-tsm tools) leave zero padding after
the quote; zeros after the signature data are accepted, anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from meshproxy.attestation._chain import TrustAnchor
from meshproxy.attestation._quote import (
    ATT_KEY_ECDSA_P256,
    HEADER_SIZE,
    TEE_TDX,
    ReportBody,
    _format_error,
    _quote_fields,
    _read_header,
    _read_signature_data,
)
from meshproxy.attestation._verify import verify_signed_evidence

TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
_BODY_TYPES = {2: TD_REPORT10_SIZE, 3: TD_REPORT15_SIZE}
_TD_DEBUG = 0x01  # TDATTRIBUTES bit 0: TUD.DEBUG


@dataclass(frozen=True)
class TdReport:
    """``sgx_report2_body_t`` (TD report 1.0), with the 1.5 additions when present."""

    tee_tcb_svn: bytes  # 16
    mr_seam: bytes  # 48
    mr_signer_seam: bytes  # 48
    seam_attributes: bytes  # 8
    td_attributes: bytes  # 8
    xfam: bytes  # 8
    mr_td: bytes  # 48
    mr_config_id: bytes  # 48
    mr_owner: bytes  # 48
    mr_owner_config: bytes  # 48
    rtmrs: tuple[bytes, bytes, bytes, bytes]  # 4 x 48
    report_data: bytes  # 64
    tee_tcb_svn2: bytes | None = None  # 16, TD report 1.5
    mr_service_td: bytes | None = None  # 48, TD report 1.5

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & _TD_DEBUG)

    @classmethod
    def parse(cls, data: bytes) -> TdReport:
        if len(data) not in (TD_REPORT10_SIZE, TD_REPORT15_SIZE):
            raise _format_error(f"a TD report is 584 or 648 bytes, got {len(data)}")

        def at(offset: int, size: int) -> bytes:
            return data[offset : offset + size]

        rtmrs = (at(328, 48), at(376, 48), at(424, 48), at(472, 48))
        long = len(data) == TD_REPORT15_SIZE
        return cls(
            tee_tcb_svn=at(0, 16),
            mr_seam=at(16, 48),
            mr_signer_seam=at(64, 48),
            seam_attributes=at(112, 8),
            td_attributes=at(120, 8),
            xfam=at(128, 8),
            mr_td=at(136, 48),
            mr_config_id=at(184, 48),
            mr_owner=at(232, 48),
            mr_owner_config=at(280, 48),
            rtmrs=rtmrs,
            report_data=at(520, 64),
            tee_tcb_svn2=at(584, 16) if long else None,
            mr_service_td=at(600, 48) if long else None,
        )


@dataclass(frozen=True)
class TdxQuote:
    version: int
    qe_svn: int
    pce_svn: int
    vendor_id: bytes
    user_data: bytes
    body: TdReport
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes
    signed_region: bytes


@dataclass(frozen=True)
class VerifiedTdxQuote:
    """What a verified TDX quote says about the TD (hex-free: raw measurement bytes)."""

    version: int
    mr_td: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    mr_seam: bytes
    tee_tcb_svn: bytes
    td_attributes: bytes
    xfam: bytes
    debug: bool
    anchor: str
    tcb_status: str = "NotEvaluated"


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote (v4 or v5); malformations are ``AttestationError("format")``."""
    r, h = _read_header(data)
    version = h.version
    if h.tee_type != TEE_TDX:
        raise _format_error(
            f"TEE type 0x{h.tee_type:x} at offset 4 is not TDX (0x81); SGX quotes go to parse_quote"
        )
    if version not in (4, 5):
        raise _format_error(f"TDX quote version {version} at offset 0 is not 4 or 5")
    if h.att_key_type != ATT_KEY_ECDSA_P256:
        raise _format_error(f"attestation key type {h.att_key_type} at offset 2 is not supported")
    body_size = TD_REPORT10_SIZE
    if version == 5:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        if _BODY_TYPES.get(body_type) != body_size:
            raise _format_error(
                f"v5 body type {body_type} (size {body_size}) at offset {HEADER_SIZE} is not a "
                "TD report (type 2, 584 bytes; or type 3, 648 bytes)"
            )
    body = TdReport.parse(r.take(body_size, "TD report"))
    signed_region = r.data[: r.pos]
    sig = _read_signature_data(r, wrapped=True)
    if any(r.data[sig.end :]):
        raise _format_error(
            f"{len(r.data) - sig.end} bytes after the signature data at offset {sig.end} are "
            "not zero padding"
        )
    return TdxQuote(
        version=version, body=body, signed_region=signed_region, **_quote_fields(h, sig)
    )


def verify_tdx_quote(
    quote: bytes, anchors: Sequence[TrustAnchor], *, now: datetime
) -> VerifiedTdxQuote:
    """Verify a TDX quote's signatures and PCK chain; return the TD's measurements."""
    if now.tzinfo is None:
        raise ValueError("verify_tdx_quote: now must be timezone-aware")
    q = parse_tdx_quote(quote)
    anchor, _ = verify_signed_evidence(q, anchors, now)
    b = q.body
    return VerifiedTdxQuote(
        version=q.version,
        mr_td=b.mr_td,
        rtmrs=b.rtmrs,
        report_data=b.report_data,
        mr_config_id=b.mr_config_id,
        mr_owner=b.mr_owner,
        mr_owner_config=b.mr_owner_config,
        mr_seam=b.mr_seam,
        tee_tcb_svn=b.tee_tcb_svn,
        td_attributes=b.td_attributes,
        xfam=b.xfam,
        debug=b.debug,
        anchor=anchor.name,
    )
