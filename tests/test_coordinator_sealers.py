"""Platform sealers: Gramine's two sealing keys chosen by the manifest's SealMode, the
simulated platform's pair, ``none``; the vault keeps only the current mode's copy."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshproxy.attestation import EnclaveIdentity, SimulationPlatform
from meshproxy.coordinator._core import CoordinatorCore
from meshproxy.coordinator._persist import PersistentState
from meshproxy.coordinator._seal import UnsealError, key_id
from meshproxy.coordinator._sealers import gramine_keys, sealing_keys_for, simulation_keys
from meshproxy.coordinator._vault import Vault
from meshproxy.errors import ConfigError

NOW = datetime(2026, 11, 1, tzinfo=UTC)
IDENTITY = EnclaveIdentity(
    unique_id=b"u" * 32, signer_id=b"s" * 32, product_id=1, security_version=1, debug=False
)


def fake_gramine(base: Path) -> Path:
    keys = base / "attestation" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    for name in ("_sgx_mrsigner", "_sgx_mrenclave"):
        (keys / name).write_bytes(os.urandom(16))
    return base


def rotate(dev: Path, name: str) -> None:
    (dev / "attestation" / "keys" / name).write_bytes(os.urandom(16))


def state(seal_mode: str | None) -> PersistentState:
    s = CoordinatorCore.fresh_state(now=NOW, dns_names=["c"], simulation=True)
    if seal_mode is not None:
        doc = {
            "Packages": {"p": {"SignerID": "ab" * 32, "ProductID": 1, "SecurityVersion": 1}},
            "Marbles": {"m": {"Package": "p"}},
            "Config": {"SealMode": seal_mode},
        }
        s.manifest_raw = json.dumps(doc).encode()
    return s


def reopen(dev: Path, blob: bytes) -> PersistentState:
    return Vault(gramine_keys(dev / "attestation"), "s").open(blob)


@pytest.mark.parametrize(
    ("mode", "lost_with", "kept_with"),
    [
        (None, "_sgx_mrsigner", "_sgx_mrenclave"),  # before any manifest: ProductKey
        ("ProductKey", "_sgx_mrsigner", "_sgx_mrenclave"),
        ("UniqueKey", "_sgx_mrenclave", "_sgx_mrsigner"),
    ],
)
def test_gramine_seal_mode_picks_the_key(
    tmp_path: Path, mode: str | None, lost_with: str, kept_with: str
) -> None:
    dev = fake_gramine(tmp_path)
    s = state(mode)
    blob = Vault(gramine_keys(dev / "attestation"), "s").seal(s)
    assert len(json.loads(blob)["keks"]) == 1
    rotate(dev, kept_with)
    assert reopen(dev, blob).root_secret == s.root_secret
    rotate(dev, lost_with)
    with pytest.raises(UnsealError, match="another platform or by another enclave"):
        reopen(dev, blob)


def test_switching_to_unique_key_drops_the_product_key_copy(tmp_path: Path) -> None:
    dev = fake_gramine(tmp_path)
    keys = gramine_keys(dev / "attestation")
    vault = Vault(keys, "s")
    blob = vault.seal(state("ProductKey"))
    assert keys.product is not None
    assert key_id(keys.product) in json.loads(blob)["keks"]
    blob = vault.seal(replace(state("UniqueKey"), dek=vault.open(blob).dek))
    assert keys.unique is not None
    assert list(json.loads(blob)["keks"]) == [key_id(keys.unique)]
    rotate(dev, "_sgx_mrenclave")  # a new build of the same signer: no longer enough
    with pytest.raises(UnsealError):
        reopen(dev, blob)


def test_disabled_and_none_seal_nothing_and_the_data_key_still_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev = fake_gramine(tmp_path)
    s = state("Disabled")
    with caplog.at_level(logging.WARNING, "meshproxy.coordinator"):
        blob = Vault(gramine_keys(dev / "attestation"), "s").seal(s)
    assert "STATE KEY NOT SEALED (the manifest's SealMode Disabled)" in caplog.text
    assert "no RecoveryKeys, so this state is LOST at the next restart" in caplog.text
    assert json.loads(blob)["keks"] == {}
    fresh = Vault(gramine_keys(dev / "attestation"), "s")
    with pytest.raises(UnsealError, match=r"was not sealed \(SealMode Disabled"):
        fresh.open(blob)
    assert fresh.open_with_data_key(s.dek).root_secret == s.root_secret

    none = sealing_keys_for("none", platform=None, identity=IDENTITY, device_dir=None)
    assert "SEALING DISABLED" in caplog.text
    blob = Vault(none, "s").seal(state(None))
    assert json.loads(blob)["keks"] == {}
    with pytest.raises(UnsealError, match=r"sealing is disabled \(--seal none\)"):
        Vault(none, "s").open(blob)


def test_simulation_pair_follows_the_same_modes(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    other_build = replace(IDENTITY, unique_id=b"v" * 32)
    unique = Vault(simulation_keys(platform, IDENTITY), "s").seal(state("UniqueKey"))
    product = Vault(simulation_keys(platform, IDENTITY), "s").seal(state("ProductKey"))
    Vault(simulation_keys(platform, IDENTITY), "s").open(unique)
    Vault(simulation_keys(platform, other_build), "s").open(product)
    with pytest.raises(UnsealError):
        Vault(simulation_keys(platform, other_build), "s").open(unique)


def test_gramine_key_files_are_checked_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"keys/_sgx_mrsigner does not exist: not running un"):
        gramine_keys(tmp_path / "attestation")
    dev = fake_gramine(tmp_path)
    raw = (dev / "attestation" / "keys" / "_sgx_mrenclave").read_bytes()
    keys = gramine_keys(dev / "attestation")
    shown = repr(keys) + repr(keys.all()) + repr(Vault(keys, "s"))
    assert raw.hex() not in shown
    assert str(list(raw)) not in shown
    assert keys.unique is not None
    assert raw not in keys.unique.key().reveal()
    (dev / "attestation" / "keys" / "_sgx_mrenclave").write_bytes(b"short")
    with pytest.raises(ConfigError, match="_sgx_mrenclave holds 5 bytes, not a 16-byte"):
        gramine_keys(dev / "attestation")
    with pytest.raises(ConfigError, match="--seal simulation needs the simulated platform"):
        sealing_keys_for("simulation", platform=None, identity=IDENTITY, device_dir=None)
