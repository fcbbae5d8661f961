"""The vault: ``PersistentState`` to sealed blob and back, holding this replica's KEK.

Theory of operation (format 2 of ``_seal``): the vault knows the key-encryption key once it
has opened a blob with its platform's sealed copy, received it from a peer, or made a new
one. A commit without a KEK (the very first one, the first after a recovery, or a new
manifest set in recovery mode) makes a new KEK and drops every other platform's copy, so
platforms that held the old one must fetch the new one from a peer. Every commit carries
forward the other platforms' copies it last saw, and adds this platform's.
"""

from __future__ import annotations

import os

from meshproxy._redact import Secret
from meshproxy.coordinator import _persist, _seal
from meshproxy.coordinator._persist import PersistentState
from meshproxy.coordinator._recovery import RecoveryInfo
from meshproxy.coordinator._seal import Envelope, Sealer, UnsealError


class Vault:
    def __init__(self, sealer: Sealer, where: str) -> None:
        self.sealer = sealer
        self.where = where
        self._kek: Secret | None = None
        self._keks: dict[str, str] = {}
        self.locked: Envelope | None = None  # the last envelope this vault could not open

    def __repr__(self) -> str:
        return (
            f"<Vault {self.where} kek={'yes' if self._kek else 'no'} platforms={len(self._keks)}>"
        )

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
        kid, sealed = _seal.seal_kek(self._kek, self.sealer)
        keks = {**self._keks, kid: sealed}
        blob = _seal.seal_v2(
            _persist.dump(state),
            dek=state.dek,
            kek=self._kek,
            keks=keks,
            recovery=state.recovery.to_json(),
            sealer_name=self.sealer.name,
        )
        self._keks = keks
        return blob

    def needs_registration(self) -> bool:
        """True when this platform's sealed KEK is not yet in the last opened blob."""
        return self._kek is not None and _seal.key_id(self.sealer) not in self._keks

    def open(self, blob: bytes) -> PersistentState:
        """Decrypt with the KEK this vault holds, or its platform's sealed copy."""
        env = _seal.parse_envelope(blob, self.where)
        if env is None:  # format 1: sealed directly by this platform
            state = _persist.load(_seal.unseal(blob, self.sealer, self.where))
            self._kek, self._keks = None, {}
            return state
        candidates = [k for k in (self._kek, _seal.unseal_kek(env, self.sealer)) if k]
        for kek in candidates:
            dek = _seal.unwrap_dek(env, kek)
            if dek is not None:
                state = self._decrypt(env, dek)
                self._kek, self._keks, self.locked = kek, dict(env.keks), None
                return state
        self.locked = env
        raise UnsealError(
            f"{self.where}: the sealed state was sealed on another platform "
            f"({env.sealer}, {len(env.keks)} platform(s)) and cannot be opened here"
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
