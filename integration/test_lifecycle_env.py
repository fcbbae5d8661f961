"""Shared pieces of the coordinator lifecycle tests (no tests of its own): users and
recovery keys as files, a manifest builder, an etcd server, in-process marbles."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
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
@dataclass(frozen=True)
class EtcdTLSFiles:
    """A test CA, etcd's server certificate, and a client certificate both signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def coordinator_args(self, *, client_cert: bool = True) -> list[str]:
        args = ["--etcd-ca", str(self.ca)]
        if client_cert:
            args += ["--etcd-cert", str(self.client_cert), "--etcd-key", str(self.client_key)]
        return args


def make_etcd_tls(directory: Path) -> EtcdTLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    def write_key(name: str, key: ec.EllipticCurvePrivateKey) -> Path:
        path = directory / f"{name}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return path

    def issue(
        name: str, key: ec.EllipticCurvePrivateKey, ca: tuple[x509.Certificate, Any] | None,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:  # fmt: skip
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca[0].subject if ca else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical)
        cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("etcd-test-ca", ca_key, None, [(x509.BasicConstraints(True, None), True)])
    leaf = [(x509.BasicConstraints(False, None), True)]
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    issue("etcd-server", server_key, (ca, ca_key), [*leaf, (san, False)])
    client_key = ec.generate_private_key(ec.SECP256R1())
    issue("etcd-client", client_key, (ca, ca_key), leaf)
    return EtcdTLSFiles(
        ca=directory / "etcd-test-ca.pem",
        server_cert=directory / "etcd-server.pem",
        server_key=write_key("etcd-server", server_key),
        client_cert=directory / "etcd-client.pem",
        client_key=write_key("etcd-client", client_key),
    )


@dataclass
class Etcd:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    tls: EtcdTLSFiles | None = None


@contextlib.contextmanager
def etcd_server(base: Path, *, tls: EtcdTLSFiles | None = None) -> Iterator[Etcd]:
    """A throw-away single-member etcd on 127.0.0.1 random ports, stopped afterwards.

    With ``tls`` its client URL is https:// and it requires a client certificate signed by
    the test CA (``--client-cert-auth``)."""
    binary = shutil.which("etcd")
    if binary is None:  # scripts/setup.sh installs it; a missing etcd is a setup failure
        pytest.fail("etcd is not installed (Debian: apt-get install etcd-server)")
    data_dir = Path(tempfile.mkdtemp(prefix="etcd-", dir=base))
    client_port, peer_port = free_port(), free_port()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{client_port}"
    tls_args = []
    if tls is not None:
        tls_args = ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key),
                    "--trusted-ca-file", str(tls.ca), "--client-cert-auth"]  # fmt: skip
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
                *tls_args,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: _etcd_ready(url, tls), 30, "etcd ready", proc, log)
        yield Etcd(url, proc, data_dir, tls)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(data_dir, ignore_errors=True)


def _etcd_ready(url: str, tls: EtcdTLSFiles | None = None) -> bool:
    import ssl
    import urllib.request

    ctx = None
    if tls is not None:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1, context=ctx) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False
