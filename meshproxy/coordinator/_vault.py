"""The vault: ``PersistentState`` to sealed blob and back, holding this replica's KEK.

Theory of operation (format 2 of ``_seal``): the vault knows the key-encryption key once it
has opened a blob with its platform's sealed copy, received it from a peer, or made a new
one. A commit without a KEK (the very first one, the first after a recovery, or a new
manifest set in recovery mode) makes a new KEK and drops every other platform's copy, so
platforms that held the old one must fetch the new one from a peer. Every commit carries
forward the other platforms' copies it last saw, and adds this platform's.

Which of this platform's keys seals the KEK follows the manifest's ``Config.SealMode``
(``_sealers``): a commit drops this platform's copies under its other keys, so after a
switch to ``UniqueKey`` an enclave of the same signer but another build cannot open the
state, and under ``Disabled`` (or ``--seal none``) no copy is kept at all: a restart finds
none and enters recovery mode.
"""

from __future__ import annotations

import logging
import os

from meshproxy._redact import Secret
from meshproxy.coordinator import _persist, _seal
from meshproxy.coordinator._persist import PersistentState
from meshproxy.coordinator._recovery import RecoveryInfo
from meshproxy.coordinator._seal import Envelope, Sealer, UnsealError
from meshproxy.coordinator._sealers import DEFAULT_SEAL_MODE, SealingKeys
from meshproxy.manifest import parse_manifest

log = logging.getLogger("meshproxy.coordinator")


class Vault:
    def __init__(self, sealer: Sealer | SealingKeys, where: str) -> None:
        self.keys = sealer if isinstance(sealer, SealingKeys) else SealingKeys.single(sealer)
        self.where = where
        self._kek: Secret | None = None
        self._keks: dict[str, str] = {}
        self.locked: Envelope | None = None  # the last envelope this vault could not open
        self._own_ids = frozenset(_seal.key_id(s) for s in self.keys.all())
        self._mode_raw: bytes | None = None  # the manifest ``_mode`` was read from
        self._mode = DEFAULT_SEAL_MODE
        self._warned_unsealed = (False, False)  # (warned, about an unrecoverable state)

    def __repr__(self) -> str:
        return (
            f"<Vault {self.where} kek={'yes' if self._kek else 'no'} platforms={len(self._keks)} "
            f"sealer={self.keys.name} mode={self._mode}>"
        )

    @property
    def seal_mode(self) -> str:
        """The ``SealMode`` of the last state sealed or opened."""
        return self._mode

    def _mode_of(self, state: PersistentState) -> str:
        raw = state.manifest_raw
        if raw is None:
            self._mode, self._mode_raw = DEFAULT_SEAL_MODE, None
        elif raw is not self._mode_raw and raw != self._mode_raw:
            self._mode = parse_manifest(raw, "sealed manifest").config.seal_mode
            self._mode_raw = raw
        return self._mode

    def _sealer(self, state: PersistentState) -> Sealer | None:
        mode = self._mode_of(state)
        sealer = self.keys.for_mode(mode)
        unrecoverable = state.manifest_raw is not None and state.recovery.scheme == "none"
        if sealer is None and self._warned_unsealed != (True, unrecoverable):
            self._warned_unsealed = (True, unrecoverable)
            why = "--seal none" if not self.keys.seals else f"the manifest's SealMode {mode}"
            then = (
                "the manifest has no RecoveryKeys, so this state is LOST at the next restart"
                if unrecoverable
                else "the next restart enters recovery mode and needs the recovery key holders "
                "(meshproxy recover)"
            )
            log.warning(f"STATE KEY NOT SEALED ({why}): {then}")
        return sealer

    @property
    def has_key(self) -> bool:
        return self._kek is not None

    def export_key(self) -> Secret:
        """The KEK, for an attested peer replica (``_replica``) and nothing else."""
        if self._kek is None:
            raise UnsealError("this replica does not hold the state key")
        return self._kek

    def adopt_key(self, kek: Secret) -> None:
        self._kek = kek

    def forget_key(self) -> None:
        self._kek = None
        self._keks = {}

    def seal(self, state: PersistentState) -> bytes:
        if self._kek is None:
            self._kek = Secret(os.urandom(32))
            self._keks = {}
        sealer = self._sealer(state)
        keks = {k: v for k, v in self._keks.items() if k not in self._own_ids}
        if sealer is not None:
            kid, sealed = _seal.seal_kek(self._kek, sealer)
            keks[kid] = sealed
        blob = _seal.seal_v2(
            _persist.dump(state),
            dek=state.dek,
            kek=self._kek,
            keks=keks,
            recovery=state.recovery.to_json(),
            sealer_name=sealer.name if sealer is not None else f"{self.keys.name} (not sealed)",
        )
        self._keks = keks
        return blob

    def needs_registration(self) -> bool:
        """True when this platform's sealed KEK is not yet in the last opened blob."""
        sealer = self.keys.for_mode(self._mode)
        return (
            self._kek is not None and sealer is not None and _seal.key_id(sealer) not in self._keks
        )

    def open(self, blob: bytes) -> PersistentState:
        """Decrypt with the KEK this vault holds, or its platform's sealed copy."""
        env = _seal.parse_envelope(blob, self.where)
        if env is None:  # format 1: sealed directly by this platform (ProductKey)
            if self.keys.product is None:
                raise UnsealError(f"{self.where}: sealing is disabled (--seal none)")
            state = _persist.load(_seal.unseal(blob, self.keys.product, self.where))
            self._kek, self._keks = None, {}
            self._mode_of(state)
            return state
        candidates = [self._kek] + [_seal.unseal_kek(env, s) for s in self.keys.all()]
        for kek in candidates:
            dek = _seal.unwrap_dek(env, kek) if kek is not None else None
            if kek is not None and dek is not None:
                state = self._decrypt(env, dek)
                self._kek, self._keks, self.locked = kek, dict(env.keks), None
                self._mode_of(state)
                return state
        self.locked = env
        if not self.keys.seals:
            raise UnsealError(
                f"{self.where}: sealing is disabled (--seal none): the state key was never "
                "stored here; recover with the recovery key(s)"
            )
        if not env.keks:
            raise UnsealError(
                f"{self.where}: the state key was not sealed (SealMode Disabled, or "
                f"--seal none): recover with the recovery key(s)"
            )
        raise UnsealError(
            f"{self.where}: the sealed state was sealed on another platform or by another "
            f"enclave ({env.sealer}, {len(env.keks)} platform key(s)) and cannot be opened here"
        )

    def open_with_data_key(self, dek: Secret) -> PersistentState:
        """Recovery: open the locked blob with a data key rebuilt from recovery secrets."""
        if self.locked is None:
            raise UnsealError(f"{self.where}: there is no sealed state to recover")
        return self._decrypt(self.locked, dek)

    def locked_recovery(self) -> RecoveryInfo | None:
        if self.locked is None:
            return None
        return RecoveryInfo.from_json(self.locked.recovery)

    def _decrypt(self, env: Envelope, dek: Secret) -> PersistentState:
        state = _persist.load(_seal.decrypt_v2(env, dek, self.where))
        state.dek = dek
        state.recovery = RecoveryInfo.from_json(env.recovery)
        return state
