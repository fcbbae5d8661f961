"""Fixtures for real-process tests: a simulated coordinator, signed enclaves, marbles."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from integration.harness import Cluster, free_port

APPS = Path(__file__).parent / "apps"


@dataclass(frozen=True)
class Signer:
    key_path: Path
    signer_id: str


@pytest.fixture(scope="session")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("signer") / "signer.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Signer(path, hashlib.sha256(spki).hexdigest())


def package(signer: Signer, product_id: int, svn: int = 1, debug: bool = False) -> dict[str, Any]:
    return {
        "SignerID": signer.signer_id,
        "ProductID": product_id,
        "SecurityVersion": svn,
        "Debug": debug,
    }


class Mesh:
    """A coordinator with a manifest, and a factory for marbles of that manifest."""

    def __init__(self, cluster: Cluster, signer: Signer) -> None:
        self.c = cluster
        self.signer = signer
        self.dir = cluster.base / "marbles"
        self.dir.mkdir(exist_ok=True)

    def set_manifest(self, manifest: dict[str, Any]) -> Path:
        path = self.c.base / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2))
        self.c.cli(
            "manifest", "set", str(path), "--coordinator", self.c.client_addr, "--accept-simulation"
        )
        return path

    def marble_config(
        self,
        name: str,
        marble_type: str,
        *,
        app: list[str],
        inbound: list[dict[str, Any]] = (),  # type: ignore[assignment]
        outbound: list[dict[str, Any]] = (),  # type: ignore[assignment]
        product_id: int = 1,
        svn: int = 1,
        debug: bool = False,
        coordinator: str | None = None,
        activation_timeout: str = "20s",
        extra: dict[str, Any] | None = None,
    ) -> Path:
        d = self.dir / name
        d.mkdir(exist_ok=True)
        config = {
            "coordinator": {
                "address": coordinator or self.c.mesh_addr,
                "activation_timeout": activation_timeout,
            },
            "marble": {
                "type": marble_type,
                "uuid_file": "uuid",
                "dns_names": [f"{name}.test.local", "localhost"],
            },
            "attestation": {
                "provider": "simulation",
                "accept_simulation": True,
                "enclave": "enclave.signed.json",
            },
            "workdir": "run",
            "inbound": list(inbound),
            "outbound": list(outbound),
            "log": {"level": "info", "format": "json"},
        }
        config.update(extra or {})
        (d / "marble.yaml").write_text(yaml.safe_dump(config))
        desc = {
            "name": name,
            "product_id": product_id,
            "security_version": svn,
            "debug": debug,
            "files": ["marble.yaml", "meshproxy"],
        }
        (d / "enclave.yaml").write_text(yaml.safe_dump(desc))
        self.c.cli(
            "enclave",
            "sign",
            str(d / "enclave.yaml"),
            "--key",
            str(self.signer.key_path),
            "-o",
            str(d / "enclave.signed.json"),
        )
        return d / "marble.yaml"

    def start(self, name: str, config: Path, app: list[str], **kw: Any) -> Any:
        return self.c.start_marble(name, config, app, **kw)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        yield c


@pytest.fixture
def mesh(cluster: Cluster, signer: Signer) -> Mesh:
    return Mesh(cluster, signer)


def port() -> int:
    return free_port()


# -- helpers for the HTTP, interop and Kubernetes tests ------------------------------------
def root_certificate(mesh: Mesh, path: Path) -> Path:
    """The cluster's root certificate, fetched the way users do (``certificate root``)."""
    mesh.c.cli(
        "certificate", "root", "--coordinator", mesh.c.client_addr, "--accept-simulation",
        "-o", str(path),
    )  # fmt: skip
    return path


def wait_tcp(port: int, what: str, proc: Any = None, timeout: float = 30) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    import socket as _socket

    from integration.harness import wait_for

    def accepting() -> bool:
        try:
            with _socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(accepting, timeout, what, proc)
