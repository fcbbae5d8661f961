"""Sealed state and recovery: the vault, recovery secrets (one key, XOR, Shamir), recovery
mode on another platform, and every refusal on the way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from test_coordinator_env import (
    NOW,
    MemoryStore,
    PlatformSealer,
    RecoveryHolder,
    World,
    package,
)

from meshproxy._redact import Secret
from meshproxy.attestation import SimulationPlatform
from meshproxy.coordinator import (
    State,
    _persist,
    _recovery,
    _seal,
    recovery_padding,
    sign_recovery_secret,
)
from meshproxy.coordinator._recovery import Recoverer
from meshproxy.coordinator._seal import UnsealError
from meshproxy.coordinator._vault import Vault
from meshproxy.errors import PolicyError, StateError, StoreError


def manifest(holders: list[RecoveryHolder], threshold: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Packages": {"app": package()},
        "Marbles": {"m": {"Package": "app", "MaxActivations": 5}},
        "Secrets": {"k": {"Type": "symmetric-key", "Size": 256, "Shared": True}},
        "RecoveryKeys": {h.name: h.public_pem for h in holders},
    }
    if threshold:
        doc["Config"] = {"RecoveryThreshold": threshold}
    return doc


def decrypt(holder: RecoveryHolder, secrets: dict[str, bytes]) -> tuple[bytes, bytes]:
    share = holder.key.decrypt(secrets[holder.name], recovery_padding())
    return share, sign_recovery_secret(share, holder.key)


def move_to_another_machine(world: World, tmp: Path) -> World:
    """The same store opened by a coordinator on another simulated platform."""
    return World(tmp, store=world.store, machine="elsewhere")


@pytest.mark.parametrize(
    ("n", "threshold", "scheme", "needed"),
    [(1, 0, "single", 1), (3, 0, "xor", 3), (3, 3, "xor", 3), (3, 2, "shamir", 2)],
)
def test_recovery_restores_the_state_on_another_platform(
    tmp_path: Path, n: int, threshold: int, scheme: str, needed: int
) -> None:
    holders = [RecoveryHolder(f"key{i}") for i in range(n)]
    world = World(tmp_path)
    secrets = world.set_manifest(manifest(holders, threshold))
    assert sorted(secrets) == [h.name for h in holders]
    world.core.activate(world.request("m"), now=NOW)
    root = world.core.root.cert
    shared_key = world.core.persistent.shared_secrets["k"].public
    assert world.core.persistent.recovery.scheme == scheme

    moved = move_to_another_machine(world, tmp_path)
    assert moved.core.state is State.RECOVERY
    assert moved.core.root.cert != root  # a temporary root until recovered
    for i, holder in enumerate(holders[:needed]):
        remaining, message = moved.core.recover(*decrypt(holder, secrets), now=NOW)
        assert remaining == needed - i - 1
    assert "successful" in message
    assert moved.core.state is State.ACCEPTING_MARBLES
    assert moved.core.root.cert == root
    assert moved.core.persistent.shared_secrets["k"].public == shared_key
    assert moved.core.activation_counts() == {"m": 1}
    log = [json.loads(line) for line in moved.admin.update_log()]
    assert log[-1]["update"] == "Coordinator recovered"
    assert log[-1]["recoveryKeys"] == sorted(h.name for h in holders[:needed])
    # The recovered state is sealed for the new platform: a restart there opens it.
    again = World(tmp_path, store=world.store, machine="elsewhere")
    assert again.core.state is State.ACCEPTING_MARBLES
    # ... and the old platform's copy of the key is gone (re-keyed on recovery).
    old = World(tmp_path, store=world.store, machine="m1")
    assert old.core.state is State.RECOVERY


def test_shares_are_checked_one_by_one(tmp_path: Path) -> None:
    holders = [RecoveryHolder(f"key{i}") for i in range(3)]
    world = World(tmp_path)
    secrets = world.set_manifest(manifest(holders, 2))
    moved = move_to_another_machine(world, tmp_path)
    share, signature = decrypt(holders[0], secrets)
    with pytest.raises(PolicyError, match="does not verify"):
        moved.core.recover(share, sign_recovery_secret(share, holders[1].key), now=NOW)
    with pytest.raises(PolicyError, match="does not belong"):
        moved.core.recover(b"\x00" * 33, signature, now=NOW)
    assert moved.core.recover(share, signature, now=NOW)[0] == 1
    with pytest.raises(PolicyError, match="already uploaded"):
        moved.core.recover(share, signature, now=NOW)
    assert moved.core.state is State.RECOVERY


def test_old_recovery_secrets_do_not_fit_a_new_manifest(tmp_path: Path) -> None:
    holder = RecoveryHolder("only")
    first = World(tmp_path / "a")
    old_secrets = first.set_manifest(manifest([holder]))
    world = World(tmp_path / "b")
    world.set_manifest(manifest([holder]))
    moved = move_to_another_machine(world, tmp_path / "b")
    with pytest.raises(PolicyError, match="does not belong"):
        moved.core.recover(*decrypt(holder, old_secrets), now=NOW)


def test_without_recovery_keys_recovery_is_impossible_but_a_new_manifest_is_not(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    assert world.set_manifest(manifest([])) == {}
    root = world.core.root.cert
    moved = move_to_another_machine(world, tmp_path)
    holder = RecoveryHolder("stranger")
    with pytest.raises(PolicyError, match="no recovery keys"):
        moved.core.recover(b"x" * 32, sign_recovery_secret(b"x" * 32, holder.key), now=NOW)
    # Setting a new manifest discards the sealed state (logged) and starts over.
    moved.set_manifest(manifest([]))
    assert moved.core.state is State.ACCEPTING_MARBLES
    assert moved.core.root.cert != root
    assert json.loads(moved.admin.update_log()[0])["discardedSealedState"] is True
    with pytest.raises(StateError, match="not in recovery mode"):
        moved.core.recover(b"x", b"y", now=NOW)


def test_vault_keeps_every_platforms_key_and_binds_the_recovery_info(tmp_path: Path) -> None:
    a = SimulationPlatform.load_or_create(tmp_path / "a", now=NOW)
    b = SimulationPlatform.load_or_create(tmp_path / "b", now=NOW)
    holder = RecoveryHolder("k")
    world = World(tmp_path)
    secrets = world.set_manifest(manifest([holder]))
    state = world.core.persistent
    va, vb = Vault(PlatformSealer(a), "s"), Vault(PlatformSealer(b), "s")
    blob = va.seal(state)
    assert b"BEGIN PRIVATE KEY" not in blob
    assert state.root_secret.reveal() not in blob
    with pytest.raises(UnsealError, match="another platform"):
        vb.open(blob)
    vb.adopt_key(va.export_key())  # what a peer replica hands over
    blob2 = vb.seal(vb.open(blob))
    assert len(json.loads(blob2)["keks"]) == 2
    assert Vault(PlatformSealer(a), "s").open(blob2).root_secret == state.root_secret
    # Swapping the public recovery info makes the real key fail: it is authenticated.
    doc = json.loads(blob2)
    doc["recovery"]["threshold"] = 7
    tampered = json.dumps(doc).encode()
    fresh = Vault(PlatformSealer(b), "s")
    with pytest.raises(StoreError, match=r"does not open|tampered"):
        fresh.open(tampered)
    share = holder.key.decrypt(secrets["k"], recovery_padding())
    with pytest.raises(StoreError):
        Vault(PlatformSealer(a), "s").open_with_data_key(Secret(share))  # nothing locked


def test_format_1_state_still_opens_and_is_rewritten_as_format_2(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.set_manifest(manifest([]))
    sealer = PlatformSealer(world.platform)
    old_blob = _seal.seal(_persist.dump(world.core.persistent), sealer)
    store = MemoryStore()
    store.blob, store.revision = old_blob, 1
    reopened = World(tmp_path, store=store)
    assert reopened.core.state is State.ACCEPTING_MARBLES
    reopened.core.activate(reopened.request("m"), now=NOW)  # a commit
    assert json.loads(store.blob or b"{}")["format"] == _seal.FORMAT_V2


def test_recovery_generation_is_what_marblerun_describes() -> None:
    holders = [RecoveryHolder(f"h{i}") for i in range(3)]
    keys = {h.name: h.public_pem.encode() for h in holders}
    dek, info, enc = _recovery.generate(keys, 0)
    shares = [h.key.decrypt(enc[h.name], recovery_padding()) for h in holders]
    xor = bytes(a ^ b ^ c for a, b, c in zip(*shares, strict=True))
    assert xor == dek.reveal()
    dek2, info2, enc2 = _recovery.generate(keys, 2)
    shares2 = [h.key.decrypt(enc2[h.name], recovery_padding()) for h in holders]
    assert all(len(s) == 33 for s in shares2)
    assert info2.scheme == "shamir"
    r = Recoverer(info2)
    for h, s in list(zip(holders, shares2, strict=True))[1:]:
        r.add(s, h.key.sign(s, padding.PKCS1v15(), hashes.SHA256()))
    assert r.key() == dek2
    assert "redacted" not in repr(r)
    assert str(len(shares2[0])) not in repr(r)
    assert info.same_keys(keys, 0)
    assert not info.same_keys(keys, 2)
