"""Who is calling the client API, and what they may do (MarbleRun's users and roles).

Authentication: a user presents a TLS client certificate. The TLS layer asks for one and
trusts exactly the manifest users' certificates (``_tls``), so the handshake itself proves
possession of the key. Here the presented certificate is matched to a manifest user by its
public key and by the whole certificate, and must be valid now; a self-issued certificate
must also carry a valid self-signature. MarbleRun compares bytes and ignores expiry.

Authorization: MarbleRun's four actions. A request names resources (secrets, packages);
it is granted only if every one of them is granted by some role of the user.

The first manifest can be protected by an owner: a certificate, or a one-time token whose
SHA-256 the coordinator was started with.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshproxy.errors import PolicyError
from meshproxy.manifest import Manifest, User

ACTIONS = {
    "readsecret": ("Secrets", "ReadSecret"),
    "writesecret": ("Secrets", "WriteSecret"),
    "updatesecurityversion": ("Packages", "UpdateSecurityVersion"),
    "updatemanifest": ("Manifest", "UpdateManifest"),
}


class Unauthenticated(PolicyError):
    """No acceptable client certificate (or owner token) was presented: HTTP 401."""


@dataclass(frozen=True)
class Owner:
    """Who may set the first manifest: a certificate (DER), a token's SHA-256, or both."""

    cert_der: bytes | None = None
    token_sha256: bytes | None = None

    def __repr__(self) -> str:
        return f"<Owner cert={self.cert_der is not None} token={self.token_sha256 is not None}>"

    @staticmethod
    def token_digest(token: str) -> bytes:
        return hashlib.sha256(token.strip().encode()).digest()

    def admits(self, cert_der: bytes | None, token: str | None) -> bool:
        if self.cert_der is not None and cert_der is not None and cert_der == self.cert_der:
            return True
        if self.token_sha256 is not None and token:
            return hmac.compare_digest(self.token_digest(token), self.token_sha256)
        return False


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def check_certificate(cert: x509.Certificate, now: datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Unauthenticated(
            f"{what} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )
    if cert.issuer == cert.subject:
        try:
            cert.verify_directly_issued_by(cert)
        except Exception:  # noqa: BLE001 (InvalidSignature, ValueError, TypeError: all "bad")
            raise Unauthenticated(f"{what} has an invalid self-signature") from None


def authenticate(manifest: Manifest | None, cert_der: bytes | None, now: datetime) -> User:
    """The manifest user who presented ``cert_der``; ``Unauthenticated`` otherwise."""
    if cert_der is None:
        raise Unauthenticated("this operation needs a user's client certificate (--cert and --key)")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise Unauthenticated("the client certificate does not parse") from None
    users = manifest.users.values() if manifest is not None else ()
    presented_key = _spki(cert)
    for user in users:
        known = x509.load_pem_x509_certificate(user.certificate_pem)
        if _spki(known) == presented_key and known == cert:
            check_certificate(cert, now, f"the certificate of user {user.name!r}")
            return user
    raise Unauthenticated("the client certificate is not the certificate of any manifest user")


def granted(
    manifest: Manifest, user: User, action: str, resources: Iterable[str] = ()
) -> list[str]:
    """The resources of ``resources`` that ``user`` may NOT ``action`` (empty: all granted).

    For the Manifest resource type (no names), the list is ``["*"]`` when not granted.
    """
    resource_type, _ = ACTIONS[action]
    roles = [manifest.roles[r] for r in user.roles if r in manifest.roles]
    mine = [r for r in roles if r.resource_type == resource_type and action in r.actions]
    if resource_type == "Manifest":
        return [] if mine else ["*"]
    allowed = {name for r in mine for name in r.resource_names}
    return [name for name in resources if name not in allowed]


def authorize(manifest: Manifest, user: User, action: str, resources: Iterable[str] = ()) -> None:
    missing = granted(manifest, user, action, list(resources))
    if not missing:
        return
    _, spelled = ACTIONS[action]
    if missing == ["*"]:
        raise PolicyError(f"user {user.name!r} does not hold {spelled}")
    raise PolicyError(
        f"user {user.name!r} may not {spelled} on {', '.join(repr(m) for m in missing)}"
    )


def updaters(manifest: Manifest) -> list[str]:
    """Users holding UpdateManifest, in manifest order."""
    return [u.name for u in manifest.users.values() if not granted(manifest, u, "updatemanifest")]
