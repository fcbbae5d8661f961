"""Talking to a coordinator: trust establishment, the client API, marble activation and
renewal.

Blocking on purpose: the CLI is synchronous and the proxy activates before its event loop
serves anything. Trust is established one way everywhere: a pinned root certificate, or
else the coordinator's quote, verified here, that binds the root certificate and a fresh
nonce; only then is the root pinned for every further request. A user authenticates with
a client certificate (``ClientIdentity``).

``activate`` and ``renew`` attest the same way (``POST /api/v2/marble/nonce``, then a quote
whose report data is SHA-256 of the RA-TLS claims {"pubkey-hash": [1, SHA-256(SPKI)],
"nonce": nonce}, and a CSR for the key); the coordinator puts that quote and those claims
into the leaf's RA-TLS extension (2.23.133.5.4.9), so RA-TLS verifiers can check a marble.
``renew`` is for a running marble whose leaf nears its end (the proxy renews at 70 % of its
lifetime): it
posts to ``/api/v2/marble/renew`` and gets a new leaf for its key under the cluster's
current intermediate, plus that intermediate and the mesh policy; it is not counted against
MaxActivations. It is refused (``CoordinatorError``, HTTP 403, with the reason) when the
marble no longer satisfies the manifest, e.g. after a package update raised its minimum
SecurityVersion or a manifest update removed its type. Nonce and attested request may
reach different replicas of a cluster (every replica checks every replica's nonces).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import socket
import ssl
import uuid as uuidlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshproxy._redact import Secret
from meshproxy.attestation import (
    QuoteProvider,
    SimulationPlatform,
    SimulationProvider,
    TrustAnchor,
    VerifiedQuote,
    default_platform_dir,
    intel_anchor,
    ratls_report_data,
    simulation_anchor,
    verify_quote,
)
from meshproxy.coordinator import _wire as wire
from meshproxy.errors import (
    AttestationError,
    ConnectError,
    CoordinatorError,
    PKIError,
    PolicyError,
)
from meshproxy.pki import cert_to_pem, certs_from_pem, make_csr, public_der, verify_issued_by

if TYPE_CHECKING:  # loaded where used: an activation needs neither policy nor collateral
    from meshproxy.attestation import Collateral, CoordinatorPolicy
    from meshproxy.manifest import RouteRule  # only for a reply that has routes


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
    # callee marble type -> the manifest's Mesh.Routes rules for its HTTP listeners
    routes: Mapping[str, tuple[RouteRule, ...]] = field(default_factory=dict)

    def callers_of(self, marble_type: str) -> tuple[str, ...]:
        return self.allow.get(marble_type, ())

    def routes_of(self, marble_type: str) -> tuple[RouteRule, ...]:
        return self.routes.get(marble_type, ())


def _mesh_policy(mesh: Mapping[str, Any]) -> MeshPolicy:
    """The ``mesh`` object of an activation or renewal reply (``routes`` may be absent)."""
    routes: dict[str, tuple[RouteRule, ...]] = {}
    for marble, rules in (mesh.get("routes") or {}).items():
        from meshproxy.manifest import RouteRule

        routes[str(marble)] = tuple(
            RouteRule(
                path=str(r["path"]) if r.get("path") is not None else None,
                path_prefix=str(r["pathPrefix"]) if r.get("pathPrefix") is not None else None,
                methods=tuple(str(m) for m in r.get("methods") or ()),
                allow=tuple(str(a) for a in r.get("allow") or ()),
            )
            for r in rules
        )
    return MeshPolicy(
        trust_domain=str(mesh["trustDomain"]),
        allow={str(k): tuple(str(x) for x in v) for k, v in mesh["allow"].items()},
        routes=routes,
    )


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
    sealing_key: Secret | None = None  # None: the coordinator sent none (an older one)

    def __repr__(self) -> str:  # env and files may hold secrets
        return f"<Activation {self.marble_type} {self.uuid} files={len(self.files)}>"


@dataclass(frozen=True)
class ClusterEvidence:
    root: x509.Certificate
    intermediate: x509.Certificate
    verified: VerifiedQuote


@dataclass(frozen=True)
class ClientIdentity:
    """A user's client certificate and key, as files (the key is read by OpenSSL only)."""

    cert_path: Path
    key_path: Path


class Connection:
    """HTTPS to one coordinator listener, pinned to its root certificate (or not yet).

    With ``identity`` the connection presents a user's client certificate (the client API
    authenticates users by it); ``headers`` are sent with every request.
    """

    def __init__(
        self,
        address: str,
        root: x509.Certificate | None,
        timeout: float = 10.0,
        *,
        identity: ClientIdentity | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        self.address = address
        self.host, self.port = parse_address(address)
        self.root = root
        self.timeout = timeout
        self.identity = identity
        self.headers = dict(headers or {})
        self._keep = False  # inside kept_open(): requests share one TLS connection
        self._kept: http.client.HTTPSConnection | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.address} pinned={self.root is not None}>"

    @contextlib.contextmanager
    def kept_open(self) -> Iterator[Connection]:
        """Requests inside share one TLS connection (one handshake), closed at the end of
        the outermost ``kept_open``."""
        outer = self._keep
        self._keep = True
        try:
            yield self
        finally:
            if not outer:
                self._keep = False
                if self._kept is not None:
                    self._kept.close()
                    self._kept = None

    def pin(self, root: x509.Certificate, *, now: datetime | None = None) -> None:
        """Pin ``root`` (verified by the caller, e.g. through the coordinator's quote).

        A connection kept open from before (``kept_open``) stays in use only when the
        certificate it was handshaken with is ``root`` itself and ``root`` is valid now:
        what a new connection pinned to ``root`` checks (its handshake proved the
        coordinator holds the key of the certificate it presented; TLS checks that
        signature whatever the verify mode)."""
        self.root = root
        kept = self._kept
        if kept is None:
            return
        presented = kept.sock.getpeercert(binary_form=True) if kept.sock else None
        now = now or datetime.now(UTC)
        if presented != root.public_bytes(Encoding.DER) or not (
            root.not_valid_before_utc <= now <= root.not_valid_after_utc
        ):
            self._kept = None
            kept.close()
            raise PKIError(
                f"coordinator {self.address} does not present the pinned root certificate"
            )

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # identity is the pinned root itself, checked below
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.root is None:
            ctx.verify_mode = ssl.CERT_NONE  # only to fetch a quote, which we verify
        else:
            ctx.load_verify_locations(cadata=cert_to_pem(self.root).decode())
        if self.identity is not None:
            try:
                ctx.load_cert_chain(self.identity.cert_path, self.identity.key_path)
            except (ssl.SSLError, OSError) as exc:
                raise PKIError(
                    f"client certificate {self.identity.cert_path} with key "
                    f"{self.identity.key_path} does not load: {_reason(exc)}"
                ) from None
        return ctx

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn, self._kept = self._kept, None
        where = f"coordinator {self.address}"
        reuse = False
        resp: http.client.HTTPResponse | None = None
        try:
            if conn is None:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._context()
                )
                conn.connect()
                presented = conn.sock.getpeercert(binary_form=True) if conn.sock else None
                if self.root is not None and presented != self.root.public_bytes(Encoding.DER):
                    raise PKIError(f"{where} does not present the pinned root certificate")
            payload = json.dumps(body).encode() if body is not None else None
            headers = dict(self.headers)
            if payload:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
            reuse = self._keep and not resp.will_close
        except ssl.SSLCertVerificationError as exc:
            raise PKIError(
                f"{where} presented a certificate that does not chain to the pinned root "
                f"({exc.verify_message}); if the cluster was re-created, verify it again "
                "with 'meshproxy manifest verify'"
            ) from None
        except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
            # TLS 1.3: the server checks a client certificate after the client's handshake
            # is done, so a refusal arrives as an alert or a closed connection.
            if self.identity is not None:
                raise PKIError(
                    f"{where} refused the client certificate {self.identity.cert_path} "
                    f"({_reason(exc)}): it is not the certificate of a user of the current "
                    "manifest, or it is not valid now"
                ) from None
            raise ConnectError(f"cannot reach {where}: {_reason(exc)}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectError(f"cannot reach {where}: {_reason(exc)}") from None
        finally:
            if reuse:
                self._kept = conn
            else:
                # A Connection: close answer owns the socket; a read cut short (the
                # coordinator died mid-answer) must not leave it to the garbage collector.
                if resp is not None:
                    resp.close()
                if conn is not None:
                    conn.close()
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConnectError(
                f"{where} answered HTTP {status} with a body that is not JSON"
            ) from None
        doc = wire.unwrap(doc, where)
        if doc["status"] != "success":
            raise CoordinatorError(
                f"{where} refused: {doc.get('message', 'no reason given')}", http_status=status
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
    accept_simulation: bool,
    platform_dir: Path | None,
    now: datetime,
    *,
    loaded: SimulationPlatform | None = None,
) -> list[TrustAnchor]:
    """Intel's root, and with ``accept_simulation`` the simulated platform's (``loaded``
    when it is that directory's, already loaded by the caller's quote provider)."""
    anchors = [intel_anchor()]
    if accept_simulation:
        directory = platform_dir or default_platform_dir()
        if loaded is not None and Path(loaded.directory) == Path(directory):
            anchors.append(simulation_anchor(loaded))
            return anchors
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
    collateral: Collateral | None = None,
) -> ClusterEvidence:
    """Verify the coordinator's quote over a fresh nonce; return the root it binds. With
    Intel ``collateral`` a hardware quote's TCB status is evaluated too."""
    return _evidence(
        Connection(address, None, timeout),
        accept_simulation=accept_simulation,
        platform_dir=platform_dir,
        now=now,
        collateral=collateral,
    )


def _evidence(
    conn: Connection,
    *,
    accept_simulation: bool,
    platform_dir: Path | None,
    now: datetime | None = None,
    collateral: Collateral | None = None,
    loaded: SimulationPlatform | None = None,
) -> ClusterEvidence:
    """``fetch_evidence`` over ``conn`` (unpinned; kept open by a caller that pins it)."""
    address = conn.address
    now = now or datetime.now(UTC)
    nonce = os.urandom(32)
    q = base64.urlsafe_b64encode(nonce).decode().rstrip("=")
    data = conn.request("GET", f"{wire.CLIENT_PATHS['quote']}?nonce={q}")
    try:
        certs = certs_from_pem(str(data["cert"]).encode(), "coordinator certificate chain")
        quote = wire.b64d(data["quote"], "quote")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConnectError(f"coordinator {address} sent a malformed quote answer: {exc}") from None
    if len(certs) != 2:
        raise PKIError(f"coordinator {address} sent {len(certs)} certificates, expected 2")
    intermediate, root = certs
    try:
        anchors = anchors_for(accept_simulation, platform_dir, now, loaded=loaded)
        verified = verify_quote(quote, anchors, now=now, collateral=collateral)
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
def _post_attested(
    conn: Connection,
    path: str,
    *,
    marble_type: str,
    instance: uuidlib.UUID,
    key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    provider: QuoteProvider,
) -> Any:
    """Get a nonce, attest, and POST to the mesh API's ``path`` (activate or renew):
    nonce and request share one TLS connection (one handshake)."""
    with conn.kept_open():
        body = _attested_body(
            conn,
            marble_type=marble_type,
            instance=instance,
            key=key,
            dns_names=dns_names,
            provider=provider,
        )
        return conn.request("POST", wire.MESH_PATHS[path], body)


def _attested_body(
    conn: Connection,
    *,
    marble_type: str,
    instance: uuidlib.UUID,
    key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    provider: QuoteProvider,
) -> dict[str, str]:
    """Nonce, then a quote binding our key and that nonce, then the CSR: what the mesh API
    needs to attest a marble (for activation and renewal alike)."""
    nonce = wire.b64d(conn.request("POST", wire.MESH_PATHS["nonce"], {})["nonce"], "nonce")
    quote = provider.get_quote(ratls_report_data(key.public_key(), nonce=nonce))
    csr = make_csr(key, marble_type, dns_names)
    return {
        "marbleType": marble_type,
        "uuid": str(instance),
        "csr": csr.public_bytes(Encoding.PEM).decode(),
        "quote": wire.b64e(quote),
        "nonce": wire.b64e(nonce),
    }


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
    policy: CoordinatorPolicy | None = None,
) -> Activation:
    """One activation attempt (ARCHITECTURE section 5). Blocking. Without a pinned
    ``root`` the coordinator's quote is verified, and its identity checked against
    ``policy`` (a ``PolicyError`` naming the field: not worth retrying)."""
    conn = Connection(address, root, timeout)
    with conn.kept_open():  # quote, nonce and activation: one TLS connection
        if root is None:
            evidence = _evidence(
                conn,
                accept_simulation=accept_simulation,
                platform_dir=platform_dir,
                loaded=provider.platform if isinstance(provider, SimulationProvider) else None,
            )
            if policy is not None:
                from meshproxy.attestation import check_coordinator

                try:
                    check_coordinator(evidence.verified, policy)
                except PolicyError as exc:
                    raise PolicyError(f"coordinator {address} refused by policy: {exc}") from None
            root = evidence.root
            conn.pin(root)
        data = _post_attested(
            conn,
            "activate",
            marble_type=marble_type,
            instance=instance,
            key=key,
            dns_names=dns_names,
            provider=provider,
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
            mesh=_mesh_policy(mesh),
            simulated=bool(data["simulation"]),
            sealing_key=(
                Secret(wire.b64d(data["sealingKey"], "sealingKey"))
                if data.get("sealingKey") is not None
                else None
            ),
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


@dataclass(frozen=True)
class Renewal:
    """A renewed leaf for a running marble, under the cluster's current intermediate."""

    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate
    mesh: MeshPolicy
    simulated: bool


def renew(
    address: str,
    *,
    marble_type: str,
    instance: uuidlib.UUID,
    key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    provider: QuoteProvider,
    root: x509.Certificate,
    timeout: float = 10.0,
) -> Renewal:
    """Attest again and get a new leaf for ``key`` (``POST /api/v2/marble/renew``). Blocking.

    ``root`` is the root the marble pinned at activation; the new leaf and intermediate
    are checked to chain to it. ``CoordinatorError`` (HTTP 403) with the coordinator's
    reason when the marble no longer satisfies the manifest (e.g. its SecurityVersion was
    raised by a package update); the caller should then stop serving on the old leaf.
    """
    data = _post_attested(
        Connection(address, root, timeout),
        "renew",
        marble_type=marble_type,
        instance=instance,
        key=key,
        dns_names=dns_names,
        provider=provider,
    )
    try:
        leaf = certs_from_pem(data["certificate"].encode())[0]
        intermediate = certs_from_pem(data["intermediate"].encode())[0]
        mesh = data["mesh"]
        renewal = Renewal(
            leaf=leaf,
            intermediate=intermediate,
            root=root,
            mesh=_mesh_policy(mesh),
            simulated=bool(data["simulation"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ConnectError(f"coordinator {address} sent a malformed renewal: {exc}") from None
    if leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != (
        public_der(key)
    ):
        raise PKIError("coordinator issued a certificate for another key")
    now = datetime.now(UTC)
    verify_issued_by(leaf, intermediate, now=now)
    verify_issued_by(intermediate, root, now=now)
    return renewal
