"""The platform sealers behind ``meshproxy coordinator --seal simulation|gramine|none``.

A platform has up to two sealing keys, chosen per state by the manifest's
``Config.SealMode`` (MarbleRun's names):

* ``ProductKey`` (the default, also before any manifest is set): a key every enclave of the
  same signer and product can derive on this machine. Gramine: ``_sgx_mrsigner``
  (EGETKEY with the MRSIGNER policy). Simulation: a platform key for the coordinator's
  signer.
* ``UniqueKey``: a key only this exact enclave build can derive on this machine. Gramine:
  ``_sgx_mrenclave`` (MRENCLAVE policy). Simulation: a platform key for the coordinator's
  measurement.
* ``Disabled``: nothing is sealed; the state key lives in memory, in peer replicas and in
  the recovery secrets, so every restart enters recovery mode. ``--seal none`` does this
  whatever the manifest says.

Gramine's keys are 16 raw bytes; the AES-256-GCM key that seals the state key is derived
from one with HKDF-SHA256 (so the raw key is never used for two purposes, as Gramine's
manifest documentation asks). Keys are read once, at start, and never logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshproxy._redact import Secret
from meshproxy.attestation import EnclaveIdentity, SimulationPlatform
from meshproxy.coordinator._seal import Sealer
from meshproxy.errors import ConfigError

log = logging.getLogger("meshproxy.coordinator")

SEALERS = ("simulation", "gramine", "none")
DEFAULT_SEAL_MODE = "ProductKey"
GRAMINE_KEY_SIZE = 16
GRAMINE_KEYS = {"ProductKey": "_sgx_mrsigner", "UniqueKey": "_sgx_mrenclave"}
_SIM_LABEL = b"meshproxy coordinator state sealing v1"  # ProductKey: as before SealMode


class KeySealer:
    """A sealer over key bytes already read; the name says which key it is."""

    def __init__(self, name: str, key: Secret) -> None:
        self.name = name
        self._key = key

    def __repr__(self) -> str:
        return f"<KeySealer {self.name}>"

    def key(self) -> Secret:
        return self._key


@dataclass(frozen=True)
class SealingKeys:
    """This platform's sealer per ``SealMode``; ``None`` means that mode seals nothing."""

    name: str
    product: Sealer | None = field(repr=False)
    unique: Sealer | None = field(repr=False)

    @classmethod
    def single(cls, sealer: Sealer) -> SealingKeys:
        """One key for both modes (tests, and sealers that know no key policies)."""
        return cls(sealer.name, sealer, sealer)

    @property
    def seals(self) -> bool:
        return self.product is not None or self.unique is not None

    def for_mode(self, mode: str) -> Sealer | None:
        if mode == "Disabled":
            return None
        return self.unique if mode == "UniqueKey" else self.product

    def all(self) -> tuple[Sealer, ...]:
        out: list[Sealer] = []
        for s in (self.product, self.unique):
            if s is not None and all(s is not o for o in out):
                out.append(s)
        return tuple(out)


def _hkdf(raw: bytes, label: bytes) -> Secret:
    return Secret(HKDF(hashes.SHA256(), 32, salt=b"meshproxy-coordinator-seal/v1", info=label)
                  .derive(raw))  # fmt: skip


def read_gramine_key(keys_dir: Path, name: str) -> Secret:
    """One of Gramine's SGX sealing keys (``keys/_sgx_mrenclave``, ``keys/_sgx_mrsigner``)."""
    path = keys_dir / name
    try:
        with path.open("rb") as f:
            raw = f.read(GRAMINE_KEY_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"--seal gramine: {path} does not exist: not running under Gramine SGX (use "
            "--seal simulation with --simulation, or --seal none)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--seal gramine: {path}: {exc.strerror or exc}") from None
    if len(raw) != GRAMINE_KEY_SIZE:
        raise ConfigError(
            f"--seal gramine: {path} holds {len(raw)} bytes, not a {GRAMINE_KEY_SIZE}-byte "
            "sealing key"
        )
    return Secret(raw)


def gramine_keys(attestation_dir: Path) -> SealingKeys:
    keys_dir = attestation_dir / "keys"
    sealers = {
        mode: KeySealer(f"gramine{name.removeprefix('_sgx')}", _hkdf(
            read_gramine_key(keys_dir, name).reveal(), b"gramine " + name.encode()))
        for mode, name in GRAMINE_KEYS.items()
    }  # fmt: skip
    return SealingKeys("gramine", sealers["ProductKey"], sealers["UniqueKey"])


def simulation_keys(platform: SimulationPlatform, identity: EnclaveIdentity) -> SealingKeys:
    product = KeySealer("simulation", platform.sealing_key(_SIM_LABEL))
    unique = KeySealer(
        "simulation_mrenclave", platform.sealing_key(_SIM_LABEL + b" unique " + identity.unique_id)
    )
    return SealingKeys("simulation", product, unique)


def sealing_keys_for(
    kind: str,
    *,
    platform: SimulationPlatform | None,
    identity: EnclaveIdentity,
    device_dir: Path | None,
) -> SealingKeys:
    """The sealer ``--seal`` names; ``device_dir`` stands in for ``/dev`` (tests)."""
    if kind == "simulation":
        if platform is None:
            raise ConfigError("--seal simulation needs the simulated platform (--simulation)")
        return simulation_keys(platform, identity)
    if kind == "gramine":
        return gramine_keys((device_dir or Path("/dev")) / "attestation")
    if kind == "none":
        log.warning(
            "SEALING DISABLED (--seal none): the state key is never written to disk; every "
            "restart enters recovery mode and needs the manifest's RecoveryKeys holders "
            "(meshproxy recover); without RecoveryKeys the state is lost at restart"
        )
        return SealingKeys("none", None, None)
    raise ConfigError(f"--seal {kind!r}: must be one of {', '.join(SEALERS)}")
