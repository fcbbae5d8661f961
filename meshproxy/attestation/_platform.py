"""An honest simulated SGX platform, and the quote provider built on it.

Theory of operation: simulation changes who vouches, not what is checked. A platform
directory holds a P-256 "meshproxy SIMULATION Root" certificate, a PCK-like leaf key and
certificate under it, a Quoting Enclave identity and a 32-byte platform secret. A quote is
a real DCAP v3 quote: the QE report is signed by the PCK key and binds a fresh attestation
key, which signs header || body. The QE vendor id is ``SIM_VENDOR_ID``, never Intel's, so
a verifier that trusts only Intel refuses simulated quotes at the first check. The root's
private key is discarded once the PCK certificate is issued: nothing on disk can mint a
second PCK for this platform.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from meshproxy._redact import Secret
from meshproxy.attestation._quote import (
    CERT_TYPE_PCK_CHAIN,
    EnclaveIdentity,
    ReportBody,
    encode_header,
    encode_v3,
)
from meshproxy.config import Node, parse_document
from meshproxy.errors import AttestationError, ConfigError

SIM_VENDOR_ID = b"MESHPROXY-SIM!!!"
ROOT_COMMON_NAME = "meshproxy SIMULATION Root"
PCK_COMMON_NAME = "meshproxy SIMULATION PCK"

_ROOT, _PCK, _PCK_KEY, _QE, _SECRET = "root.pem", "pck.pem", "pck-key.pem", "qe.json", "secret"
_LIFETIME = timedelta(days=3650)
_SKEW = timedelta(hours=1)
_QE_AUTH_DATA = bytes(range(32))  # what every real Intel QE sends
# FLAGS: INITTED | MODE64BIT (| DEBUG); XFRM: x87 | SSE.
_FLAGS, _FLAG_DEBUG, _XFRM = 0x05, 0x02, 0x03


def default_platform_dir() -> Path:
    explicit = os.environ.get("MESHPROXY_SIM_PLATFORM")
    if explicit:
        return Path(explicit)
    data_home = os.environ.get("XDG_DATA_HOME")
    # The XDG spec says to ignore a relative XDG_DATA_HOME.
    base = Path(data_home) if data_home and Path(data_home).is_absolute() else None
    base = base or Path.home() / ".local" / "share"
    return base / "meshproxy" / "sim-platform"


def _raw_signature(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public(key: ec.EllipticCurvePublicKey) -> bytes:
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


class SimulationPlatform:
    """One simulated machine. Create with ``load_or_create``; never reads the clock."""

    directory: Path
    root_certificate: x509.Certificate
    pck_certificate: x509.Certificate
    qe_identity: EnclaveIdentity

    def __init__(
        self,
        directory: Path,
        root_certificate: x509.Certificate,
        pck_certificate: x509.Certificate,
        pck_key: ec.EllipticCurvePrivateKey,
        qe_identity: EnclaveIdentity,
        secret: Secret,
    ) -> None:
        self.directory = directory
        self.root_certificate = root_certificate
        self.pck_certificate = pck_certificate
        self.qe_identity = qe_identity
        self._pck_key = pck_key
        self._secret = secret
        pem = serialization.Encoding.PEM
        self._chain_pem = pck_certificate.public_bytes(pem) + root_certificate.public_bytes(pem)
        # The quoting enclave's attestation key and its PCK-signed QE report: made once per
        # process, as a hardware QE makes its key once and reuses it for every quote.
        self._qe_part: tuple[ec.EllipticCurvePrivateKey, bytes, ReportBody, bytes] | None = None

    def __repr__(self) -> str:
        return f"SimulationPlatform({str(self.directory)!r})"

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def load_or_create(cls, directory: Path, *, now: datetime) -> SimulationPlatform:
        directory = Path(directory)
        if directory.is_dir() and any(directory.iterdir()):
            return cls.load(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        import shutil  # creating a platform is rare: not loaded to load one
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=directory.parent))
        try:
            _write_new_platform(tmp, now)
            try:
                # Atomic; replaces an empty directory. A concurrent creator that won
                # leaves a non-empty one, which we then load.
                tmp.rename(directory)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ConfigError(
                        f"{directory}: cannot create the simulation platform: {exc.strerror}"
                    ) from None
            else:
                _fsync_dir(directory.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> SimulationPlatform:
        """Load an existing platform; a missing or damaged one is a ``ConfigError``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(
                f"{directory}: no simulation platform here (it is created by the first "
                "simulated enclave or coordinator on this machine)"
            )
        root = _load_cert(directory / _ROOT)
        pck = _load_cert(directory / _PCK)
        key = _load_pck_key(directory / _PCK_KEY)
        if _raw_public(key.public_key()) != _pck_public(pck, directory / _PCK):
            raise ConfigError(f"{directory / _PCK_KEY}: does not match {_PCK}")
        secret = _read_private(directory / _SECRET)
        if len(secret) != 32:
            raise ConfigError(f"{directory / _SECRET}: expected 32 bytes, got {len(secret)}")
        qe = _load_qe(directory / _QE)
        return cls(directory, root, pck, key, qe, Secret(secret))

    # -- what the platform does -----------------------------------------------------------
    def quote(self, report_data: bytes, identity: EnclaveIdentity) -> bytes:
        if len(report_data) > 64:
            raise AttestationError(
                f"report-data: {len(report_data)} bytes of report data, at most 64 fit",
                check="report-data",
            )
        flags = _FLAGS | (_FLAG_DEBUG if identity.debug else 0)
        attributes = flags.to_bytes(8, "little") + _XFRM.to_bytes(8, "little")
        body = ReportBody(
            cpu_svn=bytes(16),
            misc_select=0,
            attributes=attributes,
            mr_enclave=identity.unique_id,
            mr_signer=identity.signer_id,
            isv_prod_id=identity.product_id,
            isv_svn=identity.security_version,
            report_data=bytes(report_data).ljust(64, b"\0"),
        )
        att_key, att_pub, qe_report, qe_sig = self._quoting_enclave()
        qe = self.qe_identity
        header = encode_header(
            qe_svn=qe.security_version,
            pce_svn=1,
            vendor_id=SIM_VENDOR_ID,
            user_data=self._derive(b"qe-id", 16) + bytes(4),
        )
        signed_region = header + body.to_bytes()
        signature = att_key.sign(signed_region, ec.ECDSA(hashes.SHA256()))
        return encode_v3(
            signed_region,
            signature=_raw_signature(signature),
            attestation_key=att_pub,
            qe_report=qe_report,
            qe_report_signature=_raw_signature(qe_sig),
            qe_auth_data=_QE_AUTH_DATA,
            cert_type=CERT_TYPE_PCK_CHAIN,
            cert_data=self._chain_pem,
        )

    def _quoting_enclave(self) -> tuple[ec.EllipticCurvePrivateKey, bytes, ReportBody, bytes]:
        if self._qe_part is None:
            att_key = ec.generate_private_key(ec.SECP256R1())
            att_pub = _raw_public(att_key.public_key())
            qe = self.qe_identity
            qe_report = ReportBody(
                cpu_svn=bytes(16),
                misc_select=0,
                attributes=_FLAGS.to_bytes(8, "little") + _XFRM.to_bytes(8, "little"),
                mr_enclave=qe.unique_id,
                mr_signer=qe.signer_id,
                isv_prod_id=qe.product_id,
                isv_svn=qe.security_version,
                report_data=hashlib.sha256(att_pub + _QE_AUTH_DATA).digest() + bytes(32),
            )
            qe_sig = self._pck_key.sign(qe_report.to_bytes(), ec.ECDSA(hashes.SHA256()))
            self._qe_part = (att_key, att_pub, qe_report, qe_sig)
        return self._qe_part

    def sealing_key(self, label: bytes) -> Secret:
        return Secret(self._derive(b"sealing:" + label, 32))

    def _derive(self, info: bytes, length: int) -> bytes:
        hkdf = HKDF(hashes.SHA256(), length, salt=b"meshproxy-sim-platform/v1", info=info)
        return hkdf.derive(self._secret.reveal())


class QuoteProvider(Protocol):
    """Who makes quotes for this process: simulation, gramine, occlum."""

    name: str
    simulated: bool

    def get_quote(self, report_data: bytes) -> bytes: ...


class SimulationProvider:
    """Quotes from a ``SimulationPlatform`` for one enclave identity."""

    name: str = "simulation"
    simulated: bool = True

    def __init__(self, platform: SimulationPlatform, identity: EnclaveIdentity) -> None:
        self.platform = platform
        self.identity = identity

    def get_quote(self, report_data: bytes) -> bytes:
        return self.platform.quote(report_data, self.identity)


# -- files ------------------------------------------------------------------------------
def _write_new_platform(directory: Path, now: datetime) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    pck_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate(ROOT_COMMON_NAME, root_key.public_key(), root_key, None, now, ca=True)
    pck = _certificate(PCK_COMMON_NAME, pck_key.public_key(), root_key, root, now, ca=False)
    pem = serialization.Encoding.PEM
    _write(directory / _ROOT, root.public_bytes(pem), 0o644)
    _write(directory / _PCK, pck.public_bytes(pem), 0o644)
    key_pem = pck_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(directory / _PCK_KEY, key_pem, 0o600)
    _write(directory / _SECRET, os.urandom(32), 0o600)
    qe = {
        "unique_id": os.urandom(32).hex(),
        "signer_id": hashlib.sha256(b"meshproxy-sim-qe-signer" + os.urandom(32)).hexdigest(),
        "product_id": 1,
        "security_version": 1,
    }
    _write(directory / _QE, json.dumps(qe, indent=2).encode() + b"\n", 0o644)
    _fsync_dir(directory)


def _certificate(
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    now: datetime,
    *,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshproxy SIMULATION (no hardware)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    issuer_public = issuer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
        .add_extension(usage, True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: missing; the simulation platform is incomplete (remove "
            f"{path.parent} to create a new one)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _read_private(path: Path) -> bytes:
    data = _read(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path}: permissions {mode:04o} are too open; run chmod 600 {path}")
    return data


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM certificate ({exc})") from None


def _load_pck_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_private(path), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{path}: the PCK key must be ECDSA P-256")
    return key


def _pck_public(cert: x509.Certificate, path: Path) -> bytes:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{path}: the PCK certificate's key must be ECDSA P-256")
    return _raw_public(key)


def _load_qe(path: Path) -> EnclaveIdentity:
    node = Node(parse_document(_read(path), str(path)), str(path), "")
    fields = node.mapping(
        ("unique_id", "signer_id", "product_id", "security_version"),
        required=("unique_id", "signer_id", "product_id", "security_version"),
    )
    try:
        return EnclaveIdentity(
            unique_id=bytes.fromhex(fields["unique_id"].str()),
            signer_id=bytes.fromhex(fields["signer_id"].str()),
            product_id=fields["product_id"].int(minimum=0, maximum=0xFFFF),
            security_version=fields["security_version"].int(minimum=0, maximum=0xFFFF),
            debug=False,
        )
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
