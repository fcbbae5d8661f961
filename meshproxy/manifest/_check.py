"""The template dry run (MarbleRun's ``TemplateDryRun``), run when a manifest is parsed.

Every Files and Env template is rendered against placeholder values of the right shape
for each declared secret and ``.MarbleRun.*`` entry, so a reference to an undefined
secret, a part the secret does not have, or a function the type does not allow is
refused before any marble activates. Placeholders are ``b"A"`` bytes, as in MarbleRun,
and one fixed throw-away certificate.
"""

from __future__ import annotations

import base64
import functools
from types import MappingProxyType

from cryptography import x509

from meshproxy._redact import Secret
from meshproxy.manifest._model import CERT_TYPES, Manifest, SecretSpec
from meshproxy.manifest._template import SecretValue, TemplateData, render

# A self-signed Ed25519 certificate made once for dry runs; it identifies nothing.
_DUMMY_CERT_DER = base64.b64decode(
    "MIH2MIGpoAMCAQICAQEwBQYDK2VwMCUxIzAhBgNVBAMMGm1lc2hwcm94eSB0ZW1wbGF0ZSBkcnkgcnVuMB4XDTAw"
    "MDEwMTAwMDAwMFoXDTAwMDEwMjAwMDAwMFowJTEjMCEGA1UEAwwabWVzaHByb3h5IHRlbXBsYXRlIGRyeSBydW4w"
    "KjAFBgMrZXADIQDpmgrjNUwT0Z4bXODCnVYpesNxl9uEQlw/SDeagSvq/jAFBgMrZXADQQBLoOXuixJyuio3hJGu"
    "oyVKh9WELs2fnZUp4GdCQNc+S5xkcHk0UJnOa4s+Y7upSK0TrNDCirCtKnCCCx6SfwEJ"
)


@functools.cache
def _dummy_cert() -> x509.Certificate:
    return x509.load_der_x509_certificate(_DUMMY_CERT_DER)


def _placeholder(spec: SecretSpec) -> SecretValue:
    if spec.type in CERT_TYPES:
        return SecretValue(spec.type, _dummy_cert(), b"A", Secret(b"A"))
    key = b"A" * max(spec.size // 8, 1)
    return SecretValue(spec.type, None, key, Secret(key))


def dry_run_data(manifest: Manifest) -> TemplateData:
    """Placeholder values shaped like the real ones, for every secret and MarbleRun.*."""
    secrets = MappingProxyType({n: _placeholder(s) for n, s in manifest.secrets.items()})
    cert_only = SecretValue("cert", _dummy_cert(), b"", None)
    marblerun = {
        "RootCA": cert_only,
        "MarbleCert": SecretValue("cert", _dummy_cert(), b"A", Secret(b"A")),
        "CoordinatorRoot": cert_only,
        "CoordinatorIntermediate": cert_only,
    }
    return TemplateData(secrets, secrets, MappingProxyType(marblerun))


def check_manifest_templates(manifest: Manifest, prefix: str) -> None:
    data = dry_run_data(manifest)
    for marble in manifest.marbles.values():
        base = f"{prefix}Marbles.{marble.name}.Parameters"
        for path, value in marble.parameters.files.items():
            if not value.no_templates:
                render(value.data, data, kind="file", where=f"{base}.Files.{path}")
        for name, value in marble.parameters.env.items():
            if not value.no_templates:
                render(value.data, data, kind="env", where=f"{base}.Env.{name}")


def check_templates(manifest: Manifest) -> None:
    """Dry-run every template of ``manifest``; ``ManifestError`` names the key path."""
    check_manifest_templates(manifest, "")
