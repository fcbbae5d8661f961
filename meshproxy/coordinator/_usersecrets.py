"""User-defined secrets: uploads checked against their definition, and the secret JSON.

Upload shape (MarbleRun's ``UserSecret``, keys matched case-insensitively): ``Key`` (base64)
for symmetric-key and plain secrets; ``Cert`` (base64 DER) with an optional ``Private``
(base64 PKCS#8 DER) for certificate secrets. Stricter than MarbleRun: the certificate's key
type and size must match the definition, and a private key must belong to the certificate.
After an upload every template is rendered once with the real values (MarbleRun's dry
run), so a value a template cannot use (a NUL in an env variable) is refused up front.

Read shape (MarbleRun's ``Secret``, Go field names): ``Type, Size, Shared, UserDefined,
Cert, ValidFor, Private, Public``; bytes are base64, absent ones null.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshproxy._redact import Secret
from meshproxy.errors import ManifestError, PolicyError
from meshproxy.manifest import Manifest, SecretSpec, SecretValue, render
from meshproxy.manifest._check import dry_run_data
from meshproxy.manifest._template import TemplateData

_FIELDS = {"cert": "Cert", "private": "Private", "key": "Key"}


class BadUpload(PolicyError):
    """An uploaded value does not fit its secret's definition (HTTP 400)."""


def parse_upload(spec: SecretSpec, body: Any) -> SecretValue:
    where = f"secret {spec.name!r}"
    if not isinstance(body, Mapping):
        raise BadUpload(f"{where}: expected an object with Key, or Cert and Private")
    fields: dict[str, bytes] = {}
    for key, value in body.items():
        canon = _FIELDS.get(str(key).lower())
        if canon is None:
            raise BadUpload(f"{where}: unknown field {key!r} (Key, Cert or Private)")
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadUpload(f"{where}: {canon} must be a base64 string")
        try:
            fields[canon] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadUpload(f"{where}: {canon} is not valid base64") from None
    if spec.type in ("symmetric-key", "plain"):
        return _key_value(spec, fields, where)
    return _cert_value(spec, fields, where)


def _key_value(spec: SecretSpec, fields: dict[str, bytes], where: str) -> SecretValue:
    if "Cert" in fields or "Private" in fields:
        raise BadUpload(f"{where}: a {spec.type} secret takes Key, not Cert or Private")
    key = fields.get("Key")
    if key is None:
        raise BadUpload(f"{where}: Key is missing")
    if spec.type == "symmetric-key":
        if not key:
            raise BadUpload(f"{where}: the key is empty")
        if spec.size and len(key) * 8 != spec.size:
            raise BadUpload(
                f"{where}: the key has {len(key) * 8} bits, the manifest says Size {spec.size}"
            )
    return SecretValue(type=spec.type, cert=None, public=key, private=Secret(key))


def _cert_value(spec: SecretSpec, fields: dict[str, bytes], where: str) -> SecretValue:
    if "Key" in fields:
        raise BadUpload(f"{where}: a {spec.type} secret takes Cert (and Private), not Key")
    der = fields.get("Cert")
    if der is None:
        raise BadUpload(f"{where}: Cert is missing")
    try:
        cert = x509.load_der_x509_certificate(der)
        public = cert.public_key()
    except ValueError:
        raise BadUpload(f"{where}: Cert is not a DER X.509 certificate") from None
    _check_key_type(spec, public, where)
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private: Secret | None = None
    if "Private" in fields:
        try:
            key = serialization.load_der_private_key(fields["Private"], password=None)
        except (ValueError, TypeError):
            raise BadUpload(f"{where}: Private is not an unencrypted PKCS#8 DER key") from None
        mine = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if mine != spki:
            raise BadUpload(f"{where}: Private does not belong to the certificate's public key")
        private = Secret(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return SecretValue(type=spec.type, cert=cert, public=spki, private=private)


def _check_key_type(spec: SecretSpec, public: object, where: str) -> None:
    if spec.type == "cert-ecdsa":
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise BadUpload(f"{where}: cert-ecdsa needs an ECDSA certificate")
        if spec.size and public.curve.key_size != spec.size:
            raise BadUpload(
                f"{where}: the certificate's curve has {public.curve.key_size} bits, the "
                f"manifest says Size {spec.size}"
            )
    elif spec.type == "cert-rsa":
        if not isinstance(public, rsa.RSAPublicKey):
            raise BadUpload(f"{where}: cert-rsa needs an RSA certificate")
        if spec.size and public.key_size != spec.size:
            raise BadUpload(
                f"{where}: the certificate's key has {public.key_size} bits, the manifest "
                f"says Size {spec.size}"
            )
    elif spec.type == "cert-ed25519" and not isinstance(public, ed25519.Ed25519PublicKey):
        raise BadUpload(f"{where}: cert-ed25519 needs an Ed25519 certificate")


def check_templates_with(manifest: Manifest, user_values: Mapping[str, SecretValue]) -> None:
    """Render every template with the real user-defined values, placeholders elsewhere."""
    dry = dry_run_data(manifest)
    secrets = {**dry.secrets, **user_values}
    data = TemplateData(secrets, secrets, dry.marblerun)
    for marble in manifest.marbles.values():
        base = f"Marbles.{marble.name}.Parameters"
        for kind, values in (("file", marble.parameters.files), ("env", marble.parameters.env)):
            for name, value in values.items():
                if value.no_templates:
                    continue
                where = f"{base}.{'Files' if kind == 'file' else 'Env'}.{name}"
                try:
                    render(value.data, data, kind=kind, where=where)  # type: ignore[arg-type]
                except ManifestError as exc:
                    raise BadUpload(f"the uploaded value does not fit a template: {exc}") from None


def to_json(spec: SecretSpec, value: SecretValue) -> dict[str, Any]:
    def b64(data: bytes | None) -> str | None:
        return base64.b64encode(data).decode() if data is not None else None

    return {
        "Type": spec.type,
        "Size": spec.size,
        "Shared": spec.shared,
        "UserDefined": spec.user_defined,
        "Cert": b64(value.cert.public_bytes(serialization.Encoding.DER)) if value.cert else None,
        "ValidFor": spec.valid_for_days or 0,
        "Private": b64(value.private.reveal()) if value.private is not None else None,
        "Public": b64(value.public) if value.public else None,
    }
