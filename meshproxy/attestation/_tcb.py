"""TCB levels: what Intel's signed TCB info and QE identity say about one platform.

Rules (Intel's QVL and dcap-qvl agree on them): the platform's TCB level is the first
entry of ``tcbLevels`` whose 16 SGX component SVNs are each <= the PCK certificate's and
whose PCESVN is <= the PCK certificate's (the PCK certificate's values, not the report's
CPUSVN). The QE's level is the first entry whose ISVSVN is <= the QE report's. The two
statuses converge: the worse one wins, except that an out-of-date QE on a platform that
needs configuration gives OutOfDateConfigurationNeeded; advisories are the union,
platform first. No matching level, Revoked, or collateral for another platform fails
with check "tcb"; a QE that is not the one Intel's identity describes fails "qe-identity".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from meshproxy.attestation import _der
from meshproxy.attestation._chain import fail
from meshproxy.attestation._quote import ReportBody

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
# Severity order (dcap-qvl ``TcbStatus``; Intel QvE ``sgx_ql_qv_result_t``).
STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True)
class PckExtension:
    """Intel's SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1)."""

    ppid: bytes
    tcb_components: tuple[int, ...]  # 16 component SVNs (.2.1 - .2.16)
    pce_svn: int  # .2.17
    cpu_svn: bytes  # .2.18, 16 bytes
    pce_id: bytes  # 2 bytes
    fmspc: bytes  # 6 bytes
    sgx_type: int


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    status: str
    date: str
    advisories: tuple[str, ...]
    tdx_components: tuple[int, ...] = ()


@dataclass(frozen=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeTcbLevel:
    isv_svn: int
    status: str
    date: str
    advisories: tuple[str, ...]


@dataclass(frozen=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    levels: tuple[QeTcbLevel, ...]


@dataclass(frozen=True)
class TcbEvaluation:
    """The converged TCB status and advisories, and the two levels they came from."""

    status: str
    advisories: tuple[str, ...]
    platform: TcbLevel
    qe: QeTcbLevel
    pck: PckExtension


def pck_extension(cert: x509.Certificate) -> PckExtension:
    """Parse the SGX extension of a PCK certificate; anything missing fails "tcb"."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
        if not isinstance(ext.value, x509.UnrecognizedExtension):
            raise ValueError("unexpected extension type")
        return _parse_sgx_extension(ext.value.value)
    except x509.ExtensionNotFound:
        raise fail("tcb", "the PCK certificate has no SGX extension (FMSPC, TCB)") from None
    except (ValueError, TypeError) as exc:
        raise fail("tcb", f"the PCK certificate's SGX extension is malformed ({exc})") from None


def _fields(seq: _der.Tlv, prefix: str) -> dict[str, _der.Tlv]:
    out: dict[str, _der.Tlv] = {}
    for item in seq.children():
        parts = _der.expect(item, _der.SEQUENCE, "SGX extension entry").children()
        if len(parts) != 2:
            raise _der.DerError(f"entry at offset {item.start} has {len(parts)} parts, not 2")
        oid = _der.oid_text(_der.expect(parts[0], _der.OID, "entry id").value)
        if oid.startswith(prefix):
            out[oid.removeprefix(prefix)] = parts[1]
    return out


def _octets(tlv: _der.Tlv | None, size: int | None, what: str) -> bytes:
    if tlv is None:
        raise _der.DerError(f"{what} is missing")
    value = _der.expect(tlv, _der.OCTET_STRING, what).value
    if size is not None and len(value) != size:
        raise _der.DerError(f"{what} is {len(value)} bytes, not {size}")
    return value


def _int(tlv: _der.Tlv | None, limit: int, what: str) -> int:
    if tlv is None:
        raise _der.DerError(f"{what} is missing")
    value = _der.integer(tlv, what)
    if not 0 <= value < limit:
        raise _der.DerError(f"{what} {value} is out of range")
    return value


def _parse_sgx_extension(raw: bytes) -> PckExtension:
    base = SGX_EXTENSION_OID + "."
    top = _fields(_der.expect(_der.read_all(raw), _der.SEQUENCE, "SGX extension"), base)
    tcb_tlv = top.get("2")
    if tcb_tlv is None:
        raise _der.DerError("the TCB entry (.2) is missing")
    tcb = _fields(_der.expect(tcb_tlv, _der.SEQUENCE, "TCB"), base + "2.")
    return PckExtension(
        ppid=_octets(top.get("1"), 16, "PPID"),
        tcb_components=tuple(
            _int(tcb.get(str(i)), 256, f"TCB component {i}") for i in range(1, 17)
        ),
        pce_svn=_int(tcb.get("17"), 1 << 16, "PCESVN"),
        cpu_svn=_octets(tcb.get("18"), 16, "CPUSVN"),
        pce_id=_octets(top.get("3"), 2, "PCE-ID"),
        fmspc=_octets(top.get("4"), 6, "FMSPC"),
        sgx_type=_int(top.get("5"), 1 << 8, "SGX type"),
    )


# -- evaluation ------------------------------------------------------------------------
def check_qe_identity(qe: ReportBody, identity: QeIdentity) -> QeTcbLevel:
    if identity.id != "QE" or identity.version != 2:
        raise fail(
            "tcb",
            f"the QE identity is {identity.id!r} version {identity.version}, not the SGX "
            "quoting enclave's ('QE' version 2)",
        )
    if qe.mr_signer != identity.mrsigner:
        raise fail(
            "qe-identity",
            f"the QE's MRSIGNER {qe.mr_signer.hex()} is not Intel's {identity.mrsigner.hex()}",
        )
    if qe.isv_prod_id != identity.isv_prod_id:
        raise fail(
            "qe-identity",
            f"the QE's ISVPRODID {qe.isv_prod_id} is not {identity.isv_prod_id}",
        )
    mask = identity.miscselect_mask
    if qe.misc_select & mask != identity.miscselect & mask:
        raise fail("qe-identity", f"the QE's MISCSELECT 0x{qe.misc_select:08x} does not match")
    masked = bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask, strict=True))
    want = bytes(a & m for a, m in zip(identity.attributes, identity.attributes_mask, strict=True))
    if masked != want:
        raise fail("qe-identity", f"the QE's ATTRIBUTES {qe.attributes.hex()} do not match")
    for level in identity.levels:
        if qe.isv_svn >= level.isv_svn:
            return level
    raise fail("tcb", f"the QE's ISVSVN {qe.isv_svn} is below every TCB level of its identity")


def platform_level(info: TcbInfo, pck: PckExtension) -> TcbLevel:
    if info.id != "SGX" or info.version not in (2, 3):
        raise fail("tcb", f"the TCB info is {info.id!r} version {info.version}, not SGX (2 or 3)")
    if info.tcb_type != 0:
        raise fail("tcb", f"TCB type {info.tcb_type} is not supported (only 0)")
    if info.fmspc != pck.fmspc:
        raise fail(
            "tcb",
            f"the TCB info is for FMSPC {info.fmspc.hex().upper()}, but this platform's PCK "
            f"certificate says {pck.fmspc.hex().upper()}",
        )
    if info.pce_id != pck.pce_id:
        raise fail(
            "tcb",
            f"the TCB info is for PCE-ID {info.pce_id.hex()}, the PCK says {pck.pce_id.hex()}",
        )
    for level in info.levels:
        if len(level.sgx_components) != len(pck.tcb_components):
            raise fail("tcb", "a TCB level does not list 16 SGX components")
        if pck.pce_svn >= level.pce_svn and all(
            have >= need
            for have, need in zip(pck.tcb_components, level.sgx_components, strict=True)
        ):
            return level
    raise fail(
        "tcb",
        f"no TCB level matches this platform (components {list(pck.tcb_components)}, "
        f"PCESVN {pck.pce_svn}): its TCB is older than any Intel still lists",
    )


def converge(platform: str, qe: str) -> str:
    if qe == "OutOfDate" and platform in (
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
    ):
        return "OutOfDateConfigurationNeeded"
    return max(platform, qe, key=STATUSES.index)


def evaluate_tcb(
    qe_report: ReportBody, pck: PckExtension, info: TcbInfo, identity: QeIdentity
) -> TcbEvaluation:
    qe = check_qe_identity(qe_report, identity)
    platform = platform_level(info, pck)
    status = converge(platform.status, qe.status)
    if status == "Revoked":
        raise fail("tcb", "the platform's TCB level is Revoked by Intel")
    advisories = tuple(dict.fromkeys((*platform.advisories, *qe.advisories)))
    return TcbEvaluation(status, advisories, platform, qe, pck)
