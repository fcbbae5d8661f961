"""Talking to a coordinator: trust establishment, the client API, and marble activation.

Blocking on purpose: the CLI is synchronous and the proxy activates before its event loop
serves anything. Trust is established one way everywhere: a pinned root certificate, or
else the coordinator's quote, verified here, that binds the root certificate and a fresh
nonce; only then is the root pinned for every further request.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshproxy.attestation import (
    QuoteProvider,
    SimulationPlatform,
    TrustAnchor,
    VerifiedQuote,
    default_platform_dir,
    intel_anchor,
    simulation_anchor,
    verify_quote,
)
from meshproxy.coordinator import _wire as wire
from meshproxy.errors import AttestationError, ConnectError, CoordinatorError, PKIError
from meshproxy.pki import cert_to_pem, certs_from_pem, make_csr, public_der, verify_issued_by


def parse_address(text: str, where: str = "coordinator address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConnectError(f"{where} {text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


@dataclass(frozen=True)
class MeshPolicy:
    trust_domain: str
    allow: Mapping[str, tuple[str, ...]]

    def callers_of(self, marble_type: str) -> tuple[str, ...]:
        return self.allow.get(marble_type, ())


@dataclass(frozen=True)
class Activation:
    marble_type: str
    uuid: str
    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate
    files: Mapping[str, bytes]
    env: Mapping[str, bytes]
    argv: tuple[str, ...]
    mesh: MeshPolicy
    simulated: bool

    def __repr__(self) -> str:  # env and files may hold secrets
        return f"<Activation {self.marble_type} {self.uuid} files={len(self.files)}>"


@dataclass(frozen=True)
class ClusterEvidence:
    root: x509.Certificate
    intermediate: x509.Certificate
    verified: VerifiedQuote


class Connection:
    """HTTPS to one coordinator listener, pinned to its root certificate (or not yet)."""

    def __init__(self, address: str, root: x509.Certificate | None, timeout: float = 10.0):
        self.address = address
        self.host, self.port = parse_address(address)
        self.root = root
        self.timeout = timeout

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # identity is the pinned root itself, checked below
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.root is None:
            ctx.verify_mode = ssl.CERT_NONE  # only to fetch a quote, which we verify
        else:
            ctx.load_verify_locations(cadata=cert_to_pem(self.root).decode())
        return ctx

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self._context()
        )
        where = f"coordinator {self.address}"
        try:
            conn.connect()
            presented = conn.sock.getpeercert(binary_form=True) if conn.sock else None
            if self.root is not None and presented != self.root.public_bytes(Encoding.DER):
                raise PKIError(f"{where} does not present the pinned root certificate")
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ssl.SSLCertVerificationError as exc:
            raise PKIError(
                f"{where} presented a certificate that does not chain to the pinned root "
                f"({exc.verify_message}); if the cluster was re-created, verify it again "
                "with 'meshproxy manifest verify'"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectError(f"cannot reach {where}: {_reason(exc)}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConnectError(
                f"{where} answered HTTP {resp.status} with a body that is not JSON"
            ) from None
        doc = wire.unwrap(doc, where)
        if doc["status"] != "success":
            raise CoordinatorError(
                f"{where} refused: {doc.get('message', 'no reason given')}", http_status=resp.status
            )
        return doc.get("data")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# -- trust ----------------------------------------------------------------------------------
def anchors_for(
    accept_simulation: bool, platform_dir: Path | None, now: datetime
) -> list[TrustAnchor]:
    anchors = [intel_anchor()]
    if accept_simulation:
        directory = platform_dir or default_platform_dir()
        if not directory.is_dir():
            raise AttestationError(
                f"no simulated platform at {directory}: a simulated coordinator can only be "
                "verified on its own simulated platform (set MESHPROXY_SIM_PLATFORM)",
                check="anchor",
            )
        anchors.append(simulation_anchor(SimulationPlatform.load_or_create(directory, now=now)))
    return anchors


def fetch_evidence(
    address: str,
    *,
    accept_simulation: bool,
    platform_dir: Path | None = None,
    timeout: float = 10.0,
    now: datetime | None = None,
) -> ClusterEvidence:
    """Verify the coordinator's quote over a fresh nonce; return the root it binds."""
    now = now or datetime.now(UTC)
    nonce = os.urandom(32)
    q = base64.urlsafe_b64encode(nonce).decode().rstrip("=")
    data = Connection(address, None, timeout).request(
        "GET", f"{wire.CLIENT_PATHS['quote']}?nonce={q}"
    )
    try:
        certs = certs_from_pem(str(data["cert"]).encode(), "coordinator certificate chain")
        quote = wire.b64d(data["quote"], "quote")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConnectError(f"coordinator {address} sent a malformed quote answer: {exc}") from None
    if len(certs) != 2:
        raise PKIError(f"coordinator {address} sent {len(certs)} certificates, expected 2")
    intermediate, root = certs
    try:
        verified = verify_quote(quote, anchors_for(accept_simulation, platform_dir, now), now=now)
    except AttestationError as exc:
        if exc.check == "vendor" and not accept_simulation:
            raise AttestationError(
                f"coordinator {address} is running in simulation mode; pass "
                "--accept-simulation to trust a simulated coordinator",
                check="vendor",
            ) from None
        raise
    expected = hashlib.sha256(root.public_bytes(Encoding.DER) + nonce).digest()
    if verified.report_data[:32] != expected:
        raise AttestationError(
            f"coordinator {address}: quote does not bind the root certificate it sent and "
            "our nonce",
            check="report-data",
        )
    return ClusterEvidence(root=root, intermediate=intermediate, verified=verified)


# -- activation -----------------------------------------------------------------------------
def activate(
    address: str,
    *,
    marble_type: str,
    instance: uuidlib.UUID,
    key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    provider: QuoteProvider,
    root: x509.Certificate | None,
    accept_simulation: bool,
    platform_dir: Path | None,
    timeout: float = 10.0,
) -> Activation:
    """One activation attempt (ARCHITECTURE section 5). Blocking."""
    if root is None:
        root = fetch_evidence(
            address,
            accept_simulation=accept_simulation,
            platform_dir=platform_dir,
            timeout=timeout,
        ).root
    conn = Connection(address, root, timeout)
    nonce = wire.b64d(conn.request("POST", wire.MESH_PATHS["nonce"], {})["nonce"], "nonce")
    report_data = hashlib.sha256(public_der(key) + nonce).digest()
    quote = provider.get_quote(report_data)
    csr = make_csr(key, marble_type, dns_names)
    data = conn.request(
        "POST",
        wire.MESH_PATHS["activate"],
        {
            "marbleType": marble_type,
            "uuid": str(instance),
            "csr": csr.public_bytes(Encoding.PEM).decode(),
            "quote": wire.b64e(quote),
            "nonce": wire.b64e(nonce),
        },
    )
    try:
        leaf = certs_from_pem(data["certificate"].encode())[0]
        intermediate = certs_from_pem(data["intermediate"].encode())[0]
        params = data["parameters"]
        mesh = data["mesh"]
        activation = Activation(
            marble_type=marble_type,
            uuid=str(instance),
            leaf=leaf,
            intermediate=intermediate,
            root=root,
            files={k: wire.b64d(v, f"file {k}") for k, v in params["files"].items()},
            env={k: wire.b64d(v, f"env {k}") for k, v in params["env"].items()},
            argv=tuple(str(a) for a in params["argv"]),
            mesh=MeshPolicy(
                trust_domain=str(mesh["trustDomain"]),
                allow={str(k): tuple(str(x) for x in v) for k, v in mesh["allow"].items()},
            ),
            simulated=bool(data["simulation"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ConnectError(f"coordinator {address} sent a malformed activation: {exc}") from None
    if leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != (
        public_der(key)
    ):
        raise PKIError("coordinator issued a certificate for another key")
    now = datetime.now(UTC)
    verify_issued_by(leaf, intermediate, now=now)
    verify_issued_by(intermediate, root, now=now)
    return activation
