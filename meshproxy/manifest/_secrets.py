"""``Secrets.<name>``: type, size and validity rules, and the certificate template.

MarbleRun checks the type in ``Check`` and the size only when it generates the secret;
both are checked here, up front. Where MarbleRun silently ignores a setting that cannot
apply (``ValidFor`` or ``Cert`` on a symmetric key), it is an error here.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime, timedelta, timezone

from meshproxy.config import Node
from meshproxy.manifest._model import CERT_TYPES, SECRET_TYPES, CertTemplate, SecretSpec
from meshproxy.manifest._read import (
    names,
    opt_bool,
    opt_str,
    opt_uint,
    present,
    suggest,
)

_SECRET_KEYS = ("Type", "Size", "Shared", "UserDefined", "ValidFor", "Cert", "Private", "Public")
_ECDSA_SIZES = (224, 256, 384, 521)
_DEFAULT_VALID_FOR_DAYS = 365

# Every exported field of Go's x509.Certificate, so a misspelling gets a suggestion and a
# real field we do not implement gets a clear "not supported" instead of being ignored.
_X509_FIELDS = (
    "Raw", "RawTBSCertificate", "RawSubjectPublicKeyInfo", "RawSubject", "RawIssuer",
    "Signature", "SignatureAlgorithm", "PublicKeyAlgorithm", "PublicKey", "Version",
    "SerialNumber", "Issuer", "Subject", "NotBefore", "NotAfter", "KeyUsage", "Extensions",
    "ExtraExtensions", "UnhandledCriticalExtensions", "ExtKeyUsage", "UnknownExtKeyUsage",
    "BasicConstraintsValid", "IsCA", "MaxPathLen", "MaxPathLenZero", "SubjectKeyId",
    "AuthorityKeyId", "OCSPServer", "IssuingCertificateURL", "DNSNames", "EmailAddresses",
    "IPAddresses", "URIs", "PermittedDNSDomainsCritical", "PermittedDNSDomains",
    "ExcludedDNSDomains", "PermittedIPRanges", "ExcludedIPRanges", "PermittedEmailAddresses",
    "ExcludedEmailAddresses", "PermittedURIDomains", "ExcludedURIDomains",
    "CRLDistributionPoints", "PolicyIdentifiers", "Policies", "InhibitAnyPolicy",
    "InhibitAnyPolicyZero", "InhibitPolicyMapping", "InhibitPolicyMappingZero",
    "RequireExplicitPolicy", "RequireExplicitPolicyZero", "PolicyMappings",
)  # fmt: skip
_X509_SUPPORTED = ("Subject", "DNSNames", "IPAddresses", "NotAfter")
_NAME_FIELDS = (
    "Country", "Organization", "OrganizationalUnit", "Locality", "Province", "StreetAddress",
    "PostalCode", "SerialNumber", "CommonName", "Names", "ExtraNames",
)  # fmt: skip
_NAME_SUPPORTED = ("CommonName", "Organization")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|([+-])(\d{2}):(\d{2}))"
)


def parse_secrets(node: Node | None) -> dict[str, SecretSpec]:
    if node is None:
        return {}
    return {name: _secret(name, child) for name, child in node.items().items()}


def _secret(name: str, node: Node) -> SecretSpec:
    fields = node.mapping(_SECRET_KEYS, case_insensitive=True)
    for key in ("Private", "Public"):
        if present(fields, key) is not None:
            fields[key].fail(
                "is filled in by the coordinator and must not be in a manifest "
                "(upload user-defined secret values with 'secret set')"
            )
    type_node = present(fields, "Type")
    if type_node is None:
        node.fail(f"missing required key 'Type' (one of {', '.join(SECRET_TYPES)})")
    kind = type_node.str()
    if kind not in SECRET_TYPES:
        type_node.fail(
            f"unknown secret type {kind!r}{suggest(kind, SECRET_TYPES)}; "
            f"one of {', '.join(SECRET_TYPES)}"
        )
    size = opt_uint(fields, "Size") or 0
    user_defined = opt_bool(fields, "UserDefined")
    _check_size(present(fields, "Size") or node, kind, size, user_defined)

    valid_for = opt_uint(fields, "ValidFor", maximum=1_000_000) or 0
    cert_node = present(fields, "Cert")
    is_cert = kind in CERT_TYPES
    if not is_cert and valid_for:
        fields["ValidFor"].fail(f"only certificate secrets have a validity; {kind!r} has none")
    if not is_cert and cert_node is not None and cert_node.value != {}:
        cert_node.fail(f"only certificate secrets take a Cert template; {kind!r} is not one")
    cert = _cert_template(cert_node) if is_cert and cert_node is not None else CertTemplate()
    if valid_for and cert.not_after is not None:
        fields["ValidFor"].fail("give either ValidFor or Cert.NotAfter, not both")
    valid_for_days: int | None = None
    if is_cert and cert.not_after is None:
        valid_for_days = valid_for or _DEFAULT_VALID_FOR_DAYS
    return SecretSpec(
        name=name,
        type=kind,
        size=size,
        shared=opt_bool(fields, "Shared"),
        user_defined=user_defined,
        valid_for_days=valid_for_days,
        cert=cert,
    )


def _check_size(where: Node, kind: str, size: int, user_defined: bool) -> None:
    if kind == "plain":
        if not user_defined:
            where.fail("a 'plain' secret is never generated: set UserDefined: true")
        return
    if kind == "cert-ed25519":
        if size:
            where.fail(f"cert-ed25519 keys have a fixed size: omit Size (got {size})")
        return
    if size == 0 and user_defined:
        return  # uploaded later; MarbleRun does not need a size to accept the manifest
    if kind == "symmetric-key" and (size == 0 or size % 8):
        where.fail(
            f"symmetric-key Size is in bits and must be a positive multiple of 8 (got {size})"
        )
    if kind == "cert-ecdsa" and size not in _ECDSA_SIZES:
        sizes = ", ".join(map(str, _ECDSA_SIZES))
        where.fail(f"cert-ecdsa Size must name a curve: one of {sizes} (got {size})")
    if kind == "cert-rsa" and size < 2048:
        where.fail(f"cert-rsa Size must be at least 2048 bits (got {size})")


def _cert_template(node: Node) -> CertTemplate:
    fields = node.mapping(_X509_FIELDS, case_insensitive=True)
    _refuse_unsupported(fields, _X509_SUPPORTED, "x509 certificate template field")
    common_name: str | None = None
    organization: tuple[str, ...] = ()
    subject = present(fields, "Subject")
    if subject is not None:
        name_fields = subject.mapping(_NAME_FIELDS, case_insensitive=True)
        _refuse_unsupported(name_fields, _NAME_SUPPORTED, "x509 subject field")
        common_name = opt_str(name_fields, "CommonName") or None
        organization = names(present(name_fields, "Organization"))
    ips = present(fields, "IPAddresses")
    return CertTemplate(
        common_name=common_name,
        dns_names=names(present(fields, "DNSNames")),
        ip_addresses=tuple(_ip(n) for n in ips.list()) if ips is not None else (),
        organization=organization,
        not_after=_not_after(present(fields, "NotAfter")),
    )


def _refuse_unsupported(fields: dict[str, Node], supported: tuple[str, ...], what: str) -> None:
    for key, child in fields.items():
        if key not in supported and child.value is not None:
            child.fail(
                f"{what} {key!r} is not supported by meshproxy "
                f"(supported: {', '.join(supported)}); remove it"
            )


def _ip(node: Node) -> str:
    text = node.str()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        node.fail(f"not an IP address: {text!r}")


def _not_after(node: Node | None) -> datetime | None:
    if node is None:
        return None
    value = node.value
    if isinstance(value, datetime):  # YAML reads an unquoted timestamp itself
        if value.tzinfo is None:
            node.fail("a timestamp needs a time zone (RFC 3339, e.g. 2030-01-01T00:00:00Z)")
        try:
            return value.astimezone(UTC)
        except (ValueError, OverflowError):
            node.fail(f"not a valid date and time: {value}")
    text = node.str()
    match = _RFC3339.fullmatch(text)
    if match is None:
        node.fail(f"not an RFC 3339 timestamp: {text!r} (e.g. 2030-01-01T00:00:00Z)")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    micros = int((match.group(7) or "0").ljust(6, "0")[:6])
    offset = timedelta(0)
    if match.group(8) != "Z":
        sign = -1 if match.group(9) == "-" else 1
        offset = sign * timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
    try:
        stamp = datetime(
            year, month, day, hour, minute, second, micros, tzinfo=timezone(offset)
        ).astimezone(UTC)
    except (ValueError, OverflowError):
        node.fail(f"not a valid date and time: {text!r}")
    # Go's zero time means "unset" (time.Time.IsZero), so MarbleRun treats it as absent.
    if stamp == datetime(1, 1, 1, tzinfo=UTC):
        return None
    return stamp
