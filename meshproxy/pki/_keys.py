"""Key pairs and PEM encodings. Private keys leave this module only as ``Secret``."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy._redact import Secret
from meshproxy.errors import PKIError


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: fast handshakes, and what every TLS stack accepts."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> Secret:
    return Secret(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def key_from_pem(pem: Secret) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.reveal(), password=None)
    except (ValueError, TypeError):
        raise PKIError("private key is not a valid unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("private key must be an ECDSA key")
    return key


def public_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def certs_from_pem(data: bytes, where: str = "certificate") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PKIError(f"{where}: no valid PEM certificate found") from None
    return certs


def cert_from_pem(data: bytes, where: str = "certificate") -> x509.Certificate:
    return certs_from_pem(data, where)[0]
