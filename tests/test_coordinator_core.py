"""The coordinator core without a network: manifest, activation, every refusal, quotes.

A real simulated platform signs real-layout quotes; the core verifies them with the same
code as hardware quotes. Time is passed in.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshproxy.attestation import (
    EnclaveIdentity,
    SimulationPlatform,
    SimulationProvider,
    intel_anchor,
    simulation_anchor,
    verify_quote,
)
from meshproxy.coordinator import ActivationRequest, CoordinatorCore, State
from meshproxy.coordinator._core import coordinator_report_data, report_data_for
from meshproxy.coordinator._persist import PersistentState, dump, load
from meshproxy.errors import ManifestError, PolicyError, StateError, StoreError
from meshproxy.pki import check_peer, generate_key, make_csr, public_der

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


MANIFEST: dict[str, Any] = {
    "Packages": {"app": {"SignerID": SIGNER.hex(), "ProductID": 1, "SecurityVersion": 2}},
    "Marbles": {
        "backend": {
            "Package": "app",
            "MaxActivations": 1,
            "Parameters": {
                "Files": {"/key.hex": "{{ hex .Secrets.own }}"},
                "Env": {
                    "SHARED": "{{ base64 .Secrets.shared }}",
                    "CERT": "{{ pem .MarbleRun.MarbleCert.Cert }}",
                },
                "Argv": ["app", "--serve"],
            },
        },
        "frontend": {"Package": "app"},
    },
    "Secrets": {
        "own": {"Type": "symmetric-key", "Size": 128},
        "shared": {"Type": "symmetric-key", "Size": 256, "Shared": True},
        "tlscert": {"Type": "cert-ecdsa", "Size": 256, "Shared": True},
    },
    "Mesh": {"TrustDomain": "core.test", "Allow": {"backend": ["frontend"]}},
}


class Env:
    def __init__(self, tmp: Path) -> None:
        self.platform = SimulationPlatform.load_or_create(tmp / "platform", now=NOW)
        self.commits: list[bytes] = []
        self.fail_commit = False
        persistent = CoordinatorCore.fresh_state(now=NOW, dns_names=["c.test"], simulation=True)
        self.core = CoordinatorCore(
            persistent,
            commit=self.commit,
            provider=SimulationProvider(self.platform, identity()),
            anchors=[intel_anchor(), simulation_anchor(self.platform)],
            simulation=True,
        )

    def commit(self, s: PersistentState) -> None:
        if self.fail_commit:
            raise StoreError("disk full")
        self.commits.append(dump(s))

    def request(
        self,
        marble_type: str,
        ident: EnclaveIdentity | None = None,
        instance: str | None = None,
        **over: Any,
    ) -> ActivationRequest:
        key = generate_key()
        nonce = self.core.new_nonce(now=NOW)
        quote = SimulationProvider(self.platform, ident or identity()).get_quote(
            report_data_for(public_der(key), over.pop("bind_nonce", nonce))
        )
        csr = make_csr(key, marble_type, ["svc.test"]).public_bytes(Encoding.PEM)
        fields = {
            "marble_type": marble_type,
            "uuid": instance or str(uuid.uuid4()),
            "csr_pem": csr,
            "quote": quote,
            "nonce": nonce,
        }
        fields.update(over)
        return ActivationRequest(**fields)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    e.core.set_manifest(json.dumps(MANIFEST).encode(), now=NOW)
    return e


def test_fresh_coordinator_waits_for_a_manifest(tmp_path: Path) -> None:
    e = Env(tmp_path)
    assert e.core.state is State.ACCEPTING_MANIFEST
    code, message = e.core.status()
    assert code == 2
    assert "SIMULATION" in message
    with pytest.raises(StateError, match="no manifest"):
        e.core.new_nonce(now=NOW)


def test_quote_binds_root_and_nonce(env: Env) -> None:
    quote = env.core.quote(b"n" * 32)
    verified = verify_quote(quote, [simulation_anchor(env.platform)], now=NOW)
    root_der = env.core.root.cert.public_bytes(Encoding.DER)
    assert verified.report_data[:32] == coordinator_report_data(root_der, b"n" * 32)
    assert verified.simulated


def test_activation_issues_a_leaf_and_renders_parameters(env: Env) -> None:
    req = env.request("backend")
    result = env.core.activate(req, now=NOW)
    leaf = x509.load_pem_x509_certificate(result.leaf_pem)
    ident = check_peer(leaf, trust_domain="core.test", allowed_types=["backend"])
    assert ident.uuid == req.uuid
    assert ident.simulated
    assert leaf.not_valid_after_utc - NOW <= timedelta(hours=24)
    leaf.verify_directly_issued_by(env.core.intermediate.cert)
    p = result.parameters
    assert p.argv == ("app", "--serve")
    assert len(bytes.fromhex(p.files["/key.hex"].decode())) == 16
    assert p.env["CERT"] == result.leaf_pem
    assert "PRIVATE" not in p.env["CERT"].decode()


def test_derived_key_is_stable_per_uuid_and_shared_key_is_common(env: Env) -> None:
    instance = str(uuid.uuid4())
    first = env.core.activate(env.request("backend", instance=instance), now=NOW)
    # A second core on the same state (a restart) derives the same key for the same UUID.
    restarted = CoordinatorCore(
        load(env.commits[-1]),
        commit=env.commit,
        provider=SimulationProvider(env.platform, identity()),
        anchors=[simulation_anchor(env.platform)],
        simulation=True,
    )
    restarted._s.activations.clear()  # allow a second activation of the MaxActivations-1 type
    env.core = restarted
    second = restarted.activate(env.request("backend", instance=instance), now=NOW)
    other = restarted.activate(env.request("frontend"), now=NOW)
    assert first.parameters.files["/key.hex"] == second.parameters.files["/key.hex"]
    assert first.parameters.env["SHARED"] == second.parameters.env["SHARED"]
    assert other.parameters.env == {}


@pytest.mark.parametrize(
    ("marble", "ident", "over", "reason"),
    [
        ("ghost", None, {}, "unknown marble type 'ghost'"),
        ("backend", identity(svn=1), {}, "SecurityVersion 1 is below"),
        ("backend", identity(debug=True), {}, "debug"),
        ("backend", identity(product_id=9), {}, "ProductID"),
        ("backend", None, {"bind_nonce": b"x" * 32}, "does not bind"),
        ("backend", None, {"uuid": "not-a-uuid"}, "is not a UUID"),
        ("backend", None, {"quote": b"\x03\x00" + b"\x00" * 100}, "quote verification failed"),
        ("backend", None, {"csr_pem": b"garbage"}, "bad CSR"),
    ],
)
def test_activation_refusals_say_why(
    env: Env, marble: str, ident: EnclaveIdentity | None, over: dict[str, Any], reason: str
) -> None:
    req = env.request(marble, ident, **over)
    with pytest.raises(PolicyError, match=reason):
        env.core.activate(req, now=NOW)


def test_nonce_is_single_use_and_expires(env: Env) -> None:
    req = env.request("frontend")
    env.core.activate(req, now=NOW)
    with pytest.raises(PolicyError, match="nonce"):
        env.core.activate(req, now=NOW)
    late = env.request("frontend")
    with pytest.raises(PolicyError, match="nonce"):
        env.core.activate(late, now=NOW + timedelta(minutes=5))


def test_max_activations_is_committed_before_the_answer(env: Env) -> None:
    env.core.activate(env.request("backend"), now=NOW)
    assert json.loads(env.commits[-1])["activations"] == {"backend": 1}
    with pytest.raises(PolicyError, match=r"MaxActivations \(1\)"):
        env.core.activate(env.request("backend"), now=NOW)


def test_failed_commit_gives_nothing_and_keeps_the_count(tmp_path: Path) -> None:
    e = Env(tmp_path)
    e.core.set_manifest(json.dumps(MANIFEST).encode(), now=NOW)
    e.fail_commit = True
    with pytest.raises(StoreError):
        e.core.activate(e.request("backend"), now=NOW)
    e.fail_commit = False
    e.core.activate(e.request("backend"), now=NOW)  # the failed one did not count


def test_simulated_quote_refused_by_a_coordinator_not_in_simulation(tmp_path: Path) -> None:
    e = Env(tmp_path)
    hardware = CoordinatorCore(
        CoordinatorCore.fresh_state(now=NOW, dns_names=[], simulation=False),
        commit=e.commit,
        provider=SimulationProvider(e.platform, identity()),
        anchors=[intel_anchor()],
        simulation=False,
    )
    hardware.set_manifest(json.dumps(MANIFEST).encode(), now=NOW)
    e.core = hardware
    with pytest.raises(PolicyError, match="simulat"):
        hardware.activate(e.request("frontend"), now=NOW)


def test_bad_manifest_leaves_the_coordinator_waiting(tmp_path: Path) -> None:
    e = Env(tmp_path)
    with pytest.raises(ManifestError, match="at least one package"):
        e.core.set_manifest(b'{"Packages": {}, "Marbles": {}}', now=NOW)
    assert e.core.state is State.ACCEPTING_MANIFEST
    assert e.commits == []


def test_manifest_signature_verifies_with_the_root_key(env: Env) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    raw, fp, sig = env.core.get_manifest()
    assert fp == hashlib.sha256(raw).hexdigest()
    pub = env.core.root.cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, raw, ec.ECDSA(hashes.SHA256()))


def test_persistent_state_round_trips_and_hides_keys_in_repr(env: Env) -> None:
    blob = env.commits[-1]
    state = load(blob)
    assert dump(state) == blob
    assert "PRIVATE" not in repr(state)
