"""The coordinator's logic, without I/O: every method takes ``now`` and returns values.

Theory of operation: the core owns ``PersistentState`` and a ``commit`` callback that seals
and stores it. Every mutating operation is a pure function from the current state to the
next one (``_transact``): it is committed, and only then does the core answer and adopt
it; if the commit fails the operation fails and memory keeps the old state. When replicas
share the store, ``refresh`` returns the state another replica committed (checked before
every operation), and a commit that lost a compare-and-swap (``StoreConflict``) is computed
again on the fresh state; that is how MaxActivations holds across replicas. Callers run all
methods on one worker thread, which serializes them (the core's mutex).

The client-API operations on users, secrets, updates and recovery are in ``_admin``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshproxy._redact import Secret
from meshproxy.attestation import (
    EvidenceCache,
    PackagePolicy,
    QuoteProvider,
    TrustAnchor,
    VerifiedQuote,
    check_package,
    ratls_claims_for_spki,
    ratls_extension,
    verify_quote,
)
from meshproxy.coordinator import _recovery, _secrets
from meshproxy.coordinator._auth import Owner, Unauthenticated
from meshproxy.coordinator._nonce import LocalUsedNonces, NonceBook, UsedNonces, nonce_id
from meshproxy.coordinator._persist import PersistentState
from meshproxy.coordinator._recovery import Recoverer, RecoveryInfo
from meshproxy.coordinator._sealkey import marble_sealing_key
from meshproxy.coordinator._state import MESSAGES, Event, State, advance, require
from meshproxy.coordinator._store import StoreConflict
from meshproxy.coordinator._updates import effective, log_line
from meshproxy.errors import AttestationError, MeshError, PKIError, PolicyError, StoreError
from meshproxy.manifest import (
    Manifest,
    Marble,
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
    load_csr_key,
    public_der,
)

log = logging.getLogger("meshproxy.coordinator")
_CAS_ATTEMPTS = 50


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
    sealing_key: Secret  # the marble's virtual sealing key (``_sealkey``)


@dataclass(frozen=True)
class _Attested:
    """A request that passed attestation: what activation and renewal build on."""

    instance: uuidlib.UUID
    csr: x509.CertificateSigningRequest
    verified: VerifiedQuote
    evidence: x509.ExtensionType  # the leaf's RA-TLS extension
    expires: datetime  # of its nonce
    spki: bytes  # the CSR's public key, DER
    key: ec.EllipticCurvePublicKey  # the CSR's public key, decoded once


@dataclass(frozen=True)
class RenewalResult:
    leaf_pem: bytes
    simulated: bool


@dataclass(frozen=True)
class ManifestResult:
    manifest: Manifest
    # key name -> RSA-OAEP ciphertext of its share
    recovery_secrets: dict[str, bytes] = field(repr=False)


class LockedState(Protocol):
    """Sealed state this coordinator cannot open (recovery mode); the vault provides it."""

    def locked_recovery(self) -> RecoveryInfo | None: ...
    def open_with_data_key(self, dek: Secret) -> PersistentState: ...


def report_data_for(public_key_der: bytes, nonce: bytes) -> bytes:
    """What a marble quote's report data must start with: SHA-256 of the RA-TLS claims
    {"pubkey-hash": [1, SHA-256(SPKI)], "nonce": nonce}. It binds the key and the
    coordinator's nonce, and is what an RA-TLS verifier checks in the leaf's evidence."""
    return hashlib.sha256(ratls_claims_for_spki(public_key_der, nonce=nonce)).digest()


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
        refresh: Callable[[], PersistentState | None] | None = None,
        locked: LockedState | None = None,
        owner: Owner | None = None,
        used_nonces: UsedNonces | None = None,
    ) -> None:
        self._s = persistent
        self._commit = commit
        self._refresh = refresh
        self._locked = locked
        self._provider = provider
        self._anchors = tuple(anchors)
        self._evidence = EvidenceCache()  # PCK chains and QE reports checked before
        self.simulation = simulation
        self.owner = owner
        # Replicas (a shared store) recognize each other's nonces; ``_nonce``.
        self._nonce_book = NonceBook(shared=refresh is not None)
        self._used_nonces = used_nonces or LocalUsedNonces()
        self._recoverer: Recoverer | None = None
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

    # -- shared state ----------------------------------------------------------------------
    def sync(self) -> None:
        """Adopt what another replica committed (a no-op with a store of our own)."""
        if self._refresh is None or self._s.state is State.RECOVERY:
            return
        fresh = self._refresh()
        if fresh is not None:
            self._adopt(fresh)

    def unlock(self, persistent: PersistentState) -> None:
        """Leave recovery mode with state opened by other means (a peer replica's key)."""
        if self._s.state is not State.RECOVERY:
            return
        self._locked, self._recoverer = None, None
        self._adopt(persistent)
        log.info("state unlocked", extra={"state": persistent.state.name})

    def _adopt(self, new: PersistentState) -> None:
        if new.manifest_raw != self._s.manifest_raw or self._manifest is None:
            self._manifest = parse_manifest(new.manifest_raw) if new.manifest_raw else None
        self._s = new

    def transact(self, change: Callable[[PersistentState], PersistentState]) -> PersistentState:
        """Commit ``change(current)``; on a lost compare-and-swap, recompute on fresh state."""
        for _ in range(_CAS_ATTEMPTS):
            new = change(self._s)
            if new is self._s:  # nothing changed (a batch of refusals): nothing to write
                return new
            try:
                self._commit(new)
            except StoreConflict:
                self.sync()
                continue
            self._adopt(new)
            return new
        raise StoreError("the shared state kept changing under this replica; retry")

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

    @property
    def persistent(self) -> PersistentState:
        return self._s

    @property
    def shares_store(self) -> bool:
        """Other replicas write the same state (``sync`` before reading it)."""
        return self._refresh is not None

    def status(self) -> tuple[int, str]:
        message = MESSAGES[self._s.state]
        if self.simulation:
            message += " SIMULATION MODE: no hardware isolation; quotes are simulated."
        return int(self._s.state), message

    def activation_counts(self) -> dict[str, int]:
        """Counted activations per marble type, as committed (shared by all replicas)."""
        return dict(self._s.activations)

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

    def current_manifest(self) -> Manifest:
        """The manifest in force; only called where the state guarantees one."""
        assert self._manifest is not None
        return self._manifest

    # -- the first manifest ------------------------------------------------------------------
    def set_manifest(self, raw: bytes, *, now: datetime) -> Manifest:
        return self.initialize(raw, now=now, owner_ok=True).manifest

    def initialize(
        self,
        raw: bytes,
        *,
        now: datetime,
        owner_ok: bool = False,
        cert_der: bytes | None = None,
        token: str | None = None,
    ) -> ManifestResult:
        """Set the first manifest (or a new one in recovery mode, discarding the old state).

        With an owner configured, the caller must present its certificate or token
        (``owner_ok`` is for callers that checked that themselves).
        """
        self.sync()
        require(self._s.state, "set_manifest")
        if self.owner is not None and not owner_ok and not self.owner.admits(cert_der, token):
            raise Unauthenticated(
                "this coordinator only accepts its first manifest from its owner: present the "
                "owner's client certificate (--cert/--key) or token (--owner-token)"
            )
        manifest = parse_manifest(raw, "manifest")
        keys = manifest.recovery_keys
        dek, info, secrets = _recovery.generate(keys, manifest.config.recovery_threshold)
        discarded = self._s.state is State.RECOVERY

        def change(s: PersistentState) -> PersistentState:
            require(s.state, "set_manifest")
            inter = create_intermediate(
                s.root, now=now, simulated=self.simulation, key=generate_key()
            )
            line = log_line(
                now,
                "Initial manifest set",
                manifestFingerprint=manifest.fingerprint,
                **({"discardedSealedState": True} if discarded else {}),
            )
            return replace(
                s,
                state=advance(s.state, Event.MANIFEST_SET),
                intermediate=inter,
                manifest_raw=raw,
                shared_secrets=_secrets.generate_shared(manifest, inter, now),
                activations={},
                instances={},
                update_log=[line],
                dek=dek,
                recovery=info,
            )

        self.transact(change)
        self._locked, self._recoverer = None, None
        log.info(
            "manifest set",
            extra={"fingerprint": manifest.fingerprint, "marbles": sorted(manifest.marbles),
                   "recovery_keys": len(keys)},
        )  # fmt: skip
        return ManifestResult(manifest, secrets)

    # -- recovery ---------------------------------------------------------------------------
    def recovery_info(self) -> RecoveryInfo | None:
        return self._locked.locked_recovery() if self._locked is not None else None

    def recover(self, share: bytes, signature: bytes, *, now: datetime) -> tuple[int, str]:
        """Take one recovery secret; with the last one, open and restore the sealed state."""
        require(self._s.state, "recover")
        info = self.recovery_info()
        if self._locked is None or info is None:
            raise PolicyError("there is no sealed state to recover; set a manifest instead")
        if self._recoverer is None or self._recoverer.info != info:
            self._recoverer = Recoverer(info)
        name, remaining = self._recoverer.add(share, signature)
        log.info("recovery secret accepted", extra={"recovery_key": name, "remaining": remaining})
        if remaining:
            return remaining, f"Recovery secret of {name!r} accepted; {remaining} more needed."
        dek = self._recoverer.key()
        signers = self._recoverer.signers
        assert dek is not None
        try:
            restored = self._locked.open_with_data_key(dek)
        except StoreError:
            self._recoverer = None
            raise PolicyError(
                "the recovery secrets do not open the sealed state; upload them again"
            ) from None
        manifest = (
            parse_manifest(restored.manifest_raw, "sealed manifest")
            if (restored.manifest_raw)
            else None
        )
        if manifest is None or not restored.recovery.same_keys(
            manifest.recovery_keys, manifest.config.recovery_threshold
        ):
            self._recoverer = None
            raise PolicyError("the sealed state's recovery keys do not match its manifest")
        line = log_line(now, "Coordinator recovered", recoveryKeys=list(signers))
        state = advance(State.RECOVERY, Event.RECOVERED)
        self.transact(
            lambda _: replace(restored, state=state, update_log=[*restored.update_log, line])
        )
        self._locked, self._recoverer = None, None
        log.info("coordinator recovered", extra={"recovery_keys": list(signers)})
        return 0, "Recovery successful."

    # -- activation ---------------------------------------------------------------------------
    def new_nonce(self, *, now: datetime) -> bytes:
        """A nonce for one activation or renewal: an HMAC, no state (``_nonce``)."""
        require(self._s.state, "activate")
        return self._nonce_book.issue(self._s.root_secret, now)

    def _attest(
        self, req: ActivationRequest, now: datetime, operation: str, *, claim: bool = True
    ) -> _Attested:
        """Everything both activation and renewal check before the manifest's rules; also
        the leaf's RA-TLS evidence extension (the quote and the claims it binds). With
        ``claim`` the nonce is claimed here; else the caller claims it."""
        require(self._s.state, operation)
        expires = self._nonce_book.check(self._s.root_secret, req.nonce, now)
        try:
            instance = uuidlib.UUID(req.uuid)
        except ValueError:
            raise PolicyError(f"marble UUID {req.uuid!r} is not a UUID") from None
        try:
            csr, key = load_csr_key(req.csr_pem)
        except PKIError as exc:
            raise PolicyError(f"bad CSR: {exc}") from None
        try:
            verified = verify_quote(req.quote, self._anchors, now=now, cache=self._evidence)
        except AttestationError as exc:
            raise PolicyError(f"quote verification failed ({exc.check}): {exc}") from None
        spki = public_der(key)
        claims = ratls_claims_for_spki(spki, nonce=req.nonce)
        if verified.report_data[:32] != hashlib.sha256(claims).digest():
            raise PolicyError(
                "quote does not bind this CSR's key and the coordinator's nonce (report data "
                "mismatch): the quote was made for another key or activation"
            )
        # Single use, across replicas: claimed only once the request is known to be good.
        if claim and not self._used_nonces.claim([nonce_id(req.nonce)], expires, now):
            raise PolicyError("activation nonce is unknown, used or expired; request a new one")
        evidence = ratls_extension(req.quote, claims)
        return _Attested(instance, csr, verified, evidence, expires, spki, key)

    def _check_marble(
        self, s: PersistentState, manifest: Manifest, marble_type: str, verified: VerifiedQuote
    ) -> Marble:
        marble = manifest.marbles.get(marble_type)
        if marble is None:
            raise PolicyError(f"unknown marble type {marble_type!r}: not in the manifest")
        package = effective(manifest.packages[marble.package], s.package_svn)
        try:
            check_package(verified, _policy(package), allow_simulation=self.simulation)
        except PolicyError as exc:
            raise PolicyError(f"marble does not satisfy package {package.name!r}: {exc}") from None
        return marble

    def _leaf(
        self,
        s: PersistentState,
        manifest: Manifest,
        csr: x509.CertificateSigningRequest,
        marble_type: str,
        instance: uuidlib.UUID,
        now: datetime,
        evidence: x509.ExtensionType,
        key: ec.EllipticCurvePublicKey,
    ) -> x509.Certificate:
        return issue_leaf(
            s.intermediate,
            csr,
            trust_domain=manifest.mesh.trust_domain,
            marble_type=marble_type,
            instance=instance,
            dns_names=csr_dns_names(csr),
            lifetime=timedelta(seconds=manifest.mesh.certificate_lifetime),
            now=now,
            simulated=self.simulation,
            evidence=evidence,
            public_key=key,
        )

    def activate(self, req: ActivationRequest, *, now: datetime) -> ActivationResult:
        """Attest a marble and issue what it gets; every refusal says why."""
        result = self.activate_many([(req, now)])[0]
        if isinstance(result, MeshError):
            raise result
        return result

    def activate_many(
        self, batch: Sequence[tuple[ActivationRequest, datetime]]
    ) -> list[ActivationResult | MeshError]:
        """Activations that arrived together: one result (or refusal) each, one commit.

        Each request is attested on its own; the nonces of those that check out are
        claimed together (one etcd transaction for replicas). Then one change computes
        every activation in turn on the state its predecessors left, so MaxActivations
        holds inside the batch, and the state with all counted activations is committed
        once (group commit); on a lost compare-and-swap the whole change is recomputed on
        the fresh state. No counted activation is answered before that commit; if it
        fails, every counted one of the batch fails with it and memory keeps the state
        of before.
        """
        self.sync()
        results: list[ActivationResult | MeshError | None] = [None] * len(batch)
        attested: dict[int, _Attested] = {}
        for i, (req, now) in enumerate(batch):
            try:
                attested[i] = self._attest(req, now, "activate", claim=False)
            except MeshError as exc:
                results[i] = exc
        if attested:
            ids = {nonce_id(batch[i][0].nonce): i for i in attested}
            expires = max(a.expires for a in attested.values())
            claimed = self._used_nonces.claim(ids, expires, min(now for _, now in batch))
            for nonce, i in ids.items():
                if nonce not in claimed:
                    del attested[i]
                    results[i] = PolicyError(
                        "activation nonce is unknown, used or expired; request a new one"
                    )

        def change(s: PersistentState) -> PersistentState:
            # Recomputed from scratch if another replica committed meanwhile.
            for i, a in attested.items():
                req, now = batch[i]
                try:
                    s, results[i] = self._activation(s, req, a, now)
                except MeshError as exc:  # refused (or unanswerable): this one alone
                    results[i] = exc
            return s

        counted = [i for i in attested if self._needs_commit(batch[i][0].marble_type)]
        if counted:
            try:
                self.transact(change)
            except MeshError as exc:  # memory keeps the state of before the batch
                for i in counted:
                    if not isinstance(results[i], MeshError):
                        results[i] = exc
        else:
            change(self._s)
        out: list[ActivationResult | MeshError] = []
        for (req, _), result in zip(batch, results, strict=True):
            assert result is not None
            if not isinstance(result, MeshError):
                self.activated[req.marble_type] = self.activated.get(req.marble_type, 0) + 1
            out.append(result)
        return out

    def _activation(
        self, s: PersistentState, req: ActivationRequest, a: _Attested, now: datetime
    ) -> tuple[PersistentState, ActivationResult]:
        """One activation on state ``s``: the next state and what the marble gets."""
        manifest = self.current_manifest()
        marble = self._check_marble(s, manifest, req.marble_type, a.verified)
        count = s.activations.get(req.marble_type, 0)
        if marble.max_activations and count >= marble.max_activations:
            raise PolicyError(
                f"marble type {req.marble_type!r} reached MaxActivations ({marble.max_activations})"
            )
        leaf = self._leaf(s, manifest, a.csr, req.marble_type, a.instance, now, a.evidence, a.key)
        params = self._parameters(s, manifest, marble, str(a.instance), leaf, a.spki, now)
        sealing_key = marble_sealing_key(s.root_secret, req.marble_type, a.instance)
        result = ActivationResult(
            leaf.public_bytes(Encoding.PEM), params, a.verified.simulated, sealing_key
        )
        if not marble.max_activations:
            return s, result
        # Counted activations are committed before the marble gets anything, so a crash
        # can lose an activation's answer but never let one exceed MaxActivations.
        uuids = s.instances.get(req.marble_type, [])
        instance = str(a.instance)
        return replace(
            s,
            activations={**s.activations, req.marble_type: count + 1},
            instances={
                **s.instances,
                req.marble_type: uuids if instance in uuids else [*uuids, instance],
            },
        ), result

    def _needs_commit(self, marble_type: str) -> bool:
        marble = self.current_manifest().marbles.get(marble_type)
        return marble is not None and marble.max_activations > 0

    def renew(self, req: ActivationRequest, *, now: datetime) -> RenewalResult:
        """A new leaf under the current intermediate for a marble that attests again.

        Not counted against MaxActivations; for a counted marble type the UUID must be one
        this cluster activated. Refused when the marble no longer satisfies the manifest.
        """
        self.sync()
        a = self._attest(req, now, "renew")
        instance, csr, verified, evidence = a.instance, a.csr, a.verified, a.evidence
        s, manifest = self._s, self.current_manifest()
        marble = self._check_marble(s, manifest, req.marble_type, verified)
        if marble.max_activations and str(instance) not in s.instances.get(req.marble_type, []):
            raise PolicyError(
                f"marble {instance} of type {req.marble_type!r} was never activated by this "
                "cluster: activate it (renewal is only for running marbles)"
            )
        leaf = self._leaf(s, manifest, csr, req.marble_type, instance, now, evidence, a.key)
        return RenewalResult(leaf.public_bytes(Encoding.PEM), verified.simulated)

    def _parameters(
        self,
        s: PersistentState,
        manifest: Manifest,
        marble: Marble,
        instance: str,
        leaf: x509.Certificate,
        spki: bytes,
        now: datetime,
    ) -> RenderedParameters:
        used = _used_secrets(manifest, marble)
        unset = [
            name
            for name, spec in manifest.secrets.items()
            if spec.user_defined and name not in s.user_secrets and name in used
        ]
        if unset:
            raise PolicyError(
                f"marble type {marble.name!r} uses user-defined secret(s) "
                f"{', '.join(repr(n) for n in unset)} that no user has set yet "
                "(meshproxy secret set)"
            )
        known = {**s.shared_secrets, **s.user_secrets}
        secrets = _secrets.for_marble(
            manifest,
            known,
            s.intermediate,
            s.root_secret,
            marble_type=marble.name,
            instance=instance,
            now=now,
            only=used,
        )
        previous = _secrets.previous_for_marble(
            manifest,
            secrets,
            s.previous_shared,
            s.previous_root_secret,
            marble_type=marble.name,
            instance=instance,
            only=used,
        )
        data = TemplateData(
            secrets=secrets,
            previous_secrets=previous,
            marblerun={
                "RootCA": _cert_value(s.intermediate),
                "CoordinatorRoot": _cert_value(s.root),
                "CoordinatorIntermediate": _cert_value(s.intermediate),
                # The marble's private key never leaves the marble; templates get the cert.
                "MarbleCert": SecretValue(
                    type="cert",
                    cert=leaf,
                    public=spki,
                    private=None,
                ),
            },
        )
        return render_parameters(marble, data)


_USED: dict[tuple[str, str], frozenset[str]] = {}


def _used_secrets(manifest: Manifest, marble: Marble) -> frozenset[str]:
    """The secrets a marble's templates name: the only ones made for its activation."""
    key = (manifest.fingerprint, marble.name)
    used = _USED.get(key)
    if used is None:
        if len(_USED) > 1024:
            _USED.clear()
        used = _USED[key] = frozenset(n for n in manifest.secrets if _uses(marble, n))
    return used


def _uses(marble: Marble, secret: str) -> bool:
    pattern = re.compile(rb"\.Secrets\." + re.escape(secret.encode()) + rb"(?![\w])")
    values = [*marble.parameters.files.values(), *marble.parameters.env.values()]
    return any(not v.no_templates and pattern.search(v.data) for v in values)


def _policy(p: Package) -> PackagePolicy:
    return PackagePolicy(
        unique_id=p.unique_id,
        signer_id=p.signer_id,
        product_id=p.product_id,
        security_version=p.security_version,
        debug=p.debug,
        accepted_tcb_statuses=p.accepted_tcb_statuses,
    )


_CERT_VALUES: dict[x509.Certificate, SecretValue] = {}


def _cert_value(a: Authority) -> SecretValue:
    """The template value of a CA certificate, made once per certificate (its public key
    is the certificate's, so the certificate alone identifies it)."""
    value = _CERT_VALUES.get(a.cert)
    if value is None:
        if len(_CERT_VALUES) >= 16:
            _CERT_VALUES.clear()
        value = _CERT_VALUES[a.cert] = SecretValue(
            type="cert", cert=a.cert, public=public_der(a.key), private=None
        )
    return value
