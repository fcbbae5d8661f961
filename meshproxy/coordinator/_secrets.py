"""Secrets of the manifest: generated shared ones, derived and fresh per-marble ones.

* Shared secrets are generated once when the manifest is set and kept in the sealed state.
* A marble's own symmetric keys are derived (HKDF-SHA256, MarbleRun's construction:
  salt = instance UUID || secret name, info = marble type), so a marble rescheduled with
  the same UUID gets the same key on any node: a virtual sealing key. Unlike an SGX
  sealing key it does not depend on the CPU: the inputs are the cluster's root secret
  (sealed by the coordinator, shared by its replicas, restored by recovery) and what the
  marble proves or names (its attested type, its UUID: the proxy's ``uuid_file`` or a pod
  UID). It changes only with a new UUID, a renamed marble type, ``DisableSecretBinding``,
  or ``RotateRootSecret`` (then the old key is ``.Previous.Secrets.NAME``, so data can be
  re-encrypted). Tested: same UUID on another simulated machine, after a coordinator
  restart, gets the same key (``test_coordinator_secrets``, ``test_lifecycle_updates``).
* A marble's own certificate secrets are fresh on every activation.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Container, Mapping
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy._redact import Secret
from meshproxy.manifest import Manifest, Marble, SecretSpec, SecretValue
from meshproxy.pki import Authority

_CURVES: dict[int, ec.EllipticCurve] = {
    224: ec.SECP224R1(),
    256: ec.SECP256R1(),
    384: ec.SECP384R1(),
    521: ec.SECP521R1(),
}
_KeyPair = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def generate_shared(manifest: Manifest, issuer: Authority, now: datetime) -> dict[str, SecretValue]:
    return {
        name: make_secret(spec, issuer, now)
        for name, spec in manifest.secrets.items()
        if spec.shared and not spec.user_defined
    }


def for_marble(
    manifest: Manifest,
    shared: Mapping[str, SecretValue],
    issuer: Authority,
    root_secret: Secret,
    *,
    marble_type: str,
    instance: str,
    now: datetime,
    only: Container[str] | None = None,
) -> dict[str, SecretValue]:
    """The shared secrets, and the marble's own (made now); with ``only``, just those."""
    out = dict(shared)
    marble = manifest.marbles[marble_type]
    for name, spec in manifest.secrets.items():
        if spec.shared or spec.user_defined or (only is not None and name not in only):
            continue
        if spec.type == "symmetric-key":
            out[name] = derive(spec, root_secret, marble, instance)
        else:
            out[name] = make_secret(spec, issuer, now)
    return out


def previous_for_marble(
    manifest: Manifest,
    current: Mapping[str, SecretValue],
    previous_shared: Mapping[str, SecretValue],
    previous_root_secret: Secret | None,
    *,
    marble_type: str,
    instance: str,
    only: Container[str] | None = None,
) -> dict[str, SecretValue]:
    """``.Previous.Secrets``: what the secrets were before the last root secret rotation.

    Shared symmetric keys replaced by the rotation keep their old value; a marble's own
    symmetric keys are derived from the previous root secret; everything else (and every
    secret when the root secret was never rotated) is the current value.
    """
    if previous_root_secret is None:
        return dict(current)
    out = {**current, **{k: v for k, v in previous_shared.items() if k in current}}
    marble = manifest.marbles[marble_type]
    for name, spec in manifest.secrets.items():
        if only is not None and name not in only:
            continue
        if spec.type == "symmetric-key" and not (spec.shared or spec.user_defined):
            out[name] = derive(spec, previous_root_secret, marble, instance)
    return out


def derive(spec: SecretSpec, root_secret: Secret, marble: Marble, instance: str) -> SecretValue:
    """A marble's own symmetric key: the same for the same UUID on any node (virtual
    sealing key); ``DisableSecretBinding`` leaves the marble type out, as MarbleRun does."""
    info = b"" if marble.disable_secret_binding else marble.name.encode()
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=spec.size // 8,
        salt=(instance + spec.name).encode(),
        info=info,
    ).derive(root_secret.reveal())
    return SecretValue(type=spec.type, cert=None, public=key, private=Secret(key))


def make_secret(spec: SecretSpec, issuer: Authority, now: datetime) -> SecretValue:
    if spec.type == "symmetric-key":
        key = os.urandom(spec.size // 8)
        return SecretValue(type=spec.type, cert=None, public=key, private=Secret(key))
    private = _new_key(spec)
    cert = _certificate(spec, private, issuer, now)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SecretValue(type=spec.type, cert=cert, public=public, private=Secret(der))


def _new_key(spec: SecretSpec) -> _KeyPair:
    if spec.type == "cert-ecdsa":
        return ec.generate_private_key(_CURVES[spec.size or 256])
    if spec.type == "cert-rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.size or 2048)
    if spec.type == "cert-ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"secret type {spec.type!r} is not generated")  # parse rules exclude it


def _certificate(
    spec: SecretSpec, key: _KeyPair, issuer: Authority, now: datetime
) -> x509.Certificate:
    tpl = spec.cert
    dns = list(tpl.dns_names) or (["localhost"] if not tpl.ip_addresses else [])
    ips = list(tpl.ip_addresses) or (["127.0.0.1", "::1"] if not tpl.dns_names else [])
    cn = tpl.common_name or (dns[0] if len(dns) == 1 else "meshproxy generated certificate")
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in tpl.organization]
    if tpl.not_after is not None:
        not_after = tpl.not_after
    else:
        not_after = now + timedelta(days=spec.valid_for_days or 365)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    return builder.sign(issuer.key, hashes.SHA256())
