"""The manifest as frozen values: what the parser produces and everyone else reads.

Field names follow MarbleRun's manifest (``marblerun.md`` section 2) in snake_case; our
own additions live in ``MeshSection``. Mappings are read-only views in document order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

SECRET_TYPES = ("symmetric-key", "cert-ecdsa", "cert-rsa", "cert-ed25519", "plain")
CERT_TYPES = ("cert-ecdsa", "cert-rsa", "cert-ed25519")
TCB_STATUSES = (
    "UpToDate",
    "OutOfDate",
    "Revoked",
    "ConfigurationNeeded",
    "OutOfDateConfigurationNeeded",
    "SWHardeningNeeded",
    "ConfigurationAndSWHardeningNeeded",
)
DEFAULT_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded")
SEAL_MODES = ("ProductKey", "UniqueKey", "Disabled")
FEATURE_GATES = ("SignQuoteEndpoint", "MonotonicCounter")
RESERVED_SECRETS = ("RootCA", "MarbleCert", "CoordinatorRoot", "CoordinatorIntermediate")
DEFAULT_TRUST_DOMAIN = "meshproxy.local"
DEFAULT_CERTIFICATE_LIFETIME = 24 * 3600.0


def fingerprint(raw: bytes) -> str:
    """Hex SHA-256 of the manifest bytes exactly as given (what clients compare)."""
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Package:
    """An enclave identity a marble's quote must match.

    Either ``unique_id`` (MRENCLAVE) or ``signer_id`` + ``product_id`` + minimum
    ``security_version`` is set for every package a marble uses, unless ``debug``.
    """

    name: str
    unique_id: bytes | None
    signer_id: bytes | None
    product_id: int | None
    security_version: int | None
    debug: bool
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_TCB_STATUSES
    accepted_advisories: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileValue:
    """A Files or Env value, already decoded from its manifest ``Encoding``."""

    data: bytes
    no_templates: bool


@dataclass(frozen=True)
class Parameters:
    files: Mapping[str, FileValue]
    env: Mapping[str, FileValue]
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Marble:
    name: str
    package: str
    max_activations: int  # 0 = unlimited
    parameters: Parameters
    tls: tuple[str, ...]
    disable_secret_binding: bool


@dataclass(frozen=True)
class CertTemplate:
    """The subset of Go's ``x509.Certificate`` template that meshproxy honours."""

    common_name: str | None = None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    organization: tuple[str, ...] = ()
    not_after: datetime | None = None


@dataclass(frozen=True)
class SecretSpec:
    """A secret's definition; the coordinator generates or receives its value.

    ``size`` is in bits. ``valid_for_days`` is set for certificate secrets only: the
    manifest's ``ValidFor``, or MarbleRun's default of 365 when neither it nor
    ``cert.not_after`` is given; ``None`` when ``cert.not_after`` fixes the end.
    """

    name: str
    type: str
    size: int
    shared: bool
    user_defined: bool
    valid_for_days: int | None
    cert: CertTemplate


@dataclass(frozen=True)
class User:
    name: str
    certificate_pem: bytes  # the first certificate of the manifest's PEM, re-encoded
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Role:
    name: str
    resource_type: str  # Packages | Secrets | Manifest
    resource_names: tuple[str, ...]
    actions: tuple[str, ...]  # lower-cased: updatesecurityversion, readsecret, ...


@dataclass(frozen=True)
class TLSEntry:
    """One ``TLS.<tag>.Outgoing`` / ``Incoming`` entry (MarbleRun Transparent TLS)."""

    port: str
    addr: str = ""
    cert: str = ""
    disable_client_auth: bool = False


@dataclass(frozen=True)
class TLSTag:
    outgoing: tuple[TLSEntry, ...]
    incoming: tuple[TLSEntry, ...]


@dataclass(frozen=True)
class ManifestConfig:
    seal_mode: str = "ProductKey"
    feature_gates: tuple[str, ...] = ()
    update_threshold: int = 0  # 0 = every user holding UpdateManifest
    recovery_threshold: int = 0  # 0 = every recovery key
    rotate_root_secret: bool = False


_UNSAFE_PATH = re.compile(r"//|/\.\.?(/|$)|%2[eEfF]|%5[cC]|%00|\\")


def path_problem(path: str) -> str | None:
    """Why ``path`` is not in the normal form route rules compare, or None.

    Route rules compare paths literally, so a path that an app might read differently
    (dot segments, doubled or encoded slashes, encoded dots) is refused instead.
    """
    if not path.startswith("/"):
        return "must start with '/'"
    if any(c in path for c in "?#") or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in path):
        return "must be a path only (no query, fragment, spaces or control characters)"
    if _UNSAFE_PATH.search(path):
        return "must be in normal form (no '//', '.' or '..' segments, %2e, %2f, %5c, %00, '\\')"
    return None


@dataclass(frozen=True)
class RouteRule:
    """One ``Mesh.Routes`` rule: which caller marble types may send which requests.

    Exactly one of ``path`` (exact match) and ``path_prefix`` (whole segments: ``/a``
    matches ``/a`` and ``/a/b``, not ``/ab``) is set. No ``methods`` means any method; an
    empty ``allow`` refuses everybody.
    """

    path: str | None
    path_prefix: str | None
    methods: tuple[str, ...]
    allow: tuple[str, ...]

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path is not None:
            return path == self.path
        prefix = (self.path_prefix or "/").rstrip("/")
        return path == prefix or path.startswith(prefix + "/")


_NO_ROUTES: Mapping[str, tuple[RouteRule, ...]] = MappingProxyType({})


@dataclass(frozen=True)
class MeshSection:
    """meshproxy's addition: identity naming and which marble types may call which."""

    trust_domain: str
    certificate_lifetime: float  # seconds
    allow: Mapping[str, tuple[str, ...]]  # callee marble type -> caller marble types
    # callee marble type -> per-route rules of its HTTP listeners (absent: any route)
    routes: Mapping[str, tuple[RouteRule, ...]] = field(default_factory=lambda: _NO_ROUTES)

    def callers_of(self, marble_type: str) -> tuple[str, ...]:
        """The marble types allowed to call ``marble_type``; none unless listed."""
        return self.allow.get(marble_type, ())

    def routes_of(self, marble_type: str) -> tuple[RouteRule, ...]:
        """Per-route rules of ``marble_type``'s HTTP listeners; none: any route."""
        return self.routes.get(marble_type, ())


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    packages: Mapping[str, Package]
    marbles: Mapping[str, Marble]
    secrets: Mapping[str, SecretSpec]
    users: Mapping[str, User]
    roles: Mapping[str, Role]
    recovery_keys: Mapping[str, bytes]  # name -> PEM SubjectPublicKeyInfo (RSA)
    tls: Mapping[str, Any]  # tag -> TLSTag
    config: ManifestConfig
    mesh: MeshSection

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)
