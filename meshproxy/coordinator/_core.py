"""The coordinator's logic, without I/O: every method takes ``now`` and returns values.

Theory of operation: the core owns ``PersistentState`` and a ``commit`` callback that seals
and stores it. Every mutating operation builds the new state, commits it, and only then
answers; if the commit fails, the operation fails and memory keeps the old state. Callers
run all methods on one worker thread, which serializes them (the core's mutex).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshproxy._redact import Secret
from meshproxy.attestation import (
    PackagePolicy,
    QuoteProvider,
    TrustAnchor,
    check_package,
    verify_quote,
)
from meshproxy.coordinator import _secrets
from meshproxy.coordinator._persist import PersistentState
from meshproxy.coordinator._state import MESSAGES, Event, State, advance, require
from meshproxy.errors import AttestationError, PKIError, PolicyError
from meshproxy.manifest import (
    Manifest,
    Package,
    RenderedParameters,
    SecretValue,
    TemplateData,
    parse_manifest,
    render_parameters,
)
from meshproxy.pki import (
    Authority,
    create_intermediate,
    create_root,
    csr_dns_names,
    generate_key,
    issue_leaf,
    load_csr,
    public_der,
)

log = logging.getLogger("meshproxy.coordinator")
NONCE_TTL = timedelta(seconds=60)
MAX_PENDING_NONCES = 10_000


@dataclass(frozen=True)
class ActivationRequest:
    marble_type: str
    uuid: str
    csr_pem: bytes
    quote: bytes
    nonce: bytes


@dataclass(frozen=True)
class ActivationResult:
    leaf_pem: bytes
    parameters: RenderedParameters
    simulated: bool


def report_data_for(public_key_der: bytes, nonce: bytes) -> bytes:
    """What a quote's report data must hold: it binds a key to a coordinator nonce."""
    return hashlib.sha256(public_key_der + nonce).digest()


def coordinator_report_data(root_der: bytes, nonce: bytes) -> bytes:
    return hashlib.sha256(root_der + nonce).digest()


class CoordinatorCore:
    def __init__(
        self,
        persistent: PersistentState,
        *,
        commit: Callable[[PersistentState], None],
        provider: QuoteProvider,
        anchors: Sequence[TrustAnchor],
        simulation: bool,
    ) -> None:
        self._s = persistent
        self._commit = commit
        self._provider = provider
        self._anchors = tuple(anchors)
        self.simulation = simulation
        self._nonces: dict[bytes, datetime] = {}
        self.activated: dict[str, int] = {}  # since this process started, for status/metrics
        self._manifest = (
            parse_manifest(persistent.manifest_raw) if persistent.manifest_raw else None
        )

    # -- construction --------------------------------------------------------------------
    @staticmethod
    def fresh_state(
        *, now: datetime, dns_names: Sequence[str], simulation: bool
    ) -> PersistentState:
        root = create_root(now=now, dns_names=dns_names, simulated=simulation, key=generate_key())
        inter = create_intermediate(root, now=now, simulated=simulation, key=generate_key())
        return PersistentState(
            state=advance(State.UNINITIALIZED, Event.CREATED),
            root=root,
            intermediate=inter,
            root_secret=Secret(os.urandom(32)),
        )

    # -- read side -----------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._s.state

    @property
    def root(self) -> Authority:
        return self._s.root

    @property
    def intermediate(self) -> Authority:
        return self._s.intermediate

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    def status(self) -> tuple[int, str]:
        message = MESSAGES[self._s.state]
        if self.simulation:
            message += " SIMULATION MODE: no hardware isolation; quotes are simulated."
        return int(self._s.state), message

    def quote(self, nonce: bytes) -> bytes:
        """The coordinator's quote binding its root certificate (and the client's nonce)."""
        require(self._s.state, "quote")
        if len(nonce) > 64:
            raise PolicyError("nonce must be at most 64 bytes")
        root_der = self._s.root.cert.public_bytes(Encoding.DER)
        return self._provider.get_quote(coordinator_report_data(root_der, nonce))

    def get_manifest(self) -> tuple[bytes, str, bytes]:
        """Raw manifest, its fingerprint, and the root key's signature over SHA-256(raw)."""
        require(self._s.state, "get_manifest")
        assert self._manifest is not None
        raw = self._manifest.raw
        sig = self._s.root.key.sign(raw, ec.ECDSA(hashes.SHA256()))
        return raw, self._manifest.fingerprint, sig

    # -- write side ----------------------------------------------------------------------
    def set_manifest(self, raw: bytes, *, now: datetime) -> Manifest:
        require(self._s.state, "set_manifest")
        manifest = parse_manifest(raw, "manifest")
        inter = create_intermediate(
            self._s.root, now=now, simulated=self.simulation, key=generate_key()
        )
        shared = _secrets.generate_shared(manifest, inter, now)
        new = replace(
            self._s,
            state=advance(self._s.state, Event.MANIFEST_SET),
            intermediate=inter,
            manifest_raw=raw,
            shared_secrets=shared,
            activations={},
        )
        self._commit(new)
        self._s, self._manifest = new, manifest
        log.info(
            "manifest set",
            extra={"fingerprint": manifest.fingerprint, "marbles": sorted(manifest.marbles)},
        )
        return manifest

    def new_nonce(self, *, now: datetime) -> bytes:
        require(self._s.state, "activate")
        self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        if len(self._nonces) >= MAX_PENDING_NONCES:
            raise PolicyError("too many pending activations; retry shortly")
        nonce = os.urandom(32)
        self._nonces[nonce] = now + NONCE_TTL
        return nonce

    def activate(self, req: ActivationRequest, *, now: datetime) -> ActivationResult:
        """Attest a marble and issue what it gets; every refusal says why."""
        require(self._s.state, "activate")
        manifest = self._manifest
        assert manifest is not None
        expiry = self._nonces.pop(req.nonce, None)
        if expiry is None or expiry <= now:
            raise PolicyError("activation nonce is unknown, used or expired; request a new one")
        marble = manifest.marbles.get(req.marble_type)
        if marble is None:
            raise PolicyError(f"unknown marble type {req.marble_type!r}: not in the manifest")
        try:
            instance = uuidlib.UUID(req.uuid)
        except ValueError:
            raise PolicyError(f"marble UUID {req.uuid!r} is not a UUID") from None
        try:
            csr = load_csr(req.csr_pem)
        except PKIError as exc:
            raise PolicyError(f"bad CSR: {exc}") from None
        try:
            verified = verify_quote(req.quote, self._anchors, now=now)
        except AttestationError as exc:
            raise PolicyError(f"quote verification failed ({exc.check}): {exc}") from None
        expected = report_data_for(public_der(_ec_public(csr.public_key())), req.nonce)
        if verified.report_data[:32] != expected:
            raise PolicyError(
                "quote does not bind this CSR's key and the coordinator's nonce (report data "
                "mismatch): the quote was made for another key or activation"
            )
        package = manifest.packages[marble.package]
        try:
            check_package(verified, _policy(package), allow_simulation=self.simulation)
        except PolicyError as exc:
            raise PolicyError(f"marble does not satisfy package {package.name!r}: {exc}") from None
        count = self._s.activations.get(req.marble_type, 0)
        if marble.max_activations and count >= marble.max_activations:
            raise PolicyError(
                f"marble type {req.marble_type!r} reached MaxActivations ({marble.max_activations})"
            )
        lifetime = timedelta(seconds=manifest.mesh.certificate_lifetime)
        leaf = issue_leaf(
            self._s.intermediate,
            csr,
            trust_domain=manifest.mesh.trust_domain,
            marble_type=req.marble_type,
            instance=instance,
            dns_names=csr_dns_names(csr),
            lifetime=lifetime,
            now=now,
            simulated=self.simulation,
        )
        secrets = _secrets.for_marble(
            manifest,
            self._s.shared_secrets,
            self._s.intermediate,
            self._s.root_secret,
            marble_type=req.marble_type,
            instance=str(instance),
            now=now,
        )
        data = TemplateData(
            secrets=secrets,
            previous_secrets=secrets,
            marblerun={
                "RootCA": _cert_value(self._s.intermediate),
                "CoordinatorRoot": _cert_value(self._s.root),
                "CoordinatorIntermediate": _cert_value(self._s.intermediate),
                # The marble's private key never leaves the marble; templates get the cert.
                "MarbleCert": SecretValue(
                    type="cert",
                    cert=leaf,
                    public=public_der(_ec_public(csr.public_key())),
                    private=None,
                ),
            },
        )
        params = render_parameters(marble, data)
        if marble.max_activations:
            # Counted activations are committed before the marble gets anything, so a crash
            # can lose an activation's answer but never let one exceed MaxActivations.
            new = replace(self._s, activations={**self._s.activations, req.marble_type: count + 1})
            self._commit(new)
            self._s = new
        self.activated[req.marble_type] = self.activated.get(req.marble_type, 0) + 1
        return ActivationResult(
            leaf_pem=leaf.public_bytes(Encoding.PEM),
            parameters=params,
            simulated=verified.simulated,
        )


def _policy(p: Package) -> PackagePolicy:
    return PackagePolicy(
        unique_id=p.unique_id,
        signer_id=p.signer_id,
        product_id=p.product_id,
        security_version=p.security_version,
        debug=p.debug,
        accepted_tcb_statuses=p.accepted_tcb_statuses,
    )


def _cert_value(a: Authority) -> SecretValue:
    return SecretValue(type="cert", cert=a.cert, public=public_der(a.key), private=None)


def _ec_public(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PolicyError("CSR key must be an ECDSA key")
    return key
