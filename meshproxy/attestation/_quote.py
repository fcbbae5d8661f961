"""The Intel SGX DCAP ECDSA quote: bytes <-> frozen dataclasses, nothing else.

Layout (all integers little-endian; signatures and keys raw big-endian r||s, x||y):
a 48-byte header, a 384-byte SGX report body, then the signature data. v3 carries the QE
report inline; v4 and v5 wrap it in certification data type 6 ("QE report certification
data") whose inner certification data is the PCK chain (type 5). Only the layout is
checked here; what the bytes prove is ``_verify``'s job. Any malformation is an
``AttestationError(check="format")`` naming the field and its offset, never anything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypedDict

from meshproxy.errors import AttestationError

HEADER_SIZE = 48
REPORT_BODY_SIZE = 384
ATT_KEY_ECDSA_P256 = 2
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
MAX_QUOTE_SIZE = 1 << 20  # real quotes are ~5 KiB; dcap-qvl caps fields at 1 MiB too

_FLAG_DEBUG = 0x02
# Spans of the report body that SGX defines as reserved (must be zero). Refusing non-zero
# bytes there keeps ``ReportBody.to_bytes`` an exact inverse of ``parse``, so the QE
# report signature can be checked over ``to_bytes()``.
_RESERVED = ((20, 32), (96, 128), (160, 192), (262, 304))


def _format_error(message: str) -> AttestationError:
    return AttestationError(f"format: {message}", check="format")


@dataclass(frozen=True)
class ReportBody:
    """``sgx_report_body_t`` (384 bytes). The KSS fields default to zero."""

    cpu_svn: bytes  # 16
    misc_select: int
    attributes: bytes  # 16: FLAGS u64 || XFRM u64
    mr_enclave: bytes  # 32
    mr_signer: bytes  # 32
    isv_prod_id: int
    isv_svn: int
    report_data: bytes  # 64
    isv_ext_prod_id: bytes = bytes(16)
    config_id: bytes = bytes(64)
    config_svn: int = 0
    isv_family_id: bytes = bytes(16)

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & _FLAG_DEBUG)

    def to_bytes(self) -> bytes:
        sizes = (
            ("cpu_svn", self.cpu_svn, 16),
            ("attributes", self.attributes, 16),
            ("mr_enclave", self.mr_enclave, 32),
            ("mr_signer", self.mr_signer, 32),
            ("report_data", self.report_data, 64),
            ("isv_ext_prod_id", self.isv_ext_prod_id, 16),
            ("config_id", self.config_id, 64),
            ("isv_family_id", self.isv_family_id, 16),
        )
        for name, value, size in sizes:
            if len(value) != size:
                raise ValueError(f"ReportBody.{name} must be {size} bytes, got {len(value)}")
        out = b"".join(
            (
                self.cpu_svn,
                struct.pack("<I", self.misc_select),
                bytes(12),
                self.isv_ext_prod_id,
                self.attributes,
                self.mr_enclave,
                bytes(32),
                self.mr_signer,
                bytes(32),
                self.config_id,
                struct.pack("<HHH", self.isv_prod_id, self.isv_svn, self.config_svn),
                bytes(42),
                self.isv_family_id,
                self.report_data,
            )
        )
        assert len(out) == REPORT_BODY_SIZE
        return out

    @classmethod
    def parse(cls, data: bytes, *, offset: int = 0) -> ReportBody:
        """Parse exactly 384 bytes; ``offset`` only places error messages in a quote."""
        if len(data) != REPORT_BODY_SIZE:
            raise _format_error(
                f"report body at offset {offset} must be {REPORT_BODY_SIZE} bytes, got {len(data)}"
            )
        for start, end in _RESERVED:
            if any(data[start:end]):
                raise _format_error(
                    f"reserved bytes of the report body at offset {offset + start} "
                    f"(length {end - start}) are not zero"
                )
        (misc_select,) = struct.unpack_from("<I", data, 16)
        isv_prod_id, isv_svn, config_svn = struct.unpack_from("<HHH", data, 256)
        return cls(
            cpu_svn=data[0:16],
            misc_select=misc_select,
            attributes=data[48:64],
            mr_enclave=data[64:96],
            mr_signer=data[128:160],
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            report_data=data[320:384],
            isv_ext_prod_id=data[32:48],
            config_id=data[192:256],
            config_svn=config_svn,
            isv_family_id=data[304:320],
        )


@dataclass(frozen=True)
class Quote:
    """A parsed SGX quote. For v4/v5, ``cert_type``/``cert_data`` are the inner (PCK) ones."""

    version: int
    att_key_type: int
    qe_svn: int
    pce_svn: int
    vendor_id: bytes
    user_data: bytes
    body: ReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes
    signed_region: bytes


class _Reader:
    """Bounds-checked cursor; every error names the field and its absolute offset."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self.pos = start
        self.end = len(data) if end is None else end

    @property
    def data(self) -> bytes:
        return self._data

    def take(self, size: int, what: str) -> bytes:
        left = self.end - self.pos
        if size > left:
            raise _format_error(
                f"{what} at offset {self.pos} needs {size} bytes, only {max(left, 0)} left"
            )
        out = self._data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    def finish(self, what: str) -> None:
        if self.pos != self.end:
            raise _format_error(
                f"{self.end - self.pos} unexpected bytes at offset {self.pos} after {what}"
            )


@dataclass(frozen=True)
class _AuthData:
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes


def _qe_part(r: _Reader) -> _AuthData:
    """QE report, its PCK signature, QE auth data, certification data (shared v3/v4)."""
    at = r.pos
    qe_report = ReportBody.parse(r.take(REPORT_BODY_SIZE, "QE report"), offset=at)
    qe_sig = r.take(64, "QE report signature")
    auth = r.take(r.u16("QE auth data size"), "QE auth data")
    cert_type = r.u16("certification data type")
    cert_data = r.take(r.u32("certification data size"), "certification data")
    return _AuthData(qe_report, qe_sig, auth, cert_type, cert_data)


@dataclass(frozen=True)
class _Header:
    """The 48-byte header SGX and TDX quotes share."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    vendor_id: bytes
    user_data: bytes


def _read_header(data: object) -> tuple[_Reader, _Header]:
    """Check that ``data`` is a quote-sized byte string; read its header (shared SGX/TDX)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _format_error(f"a quote is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_SIZE:
        raise _format_error(f"quote is {len(data)} bytes, more than {MAX_QUOTE_SIZE}")
    r = _Reader(data)
    header = _Header(
        version=r.u16("version"),
        att_key_type=r.u16("attestation key type"),
        tee_type=r.u32("TEE type"),
        qe_svn=r.u16("QE SVN"),
        pce_svn=r.u16("PCE SVN"),
        vendor_id=r.take(16, "QE vendor id"),
        user_data=r.take(20, "user data"),
    )
    return r, header


@dataclass(frozen=True)
class _SignatureData:
    signature: bytes
    attestation_key: bytes
    auth: _AuthData
    end: int  # the offset after the signature data


def _read_signature_data(r: _Reader, *, wrapped: bool, label: str = "") -> _SignatureData:
    """The signature data after the body (shared SGX/TDX): its size, the quote signature,
    the attestation key, then the QE part, bare (v3) or ``wrapped`` in certification data
    of type 6 (v4, v5, TDX). ``label`` prefixes the wrapper's error."""
    sig_size = r.u32("signature data size")
    sig_start = r.pos
    if sig_size > r.end - sig_start:
        raise _format_error(
            f"signature data size {sig_size} at offset {sig_start - 4} exceeds the "
            f"{r.end - sig_start} bytes left"
        )
    s = _Reader(r.data, sig_start, sig_start + sig_size)
    signature = s.take(64, "quote signature")
    attestation_key = s.take(64, "attestation key")
    if not wrapped:
        auth = _qe_part(s)
    else:
        outer_at = s.pos
        outer_type = s.u16("certification data type")
        if outer_type != CERT_TYPE_QE_REPORT:
            raise _format_error(
                f"{label}certification data type {outer_type} at offset {outer_at} is not "
                f"{CERT_TYPE_QE_REPORT} (QE report certification data)"
            )
        outer_size = s.u32("certification data size")
        inner = _Reader(r.data, s.pos, s.pos + outer_size)
        s.take(outer_size, "QE report certification data")
        auth = _qe_part(inner)
        inner.finish("the QE report certification data")
    s.finish("the signature data")
    return _SignatureData(signature, attestation_key, auth, s.end)


class _QuoteFields(TypedDict):
    """The fields SGX ``Quote`` and ``TdxQuote`` share, from header and signature data."""

    qe_svn: int
    pce_svn: int
    vendor_id: bytes
    user_data: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes


def _quote_fields(h: _Header, sig: _SignatureData) -> _QuoteFields:
    return _QuoteFields(
        qe_svn=h.qe_svn,
        pce_svn=h.pce_svn,
        vendor_id=h.vendor_id,
        user_data=h.user_data,
        signature=sig.signature,
        attestation_key=sig.attestation_key,
        qe_report=sig.auth.qe_report,
        qe_report_signature=sig.auth.qe_report_signature,
        qe_auth_data=sig.auth.qe_auth_data,
        cert_type=sig.auth.cert_type,
        cert_data=sig.auth.cert_data,
    )


def parse_quote(data: bytes) -> Quote:
    """Parse an SGX quote (v3; v4 and v5 with an SGX body). TDX quotes are refused."""
    r, h = _read_header(data)
    version, tee_type = h.version, h.tee_type
    if version not in (3, 4, 5):
        raise _format_error(f"unsupported quote version {version} at offset 0 (known: 3, 4, 5)")
    if h.att_key_type != ATT_KEY_ECDSA_P256:
        raise _format_error(
            f"attestation key type {h.att_key_type} at offset 2 is not supported "
            f"(only {ATT_KEY_ECDSA_P256} = ECDSA P-256)"
        )
    if tee_type == TEE_TDX and version >= 4:
        raise _format_error(
            f"TEE type 0x{tee_type:x} at offset 4 is a TDX quote; only SGX enclaves are "
            "attested here (TDX quotes go to parse_tdx_quote / verify_tdx_quote)"
        )
    if tee_type != TEE_SGX:
        raise _format_error(f"TEE type 0x{tee_type:x} at offset 4 is not SGX (0)")
    if version == 5:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        if body_type != 1 or body_size != REPORT_BODY_SIZE:
            raise _format_error(
                f"v5 body type {body_type} (size {body_size}) at offset {HEADER_SIZE} is not an "
                f"SGX report body (type 1, size {REPORT_BODY_SIZE})"
            )
    body_at = r.pos
    body = ReportBody.parse(r.take(REPORT_BODY_SIZE, "report body"), offset=body_at)
    signed_region = r.data[: r.pos]
    sig = _read_signature_data(r, wrapped=version != 3, label=f"v{version} ")
    r.pos = sig.end
    r.finish("the signature data")
    return Quote(
        version=version,
        att_key_type=h.att_key_type,
        body=body,
        signed_region=signed_region,
        **_quote_fields(h, sig),
    )


def encode_header(
    *, qe_svn: int, pce_svn: int, vendor_id: bytes, user_data: bytes, version: int = 3
) -> bytes:
    """The 48-byte SGX quote header (TEE type SGX, ECDSA P-256 attestation key)."""
    if len(vendor_id) != 16 or len(user_data) != 20:
        raise ValueError("vendor_id is 16 bytes and user_data 20 bytes")
    return struct.pack("<HHIHH", version, ATT_KEY_ECDSA_P256, TEE_SGX, qe_svn, pce_svn) + (
        vendor_id + user_data
    )


def encode_v3(
    signed_region: bytes,
    *,
    signature: bytes,
    attestation_key: bytes,
    qe_report: ReportBody,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    cert_type: int,
    cert_data: bytes,
) -> bytes:
    """A v3 quote from its signed region (header || body) and its signature data."""
    if len(signature) != 64 or len(attestation_key) != 64 or len(qe_report_signature) != 64:
        raise ValueError("signatures and the attestation key are 64 bytes each")
    sig_data = b"".join(
        (
            signature,
            attestation_key,
            qe_report.to_bytes(),
            qe_report_signature,
            struct.pack("<H", len(qe_auth_data)),
            qe_auth_data,
            struct.pack("<HI", cert_type, len(cert_data)),
            cert_data,
        )
    )
    return signed_region + struct.pack("<I", len(sig_data)) + sig_data


@dataclass(frozen=True)
class EnclaveIdentity:
    """What a quote says about the enclave: MarbleRun's package properties."""

    unique_id: bytes  # 32 bytes, MRENCLAVE
    signer_id: bytes  # 32 bytes, MRSIGNER
    product_id: int
    security_version: int
    debug: bool

    def __post_init__(self) -> None:
        if len(self.unique_id) != 32 or len(self.signer_id) != 32:
            raise ValueError("EnclaveIdentity: unique_id and signer_id are 32 bytes each")
        for name, value in (
            ("product_id", self.product_id),
            ("security_version", self.security_version),
        ):
            if not 0 <= value < 1 << 16:
                raise ValueError(f"EnclaveIdentity: {name} {value} is not a 16-bit unsigned int")

    @classmethod
    def from_body(cls, body: ReportBody) -> EnclaveIdentity:
        return cls(
            unique_id=body.mr_enclave,
            signer_id=body.mr_signer,
            product_id=body.isv_prod_id,
            security_version=body.isv_svn,
            debug=body.debug,
        )
