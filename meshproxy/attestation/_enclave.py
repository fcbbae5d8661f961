"""Enclave descriptions, their honest simulated measurement, and signing (EGo's ``ego sign``).

UniqueID (MRENCLAVE's stand-in) is SHA-256 over a length-prefixed, domain-separated
encoding of name, ProductID, SecurityVersion, debug and the sorted (file, SHA-256) list.
The entry ``meshproxy`` stands for the installed meshproxy package: one digest over every
code file under it, its bytecode and the trust anchors shipped with it (``_tree``).
SignerID is SHA-256 of the signer's SubjectPublicKeyInfo DER. The signed JSON is
self-checking: ``load_signed`` verifies the signature, the SignerID and that UniqueID
follows from the file list, so a file that loads is one the signer vouched for;
``check_measurement`` then compares it with the files on disk.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from meshproxy.attestation._quote import EnclaveIdentity
from meshproxy.attestation._tree import package_digest, package_dir, put
from meshproxy.config import Node, load_file
from meshproxy.errors import AttestationError, ConfigError

MESHPROXY_ENTRY = "meshproxy"
_MEASURE_DOMAIN = b"meshproxy-enclave-measurement/v1"
_SIGN_DOMAIN = b"meshproxy-signed-enclave/v1\n"
_DESC_KEYS = ("name", "product_id", "security_version", "debug", "files")
_SIGNED_KEYS = (
    *("name", "unique_id", "signer_id", "product_id", "security_version", "debug", "files"),
    *("signer_public_key", "signature"),
)


@dataclass(frozen=True)
class EnclaveDescription:
    path: Path
    name: str
    product_id: int
    security_version: int
    debug: bool
    files: tuple[str, ...]


@dataclass(frozen=True)
class SignedEnclave:
    name: str
    unique_id: bytes
    signer_id: bytes
    product_id: int
    security_version: int
    debug: bool
    files: tuple[tuple[str, str], ...]  # (entry, sha256 hex), sorted by entry
    signer_public_key: bytes  # PEM SubjectPublicKeyInfo
    signature: bytes

    def identity(self) -> EnclaveIdentity:
        return EnclaveIdentity(
            self.unique_id, self.signer_id, self.product_id, self.security_version, self.debug
        )

    def body(self) -> bytes:
        """The canonical bytes the signature covers (everything but the signature)."""
        doc = _document(self)
        del doc["signature"]
        return _SIGN_DOMAIN + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- descriptions and measurement ------------------------------------------------------
def load_description(path: Path) -> EnclaveDescription:
    path = Path(path)
    fields = load_file(path).mapping(_DESC_KEYS, required=_DESC_KEYS)
    files = fields["files"]
    entries = files.str_list()
    if not entries:
        files.fail("list at least one file to measure")
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem:
            files.list()[i].fail(problem)
        if entry in entries[:i]:
            files.list()[i].fail(f"{entry!r} is listed twice")
    return EnclaveDescription(
        path=path.absolute(),
        name=fields["name"].str(),
        product_id=fields["product_id"].int(minimum=0, maximum=0xFFFF),
        security_version=fields["security_version"].int(minimum=0, maximum=0xFFFF),
        debug=fields["debug"].bool(),
        files=entries,
    )


def measure(desc: EnclaveDescription) -> tuple[bytes, dict[str, str]]:
    base = desc.path.parent
    digests: dict[str, str] = {}
    for entry in desc.files:
        digest = _entry_digest(base, entry)
        if digest is None:
            raise ConfigError(f"{desc.path.name}: files: {entry!r} not found in {base}")
        digests[entry] = digest
    uid = _unique_id(desc.name, desc.product_id, desc.security_version, desc.debug, digests.items())
    return uid, digests


def check_measurement(signed: SignedEnclave, desc_dir: Path) -> EnclaveIdentity:
    for entry, want in signed.files:
        problem = _entry_problem(entry)
        if problem:
            raise AttestationError(f"measurement: {problem}", check="measurement")
        got = _entry_digest(Path(desc_dir), entry)
        what = "the installed meshproxy package" if entry == MESHPROXY_ENTRY else repr(entry)
        if got is None:
            raise AttestationError(
                f"measurement: measured file {what} is missing (in {desc_dir})",
                check="measurement",
            )
        if got != want:
            raise AttestationError(
                f"measurement: measured file {what} changed since signing "
                f"(sha256 {got}, signed {want})",
                check="measurement",
            )
    uid = _unique_id(
        signed.name, signed.product_id, signed.security_version, signed.debug, signed.files
    )
    if uid != signed.unique_id:
        raise AttestationError(
            "measurement: the UniqueID does not follow from the signed file list",
            check="measurement",
        )
    return signed.identity()


def _entry_problem(entry: str) -> str | None:
    p = PurePosixPath(entry)
    if p.is_absolute() or "\\" in entry:
        return f"{entry!r}: paths are relative to the description, with '/' separators"
    if str(p) != entry or any(part in (".", "..") for part in p.parts):
        return f"{entry!r}: write the path normalized, inside the description's directory"
    return None


def _entry_digest(base: Path, entry: str) -> str | None:
    if entry == MESHPROXY_ENTRY:
        return package_digest(_package_dir())
    try:
        with (base / entry).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _package_dir() -> Path:
    return package_dir()


def _unique_id(
    name: str, product_id: int, svn: int, debug: bool, files: Iterable[tuple[str, str]]
) -> bytes:
    h = hashlib.sha256()
    put(h, _MEASURE_DOMAIN)
    put(h, name.encode())
    put(h, product_id.to_bytes(2, "little"))
    put(h, svn.to_bytes(2, "little"))
    put(h, b"\x01" if debug else b"\x00")
    ordered = sorted(files)
    put(h, len(ordered).to_bytes(8, "big"))
    for entry, digest in ordered:
        put(h, entry.encode())
        put(h, bytes.fromhex(digest))
    return h.digest()


# -- signing ---------------------------------------------------------------------------
def signer_id_of(public_key: PublicKeyTypes) -> bytes:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def sign_description(desc: EnclaveDescription, signer_key: PrivateKeyTypes) -> SignedEnclave:
    public = signer_key.public_key()
    if not _supported(public):
        raise ConfigError("the signer key must be ECDSA P-256 or Ed25519")
    unique_id, digests = measure(desc)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = SignedEnclave(
        name=desc.name,
        unique_id=unique_id,
        signer_id=signer_id_of(public),
        product_id=desc.product_id,
        security_version=desc.security_version,
        debug=desc.debug,
        files=tuple(sorted(digests.items())),
        signer_public_key=pem,
        signature=b"",
    )
    if isinstance(signer_key, ec.EllipticCurvePrivateKey):
        signature = signer_key.sign(unsigned.body(), ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(signer_key, ed25519.Ed25519PrivateKey)
        signature = signer_key.sign(unsigned.body())
    return dataclasses.replace(unsigned, signature=signature)


def _supported(key: PublicKeyTypes) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name == "secp256r1"
    return isinstance(key, ed25519.Ed25519PublicKey)


def _document(signed: SignedEnclave) -> dict[str, object]:
    return {
        "name": signed.name,
        "unique_id": signed.unique_id.hex(),
        "signer_id": signed.signer_id.hex(),
        "product_id": signed.product_id,
        "security_version": signed.security_version,
        "debug": signed.debug,
        "files": dict(signed.files),
        "signer_public_key": signed.signer_public_key.decode("ascii"),
        "signature": base64.b64encode(signed.signature).decode("ascii"),
    }


def write_signed(signed: SignedEnclave, path: Path) -> None:
    path = Path(path)
    data = json.dumps(_document(signed), indent=2, sort_keys=True).encode() + b"\n"
    import tempfile  # signing only

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_signed(path: Path) -> SignedEnclave:
    root = load_file(Path(path))
    fields = root.mapping(_SIGNED_KEYS, required=_SIGNED_KEYS)
    files: list[tuple[str, str]] = []
    for entry, node in fields["files"].items().items():
        problem = _entry_problem(entry)
        if problem:
            node.fail(problem)
        files.append((entry, _hex(node, 32).hex()))
    pem_node = fields["signer_public_key"]
    public = _public_key(pem_node)
    try:
        signature = base64.b64decode(fields["signature"].str(), validate=True)
    except binascii.Error:
        fields["signature"].fail("not base64")
    signed = SignedEnclave(
        name=fields["name"].str(),
        unique_id=_hex(fields["unique_id"], 32),
        signer_id=_hex(fields["signer_id"], 32),
        product_id=fields["product_id"].int(minimum=0, maximum=0xFFFF),
        security_version=fields["security_version"].int(minimum=0, maximum=0xFFFF),
        debug=fields["debug"].bool(),
        files=tuple(sorted(files)),
        signer_public_key=pem_node.str().encode("ascii", "replace"),
        signature=signature,
    )
    if signer_id_of(public) != signed.signer_id:
        fields["signer_id"].fail("is not SHA-256 of signer_public_key")
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, signed.body(), ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(signature, signed.body())
    except InvalidSignature:
        root.fail("the signature does not verify: the file was changed after signing")
    uid = _unique_id(
        signed.name, signed.product_id, signed.security_version, signed.debug, signed.files
    )
    if uid != signed.unique_id:
        fields["unique_id"].fail("does not follow from the file list")
    return signed


def _hex(node: Node, size: int) -> bytes:
    text = node.str()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        node.fail("not hex")
    if len(value) != size:
        node.fail(f"expected {size} bytes ({2 * size} hex digits), got {len(value)}")
    return value


def _public_key(node: Node) -> PublicKeyTypes:
    try:
        key = serialization.load_pem_public_key(node.str().encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        node.fail("not a PEM public key")
    if not _supported(key):
        node.fail("must be an ECDSA P-256 or Ed25519 public key")
    return key
