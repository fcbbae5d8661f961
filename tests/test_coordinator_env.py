"""Shared pieces of the coordinator's sans-IO tests (no tests of its own).

A ``World`` is one simulated machine with a coordinator core on an in-memory store that
seals every commit through the real vault, users with self-signed certificates, recovery
keys, and helpers that attest marbles the way the proxy does. Time is passed in.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshproxy._redact import Secret
from meshproxy.attestation import (
    EnclaveIdentity,
    SimulationPlatform,
    SimulationProvider,
    intel_anchor,
    simulation_anchor,
)
from meshproxy.coordinator import ActivationRequest, CoordinatorCore
from meshproxy.coordinator._admin import Admin
from meshproxy.coordinator._boot import StateSync, load_or_create
from meshproxy.coordinator._core import report_data_for
from meshproxy.coordinator._store import FileStore, StoreConflict
from meshproxy.coordinator._vault import Vault
from meshproxy.pki import generate_key, make_csr, public_der

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SIGNER = hashlib.sha256(b"test signer").digest()


def identity(product_id: int = 1, svn: int = 2, debug: bool = False) -> EnclaveIdentity:
    return EnclaveIdentity(
        unique_id=hashlib.sha256(b"app").digest(),
        signer_id=SIGNER,
        product_id=product_id,
        security_version=svn,
        debug=debug,
    )


def package(svn: int = 2) -> dict[str, Any]:
    return {"SignerID": SIGNER.hex(), "ProductID": 1, "SecurityVersion": svn}


@dataclass
class Person:
    """A manifest user: certificate and key."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(Encoding.PEM).decode()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(Encoding.DER)


def person(
    name: str,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    start: datetime = NOW - timedelta(days=1),
    days: int = 365,
) -> Person:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return Person(name, cert, key)


@dataclass
class RecoveryHolder:
    name: str
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    @property
    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )


class MemoryStore:
    """A versioned in-memory store with compare-and-swap, shareable by several cores."""

    shared = True
    where = "memory"

    def __init__(self) -> None:
        self.blob: bytes | None = None
        self.revision = 0
        self.writes = 0
        self.conflicts = 0
        self.before_save: Callable[[], None] | None = None  # runs once: a racing replica

    def load_versioned(self) -> tuple[bytes | None, int]:
        return self.blob, self.revision

    def save_versioned(self, blob: bytes, expected: int) -> int:
        hook, self.before_save = self.before_save, None
        if hook is not None:
            hook()
        if expected != self.revision:
            self.conflicts += 1
            raise StoreConflict("memory: stale revision")
        self.blob, self.revision = blob, self.revision + 1
        self.writes += 1
        return self.revision

    def close(self) -> None:
        pass


class PlatformSealer:
    name = "simulation"

    def __init__(self, platform: SimulationPlatform) -> None:
        self.platform = platform

    def key(self) -> Secret:
        return self.platform.sealing_key(b"test coordinator sealing")


class World:
    """One coordinator core on one simulated machine, over ``store``."""

    def __init__(
        self, tmp: Path, store: MemoryStore | FileStore | None = None, machine: str = "m1"
    ) -> None:
        self.tmp = tmp
        self.platform = SimulationPlatform.load_or_create(tmp / machine, now=NOW)
        self.store = store or MemoryStore()
        self.vault = Vault(PlatformSealer(self.platform), "memory")
        self.sync = StateSync(self.store, self.vault)  # type: ignore[arg-type]
        self.extra_anchors: list[SimulationPlatform] = []
        self.core = self.boot()

    def boot(self) -> CoordinatorCore:
        loaded = load_or_create(
            self.sync,
            lambda: CoordinatorCore.fresh_state(now=NOW, dns_names=["c.test"], simulation=True),
        )
        self.core = CoordinatorCore(
            loaded.persistent,
            commit=self.sync.commit,
            provider=SimulationProvider(self.platform, identity()),
            anchors=[intel_anchor(), simulation_anchor(self.platform)]
            + [simulation_anchor(p) for p in self.extra_anchors],
            simulation=True,
            refresh=self.sync.refresh,
            locked=self.sync if loaded.locked else None,
        )
        return self.core

    @property
    def admin(self) -> Admin:
        return Admin(self.core)

    def set_manifest(self, manifest: dict[str, Any]) -> dict[str, bytes]:
        result = self.core.initialize(json.dumps(manifest).encode(), now=NOW, owner_ok=True)
        return result.recovery_secrets

    def request(
        self,
        marble_type: str,
        ident: EnclaveIdentity | None = None,
        instance: str | None = None,
        platform: SimulationPlatform | None = None,
        now: datetime = NOW,
    ) -> ActivationRequest:
        key = generate_key()
        nonce = self.core.new_nonce(now=now)
        provider = SimulationProvider(platform or self.platform, ident or identity())
        quote = provider.get_quote(report_data_for(public_der(key), nonce))
        csr = make_csr(key, marble_type, ["svc.test"]).public_bytes(Encoding.PEM)
        return ActivationRequest(
            marble_type=marble_type,
            uuid=instance or str(uuid.uuid4()),
            csr_pem=csr,
            quote=quote,
            nonce=nonce,
        )
