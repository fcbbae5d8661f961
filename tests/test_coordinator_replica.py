"""Handing the state key to a new replica: attested both ways, bound to the exchange."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_coordinator_env import NOW

from meshproxy._redact import Secret
from meshproxy.attestation import (
    EnclaveIdentity,
    SimulationPlatform,
    SimulationProvider,
    intel_anchor,
    simulation_anchor,
)
from meshproxy.coordinator import _replica, _wire
from meshproxy.errors import PolicyError, StateError

COORDINATOR = EnclaveIdentity(
    unique_id=hashlib.sha256(b"coordinator build").digest(),
    signer_id=hashlib.sha256(b"coordinator signer").digest(),
    product_id=1,
    security_version=3,
    debug=False,
)


class Pair:
    """A serving replica on machine A and a joining one on machine B, trusting each other."""

    def __init__(self, tmp: Path) -> None:
        self.a = SimulationPlatform.load_or_create(tmp / "a", now=NOW)
        self.b = SimulationPlatform.load_or_create(tmp / "b", now=NOW)
        self.anchors = [intel_anchor(), simulation_anchor(self.a), simulation_anchor(self.b)]
        self.kek = Secret(b"K" * 32)
        self.sharing = True

        def can_share() -> None:
            if not self.sharing:
                raise StateError("cannot share state key: it is in recovery mode")

        self.server = _replica.KeyServer(
            lambda: self.kek,
            provider=SimulationProvider(self.a, COORDINATOR),
            anchors=self.anchors,
            identity=COORDINATOR,
            simulation=True,
            can_share=can_share,
        )

    def exchange(self, joiner: EnclaveIdentity = COORDINATOR) -> Secret:
        ephemeral, body = _replica.key_request(SimulationProvider(self.b, joiner))
        answer = self.server(body, NOW)
        return _replica.open_answer(
            ephemeral,
            answer,
            anchors=self.anchors,
            identity=COORDINATOR,
            simulation=True,
            now=NOW,
            who="peer",
        )


def test_the_same_coordinator_on_another_machine_gets_the_key(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    assert pair.exchange() == pair.kek
    newer = EnclaveIdentity(
        COORDINATOR.unique_id, COORDINATOR.signer_id, 1, COORDINATOR.security_version + 1, False
    )
    assert pair.exchange(newer) == pair.kek  # product-key rule: a newer SVN may join


@pytest.mark.parametrize(
    ("joiner", "message"),
    [
        (EnclaveIdentity(COORDINATOR.unique_id, b"\x01" * 32, 1, 3, False), "SignerID"),
        (EnclaveIdentity(COORDINATOR.unique_id, COORDINATOR.signer_id, 2, 3, False), "ProductID"),
        (EnclaveIdentity(COORDINATOR.unique_id, COORDINATOR.signer_id, 1, 2, False), "below"),
        (EnclaveIdentity(COORDINATOR.unique_id, COORDINATOR.signer_id, 1, 3, True), "debug"),
    ],
)
def test_other_enclaves_are_refused(tmp_path: Path, joiner: EnclaveIdentity, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Pair(tmp_path).exchange(joiner)


def test_a_machine_the_peer_does_not_trust_is_refused(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.server = _replica.KeyServer(
        lambda: pair.kek,
        provider=SimulationProvider(pair.a, COORDINATOR),
        anchors=[simulation_anchor(pair.a)],
        identity=COORDINATOR,
        simulation=True,
        can_share=lambda: None,
    )
    with pytest.raises(PolicyError, match="does not verify"):
        pair.exchange()


def test_tampered_answers_and_replayed_requests_fail(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    ephemeral, body = _replica.key_request(SimulationProvider(pair.b, COORDINATOR))
    answer = pair.server(body, NOW)
    # The answer is bound to the requester's ephemeral key: another requester cannot use it.
    other, _ = _replica.key_request(SimulationProvider(pair.b, COORDINATOR))
    for key, data in (
        (other, answer),
        (ephemeral, {**answer, "wrappedKey": _wire.b64e(b"\x00" * 60)}),
        (ephemeral, {**answer, "publicKey": _wire.b64e(b"\x01" * 32)}),
    ):
        with pytest.raises(PolicyError, match=r"bind|decrypt"):
            _replica.open_answer(
                key,
                data,
                anchors=pair.anchors,
                identity=COORDINATOR,
                simulation=True,
                now=NOW,
                who="peer",
            )
    # A quote over another key does not get an answer.
    _, body2 = _replica.key_request(SimulationProvider(pair.b, COORDINATOR))
    with pytest.raises(PolicyError, match="bind"):
        pair.server({**body2, "quote": body["quote"]}, NOW)
    pair.sharing = False
    with pytest.raises(StateError, match="recovery"):
        pair.server(body, NOW)
