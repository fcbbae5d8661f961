"""Shared pieces of the coordinator lifecycle tests (no tests of its own): users and
recovery keys as files, a manifest builder, an etcd server, in-process marbles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from integration.harness import Cluster, free_port, wait_for
from meshproxy.attestation import EnclaveIdentity, SimulationPlatform, SimulationProvider
from meshproxy.coordinator import client
from meshproxy.pki import generate_key

SIGNER = hashlib.sha256(b"lifecycle signer").digest()


def marble_identity(svn: int = 1) -> EnclaveIdentity:
    return EnclaveIdentity(
        unique_id=hashlib.sha256(b"lifecycle app").digest(),
        signer_id=SIGNER,
        product_id=7,
        security_version=svn,
        debug=False,
    )


def package(svn: int = 1) -> dict[str, Any]:
    return {"SignerID": SIGNER.hex(), "ProductID": 7, "SecurityVersion": svn}


@dataclass(frozen=True)
class UserFiles:
    name: str
    cert: Path
    key: Path

    @property
    def pem(self) -> str:
        return self.cert.read_text()

    def args(self) -> list[str]:
        return ["--cert", str(self.cert), "--key", str(self.key)]


def make_user(directory: Path, name: str, *, days: int = 30) -> UserFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return UserFiles(name, cert_path, key_path)


@dataclass(frozen=True)
class RecoveryKeyFiles:
    name: str
    private: Path
    public_pem: str


def make_recovery_key(directory: Path, name: str) -> RecoveryKeyFiles:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-recovery.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RecoveryKeyFiles(name, path, public.decode())


def write_manifest(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


def coordinator_args(c: Cluster) -> list[str]:
    return ["--coordinator", c.client_addr, "--accept-simulation"]


class Marble:
    """An in-process marble on one simulated machine: what ``meshproxy run`` does to activate."""

    def __init__(self, platform_dir: Path, marble_type: str, svn: int = 1) -> None:
        self.platform = SimulationPlatform.load_or_create(platform_dir, now=datetime.now(UTC))
        self.provider = SimulationProvider(self.platform, marble_identity(svn))
        self.marble_type = marble_type
        self.instance = uuid.uuid4()
        self.key = generate_key()

    def activate(self, mesh_addr: str, root: x509.Certificate | None = None) -> client.Activation:
        return client.activate(
            mesh_addr,
            marble_type=self.marble_type,
            instance=self.instance,
            key=self.key,
            dns_names=["marble.test"],
            provider=self.provider,
            root=root,
            accept_simulation=True,
            platform_dir=None,
        )

    def renew(self, mesh_addr: str, root: x509.Certificate) -> client.Renewal:
        return client.renew(
            mesh_addr,
            marble_type=self.marble_type,
            instance=self.instance,
            key=self.key,
            dns_names=["marble.test"],
            provider=self.provider,
            root=root,
        )


# -- etcd -----------------------------------------------------------------------------------
@dataclass
class Etcd:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path


@contextlib.contextmanager
def etcd_server(base: Path) -> Iterator[Etcd]:
    """A throw-away single-member etcd on 127.0.0.1 random ports, stopped afterwards."""
    binary = shutil.which("etcd")
    if binary is None:  # scripts/setup.sh installs it; a missing etcd is a setup failure
        pytest.fail("etcd is not installed (Debian: apt-get install etcd-server)")
    data_dir = Path(tempfile.mkdtemp(prefix="etcd-", dir=base))
    client_port, peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    log = base / "etcd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                binary,
                "--name",
                "lifecycle",
                "--data-dir",
                str(data_dir),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"lifecycle={peer}",
                "--log-level",
                "warn",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: _etcd_ready(url), 30, "etcd ready", proc, log)
        yield Etcd(url, proc, data_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(data_dir, ignore_errors=True)


def _etcd_ready(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False
