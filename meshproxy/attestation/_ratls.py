"""RA-TLS certificates: a quote in an X.509 extension, bound to the certificate's key.

Interoperable format (CCC "Interoperable RA-TLS", as Gramine and the Intel SGX SDK emit
it): extension 2.23.133.5.4.9, non-critical, value = CBOR tag 60000 over
``[bstr quote, bstr claims]``; ``claims`` is a CBOR map whose "pubkey-hash" is a bstr
holding CBOR ``[hash-alg-id, SHA-x(SubjectPublicKeyInfo DER)]`` (1 = SHA-256, 7 = SHA-384,
8 = SHA-512) and optionally "nonce"; the quote's ``report_data[0:32]`` is SHA-256 of the
claims bytes. Gramine's legacy extension (1.2.840.113741.1337.6, which Gramine encodes
with the OID's tag and length inside it) holds a raw quote binding SHA-256(SPKI DER); it
is read only when the interoperable one is absent.

Simulated quotes are never wrapped in tag 60000 (an interoperable verifier must not be
able to mistake them for Intel evidence): they use meshproxy's own tag, and a verifier
refuses either tag holding the other kind of quote.

The certificate's own signature is not what makes it trustworthy: the quote binds the key,
and TLS proves possession of it. So certificates that ``cryptography`` refuses to parse
(Gramine signs with a NULL parameter in the algorithm) are read with a small DER walker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshproxy.attestation import _cbor, _der
from meshproxy.attestation._chain import TrustAnchor, fail
from meshproxy.attestation._platform import SIM_VENDOR_ID
from meshproxy.attestation._verify import VerifiedQuote, verify_quote

if TYPE_CHECKING:
    from meshproxy.attestation._collateral import Collateral

RATLS_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
LEGACY_QUOTE_OID = "1.2.840.113741.1337.6"
_LEGACY_OID_CONTENTS = (
    bytes.fromhex("2a864886f84d8a3906"),  # 1.2.840.113741.1337.6, correctly encoded
    bytes.fromhex("06092a864886f84d8a3906"),  # Gramine's encoding (tag and length inside)
)
_EVIDENCE_OID_CONTENT = bytes.fromhex("678105050409")  # 2.23.133.5.4.9
TEE_QUOTE_TAG = 60000  # IANA CBOR tag: Intel TEE quote
# Unregistered, from the first-come-first-served range; only meshproxy writes or reads it.
SIMULATED_QUOTE_TAG = 0x6D657368  # "mesh"
_HASHES = {1: "sha256", 7: "sha384", 8: "sha512"}
_MAX_CERT = 64 << 10
_FORMAT = "ratls-format"


@dataclass(frozen=True)
class RatlsEvidence:
    """The parsed 2.23.133.5.4.9 extension (nothing verified yet)."""

    tag: int
    quote: bytes
    claims: bytes  # the encoded claims, as hashed into the quote
    hash_alg: int
    pubkey_hash: bytes
    nonce: bytes | None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ratls_claims(public_key: PublicKeyTypes, *, nonce: bytes | None = None) -> bytes:
    """The claims a certificate for ``public_key`` carries (deterministic CBOR)."""
    return ratls_claims_for_spki(_spki(public_key), nonce=nonce)


def ratls_claims_for_spki(spki_der: bytes, *, nonce: bytes | None = None) -> bytes:
    """``ratls_claims`` for a key given as its SubjectPublicKeyInfo DER."""
    pubkey_hash = _cbor.encode([1, hashlib.sha256(bytes(spki_der)).digest()])
    claims: dict[str, bytes] = {"pubkey-hash": pubkey_hash}
    if nonce is not None:
        claims["nonce"] = bytes(nonce)
    return _cbor.encode(claims)


def ratls_report_data(public_key: PublicKeyTypes, *, nonce: bytes | None = None) -> bytes:
    """The 64 bytes of report data the quote must carry: SHA-256(claims) || zeros."""
    return hashlib.sha256(ratls_claims(public_key, nonce=nonce)).digest() + bytes(32)


def ratls_extension(
    quote: bytes, claims: bytes | Mapping[str, bytes]
) -> x509.UnrecognizedExtension:
    """The evidence extension (add it non-critical: OpenSSL and mbedTLS reject unknown
    critical extensions). ``claims`` is ``ratls_claims(...)`` or a mapping to encode."""
    encoded = claims if isinstance(claims, bytes) else _cbor.encode(dict(claims))
    simulated = bytes(quote[12:28]) == SIM_VENDOR_ID
    tag = SIMULATED_QUOTE_TAG if simulated else TEE_QUOTE_TAG
    value = _cbor.encode(_cbor.Tag(tag, [bytes(quote), encoded]))
    return x509.UnrecognizedExtension(RATLS_EVIDENCE_OID, value)


def parse_ratls_extension(value: bytes) -> RatlsEvidence:
    """Parse the value of a 2.23.133.5.4.9 extension; malformed is "ratls-format"."""
    try:
        item = _cbor.decode(bytes(value))
        if not isinstance(item, _cbor.Tag) or item.number not in (
            TEE_QUOTE_TAG,
            SIMULATED_QUOTE_TAG,
        ):
            raise _cbor.CborError("not a CBOR tag 60000 (Intel TEE quote)")
        quote, claims = _pair(item.value, bytes, bytes, "the tagged value is [quote, claims]")
        decoded = _cbor.decode(claims)
        if not isinstance(decoded, dict):
            raise _cbor.CborError("the claims are not a CBOR map")
        hashed = decoded.get("pubkey-hash")
        if not isinstance(hashed, bytes):
            raise _cbor.CborError("the claims have no pubkey-hash byte string")
        alg, digest = _pair(_cbor.decode(hashed), int, bytes, "pubkey-hash is [alg, hash]")
        nonce = decoded.get("nonce")
        if nonce is not None and not isinstance(nonce, bytes):
            raise _cbor.CborError("the nonce claim is not a byte string")
    except _cbor.CborError as exc:
        raise fail(_FORMAT, f"RA-TLS evidence extension: {exc}") from None
    return RatlsEvidence(item.number, quote, claims, alg, digest, nonce)


_A = TypeVar("_A")
_B = TypeVar("_B")


def _pair(value: object, first: type[_A], second: type[_B], what: str) -> tuple[_A, _B]:
    if isinstance(value, list) and len(value) == 2:
        a, b = value
        if isinstance(a, first) and isinstance(b, second):
            return a, b
    raise _cbor.CborError(f"malformed: {what}")


# -- certificates ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Cert:
    spki: bytes
    not_before: datetime
    not_after: datetime
    extensions: dict[bytes, bytes]  # OID content bytes -> extnValue


def _certificate_der(cert: x509.Certificate | bytes) -> bytes:
    if isinstance(cert, x509.Certificate):
        return cert.public_bytes(serialization.Encoding.DER)
    data = bytes(cert)
    if len(data) > _MAX_CERT:
        raise fail(_FORMAT, f"certificate is {len(data)} bytes, more than {_MAX_CERT}")
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    # DER certificates with a quote inside contain PEM text (the PCK chain): only a
    # document that starts with the PEM header is PEM.
    if data.lstrip().startswith(begin):
        start = data.index(begin) + len(begin)
        stop = data.find(end, start)
        if stop < 0:
            raise fail(_FORMAT, "PEM certificate without its END line")
        try:
            return base64.b64decode(b"".join(data[start:stop].split()), validate=True)
        except binascii.Error:
            raise fail(_FORMAT, "PEM certificate body is not base64") from None
    return data


def _time(tlv: _der.Tlv) -> datetime:
    text = tlv.value.decode("ascii", "replace")
    if tlv.tag == 0x17 and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tlv.tag == 0x18 and len(text) == 15 and text.endswith("Z")):
        raise _der.DerError(f"unsupported time at offset {tlv.start}")
    try:
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise _der.DerError(f"malformed time at offset {tlv.start}") from None


def _parse_certificate(der: bytes) -> _Cert:
    try:
        outer = _der.expect(_der.read_all(der), _der.SEQUENCE, "certificate").children()
        if len(outer) != 3:
            raise _der.DerError("a certificate has three parts")
        tbs = _der.expect(outer[0], _der.SEQUENCE, "TBSCertificate").children()
        if tbs and tbs[0].tag == 0xA0:
            tbs = tbs[1:]
        if len(tbs) < 6:
            raise _der.DerError("TBSCertificate is too short")
        validity = _der.expect(tbs[3], _der.SEQUENCE, "validity").children()
        if len(validity) != 2:
            raise _der.DerError("validity has two times")
        spki = _der.expect(tbs[5], _der.SEQUENCE, "SubjectPublicKeyInfo")
        extensions: dict[bytes, bytes] = {}
        for part in tbs[6:]:
            if part.tag != 0xA3:
                continue
            (seq,) = part.children()
            for ext in _der.expect(seq, _der.SEQUENCE, "extensions").children():
                fields = _der.expect(ext, _der.SEQUENCE, "extension").children()
                if len(fields) not in (2, 3):
                    raise _der.DerError(f"extension at offset {ext.start} is malformed")
                oid = _der.expect(fields[0], _der.OID, "extension id").value
                value = _der.expect(fields[-1], _der.OCTET_STRING, "extension value").value
                if oid in extensions:
                    raise _der.DerError(f"extension {oid.hex()} appears twice")
                extensions[oid] = value
        return _Cert(spki.raw, _time(validity[0]), _time(validity[1]), extensions)
    except ValueError as exc:  # DerError, or a tuple unpacking a malformed [3]
        raise fail(_FORMAT, f"not a certificate: {exc}") from None


def verify_ratls_certificate(
    cert: x509.Certificate | bytes,
    anchors: Sequence[TrustAnchor],
    *,
    now: datetime,
    nonce: bytes | None = None,
    collateral: Collateral | None = None,
) -> VerifiedQuote:
    """Verify the quote in an RA-TLS certificate (an ``x509.Certificate``, or DER/PEM
    bytes) and its binding to the certificate's key (and to ``nonce``, if given).
    Failures: ratls-format, ratls-certificate (validity), ratls-binding, or the quote's
    own check (pck-chain, quote-signature, ...)."""
    parsed = _parse_certificate(_certificate_der(cert))
    if not parsed.not_before <= now <= parsed.not_after:
        raise fail(
            "ratls-certificate",
            f"the certificate is not valid at {now.isoformat()} (valid "
            f"{parsed.not_before.isoformat()} to {parsed.not_after.isoformat()})",
        )
    value = parsed.extensions.get(_EVIDENCE_OID_CONTENT)
    if value is not None:
        return _verify_evidence(
            parse_ratls_extension(value), parsed, anchors, now, nonce, collateral
        )
    legacy = next(
        (parsed.extensions[o] for o in _LEGACY_OID_CONTENTS if o in parsed.extensions), None
    )
    if legacy is None:
        raise fail(
            _FORMAT,
            f"the certificate has no RA-TLS evidence ({RATLS_EVIDENCE_OID.dotted_string} or "
            f"{LEGACY_QUOTE_OID})",
        )
    verified = verify_quote(legacy, anchors, now=now, collateral=collateral)
    if verified.report_data[:32] != hashlib.sha256(parsed.spki).digest():
        raise fail("ratls-binding", "the legacy quote does not bind the certificate's key")
    if nonce is not None:
        raise fail("ratls-binding", "legacy RA-TLS evidence carries no nonce")
    return verified


def _verify_evidence(
    ev: RatlsEvidence,
    cert: _Cert,
    anchors: Sequence[TrustAnchor],
    now: datetime,
    nonce: bytes | None,
    collateral: Collateral | None,
) -> VerifiedQuote:
    verified = verify_quote(ev.quote, anchors, now=now, collateral=collateral)
    if verified.simulated != (ev.tag == SIMULATED_QUOTE_TAG):
        what = "a simulated quote" if verified.simulated else "a hardware quote"
        raise fail(_FORMAT, f"{what} under CBOR tag {ev.tag}: refused")
    if verified.report_data[:32] != hashlib.sha256(ev.claims).digest():
        raise fail("ratls-binding", "the quote's report data is not SHA-256 of the claims")
    algorithm = _HASHES.get(ev.hash_alg)
    if algorithm is None:
        raise fail("ratls-binding", f"pubkey-hash algorithm {ev.hash_alg} is not supported")
    if hashlib.new(algorithm, cert.spki).digest() != ev.pubkey_hash:
        raise fail(
            "ratls-binding",
            "the quote binds another public key than the certificate's (pubkey-hash differs)",
        )
    if nonce is not None and ev.nonce != nonce:
        raise fail("ratls-binding", "the evidence does not carry the expected nonce")
    return verified
