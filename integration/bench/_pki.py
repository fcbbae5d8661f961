"""The bench's mesh: a simulated coordinator, its manifest, and certificates got honestly.

Two marble types: ``server`` (what every candidate presents) and ``client`` (what the
load clients present; the manifest's Mesh.Allow lets ``client`` call ``server``). The
meshproxy candidate activates itself like any marble. For haproxy, nginx, stunnel and
the C load clients this module activates from Python with a signed simulated enclave of
the right package, exactly as a marble does (quote bound to a fresh key and nonce), and
writes the issued chain and key as PEM files those programs can load.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from integration.harness import Cluster
from meshproxy.attestation import (
    SimulationPlatform,
    SimulationProvider,
    load_signed,
    signer_id_of,
)
from meshproxy.coordinator.client import activate
from meshproxy.pki import cert_to_pem, generate_key, key_to_pem

TRUST_DOMAIN = "bench.meshproxy.local"
PRODUCTS = {"server": 1, "client": 2}
SERVER_DNS = ["localhost", f"server.{TRUST_DOMAIN}"]


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one run; every candidate gets the same server identity."""

    server_chain: Path  # server leaf + intermediate
    server_key: Path
    server_combined: Path  # chain + key in one file (haproxy's crt)
    client_chain: Path  # client leaf + intermediate
    client_key: Path
    root: Path  # what the load clients trust for the server's certificate
    ca_chain: Path  # root + intermediate: what the C peers verify client certificates to


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class BenchMesh:
    """The coordinator (via the integration harness) and everything signed for it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cluster = Cluster(base / "mesh")
        self.platform_dir = Path(self.cluster.env["MESHPROXY_SIM_PLATFORM"])
        self.signer = base / "mesh" / "signer.pem"

    @property
    def env(self) -> dict[str, str]:
        return self.cluster.env

    def start(self) -> None:
        self.cluster.start_coordinator()
        self.cluster.cli("enclave", "keygen", "-o", str(self.signer))
        signer_id = self._signer_id()
        package = {"SignerID": signer_id, "SecurityVersion": 1, "Debug": False}
        manifest = {
            "Packages": {t: {**package, "ProductID": p} for t, p in PRODUCTS.items()},
            "Marbles": {t: {"Package": t} for t in PRODUCTS},
            "Mesh": {"TrustDomain": TRUST_DOMAIN, "Allow": {"server": ["client"]}},
        }
        path = self.base / "mesh" / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2))
        self.cluster.cli(
            "manifest",
            "set",
            str(path),
            "--coordinator",
            self.cluster.client_addr,
            "--accept-simulation",
        )

    def close(self) -> None:
        self.cluster.close()

    def _signer_id(self) -> str:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(self._signer_pem(), None)
        return signer_id_of(key.public_key()).hex()

    def _signer_pem(self) -> bytes:
        lines = self.signer.read_bytes().splitlines(keepends=True)
        return b"".join(ln for ln in lines if not ln.startswith(b"#"))

    def sign(self, directory: Path, marble_type: str, files: list[str]) -> Path:
        """Describe and sign a simulated enclave of ``marble_type``'s package."""
        directory.mkdir(parents=True, exist_ok=True)
        desc = {
            "name": f"bench-{marble_type}",
            "product_id": PRODUCTS[marble_type],
            "security_version": 1,
            "debug": False,
            "files": files,
        }
        (directory / "enclave.yaml").write_text(yaml.safe_dump(desc))
        out = directory / "enclave.signed.json"
        self.cluster.cli(
            "enclave",
            "sign",
            str(directory / "enclave.yaml"),
            "--key",
            str(self.signer),
            "-o",
            str(out),
        )
        return out

    def issue(self, marble_type: str, dns_names: list[str]) -> dict[str, bytes]:
        """Activate like a marble of ``marble_type``; PEMs of leaf, chain and key."""
        signed = self.sign(self.base / "issuer" / marble_type, marble_type, ["meshproxy"])
        platform = SimulationPlatform.load_or_create(self.platform_dir, now=datetime.now(UTC))
        key = generate_key()
        act = activate(
            self.cluster.mesh_addr,
            marble_type=marble_type,
            instance=uuid.uuid4(),
            key=key,
            dns_names=dns_names,
            provider=SimulationProvider(platform, load_signed(signed).identity()),
            root=None,
            accept_simulation=True,
            platform_dir=self.platform_dir,
        )
        return {
            "chain": cert_to_pem(act.leaf) + cert_to_pem(act.intermediate),
            "key": key_to_pem(key).reveal(),
            "root": cert_to_pem(act.root),
            "intermediate": cert_to_pem(act.intermediate),
        }

    def cert_files(self, directory: Path) -> CertFiles:
        directory.mkdir(parents=True, exist_ok=True)
        server = self.issue("server", SERVER_DNS)
        client = self.issue("client", [f"loadgen.{TRUST_DOMAIN}"])
        files = CertFiles(
            server_chain=directory / "server.crt",
            server_key=directory / "server.key",
            server_combined=directory / "server.pem",
            client_chain=directory / "client.crt",
            client_key=directory / "client.key",
            root=directory / "root.crt",
            ca_chain=directory / "ca-chain.crt",
        )
        files.server_chain.write_bytes(server["chain"])
        _write_secret(files.server_key, server["key"])
        _write_secret(files.server_combined, server["chain"] + server["key"])
        files.client_chain.write_bytes(client["chain"])
        _write_secret(files.client_key, client["key"])
        files.root.write_bytes(server["root"])
        files.ca_chain.write_bytes(server["root"] + server["intermediate"])
        return files

    def marble_config(self, directory: Path, inbound: list[dict[str, Any]]) -> Path:
        """meshproxy's own marble config and signed enclave (re-signed on every call,
        so the measurement always matches the installed package)."""
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "coordinator": {"address": self.cluster.mesh_addr, "activation_timeout": "30s"},
            "marble": {"type": "server", "uuid_file": "uuid", "dns_names": SERVER_DNS},
            "attestation": {
                "provider": "simulation",
                "accept_simulation": True,
                "enclave": "enclave.signed.json",
            },
            "workdir": "run",
            "inbound": inbound,
            # Per-connection accept/close lines are info; the C peers log no access
            # lines either (access_log off, no haproxy log, stunnel debug=4).
            "log": {"level": "warning", "format": "json"},
        }
        path = directory / "marble.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.sign(directory, "server", ["marble.yaml", "meshproxy"])
        return path
