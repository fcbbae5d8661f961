"""Recovery secrets: the state's data key, split for the manifest's RecoveryKeys.

Schemes (MarbleRun's, marblerun.md 5.3):

* one key: the share is the data key itself;
* n keys, RecoveryThreshold 0 or n: n random 32-byte shares whose XOR is the data key;
* 2 <= RecoveryThreshold < n: Shamir shares over GF(256) (33 bytes, HashiCorp's layout).

Each share is encrypted to its key with RSA-OAEP-SHA256 and handed to whoever sets the
manifest (``RecoverySecrets``). The coordinator keeps ``RecoveryInfo`` next to the sealed
state, in the clear: the scheme, the threshold, and for every key its public key and the
SHA-256 of its share, so a returned share is recognised (and an old one refused) at once.
The info is authenticated as associated data of the state's ciphertext, so after the key is
recovered nothing in it can have been swapped.

To recover, a key holder decrypts their share and signs it (RSA PKCS#1 v1.5 over SHA-256,
as MarbleRun's CLI does); ``Recoverer`` checks each upload against the info and yields the
data key when enough distinct shares are in. Better than MarbleRun: a share is verified
against its own key when it arrives, never by trying subsets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from meshproxy._redact import Secret
from meshproxy.coordinator import _shamir
from meshproxy.errors import PolicyError, StoreError

KEY_SIZE = 32
SCHEMES = ("none", "single", "xor", "shamir")


def oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True)
class RecoveryKeyInfo:
    public_pem: bytes
    share_sha256: str


@dataclass(frozen=True)
class RecoveryInfo:
    scheme: str = "none"
    threshold: int = 0  # shares needed to recover
    keys: Mapping[str, RecoveryKeyInfo] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "threshold": self.threshold,
            "keys": {
                name: {"publicKey": k.public_pem.decode(), "shareSha256": k.share_sha256}
                for name, k in sorted(self.keys.items())
            },
        }

    @classmethod
    def from_json(cls, doc: Any) -> RecoveryInfo:
        try:
            scheme = str(doc["scheme"])
            if scheme not in SCHEMES:
                raise ValueError(scheme)
            keys = {
                str(name): RecoveryKeyInfo(str(k["publicKey"]).encode(), str(k["shareSha256"]))
                for name, k in doc["keys"].items()
            }
            return cls(scheme, int(doc["threshold"]), keys)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StoreError("sealed state: recovery information does not parse") from None

    def same_keys(self, keys: Mapping[str, bytes], threshold: int) -> bool:
        """Whether a manifest's RecoveryKeys and threshold are the ones this info was for."""
        mine = {n: k.public_pem for n, k in self.keys.items()}
        return mine == dict(keys) and self.threshold == _needed(len(keys), threshold)


NO_RECOVERY = RecoveryInfo()


def _needed(n: int, threshold: int) -> int:
    if n == 0:
        return 0
    if n == 1:
        return 1
    return threshold if 2 <= threshold < n else n


def generate(
    keys: Mapping[str, bytes], threshold: int
) -> tuple[Secret, RecoveryInfo, dict[str, bytes]]:
    """A fresh data key, its recovery info, and each key's encrypted share."""
    dek = os.urandom(KEY_SIZE)
    n = len(keys)
    needed = _needed(n, threshold)
    if n == 0:
        return Secret(dek), NO_RECOVERY, {}
    if n == 1:
        scheme, shares = "single", [dek]
    elif needed == n:
        scheme = "xor"
        shares = [os.urandom(KEY_SIZE) for _ in range(n - 1)]
        last = bytearray(dek)
        for s in shares:
            last = bytearray(a ^ b for a, b in zip(last, s, strict=True))
        shares.append(bytes(last))
    else:
        scheme, shares = "shamir", _shamir.split(dek, n, needed)
    infos: dict[str, RecoveryKeyInfo] = {}
    encrypted: dict[str, bytes] = {}
    for (name, pem), share in zip(sorted(keys.items()), shares, strict=True):
        public = _rsa_public(pem)
        encrypted[name] = public.encrypt(share, oaep())
        infos[name] = RecoveryKeyInfo(pem, hashlib.sha256(share).hexdigest())
    return Secret(dek), RecoveryInfo(scheme, needed, infos), encrypted


def _rsa_public(pem: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise PolicyError("a recovery key must be an RSA public key")
    return key


def sign_share(share: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """What a key holder sends along with its share (MarbleRun's recovery signature)."""
    return private_key.sign(share, padding.PKCS1v15(), hashes.SHA256())


class Recoverer:
    """Collects signed shares for one ``RecoveryInfo`` until the data key is whole."""

    def __init__(self, info: RecoveryInfo) -> None:
        self.info = info
        self._shares: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"<Recoverer {self.info.scheme} {len(self._shares)}/{self.info.threshold}>"

    @property
    def remaining(self) -> int:
        return max(self.info.threshold - len(self._shares), 0)

    @property
    def signers(self) -> tuple[str, ...]:
        return tuple(sorted(self._shares))

    def add(self, share: bytes, signature: bytes) -> tuple[str, int]:
        """Accept one share; returns the recovery key's name and how many remain."""
        if self.info.scheme == "none":
            raise PolicyError(
                "the sealed state has no recovery keys: it cannot be recovered (set a new "
                "manifest to start over)"
            )
        digest = hashlib.sha256(share).hexdigest()
        name = next((n for n, k in self.info.keys.items() if k.share_sha256 == digest), None)
        if name is None:
            raise PolicyError(
                "this recovery secret does not belong to the sealed state (an old or foreign "
                "secret, or decrypted with the wrong key)"
            )
        try:
            _rsa_public(self.info.keys[name].public_pem).verify(
                signature, share, padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise PolicyError(
                f"the signature over the recovery secret of key {name!r} does not verify with "
                "that key"
            ) from None
        if name in self._shares:
            raise PolicyError(f"the recovery secret of key {name!r} was already uploaded")
        self._shares[name] = share
        return name, self.remaining

    def key(self) -> Secret | None:
        """The data key once enough shares are in, else None."""
        if self.remaining:
            return None
        shares = [self._shares[n] for n in sorted(self._shares)]
        if self.info.scheme == "single":
            return Secret(shares[0])
        if self.info.scheme == "xor":
            out = bytearray(KEY_SIZE)
            for s in shares:
                out = bytearray(a ^ b for a, b in zip(out, s, strict=True))
            return Secret(bytes(out))
        return Secret(_shamir.combine(shares[: self.info.threshold]))

    def reset(self) -> None:
        self._shares.clear()
