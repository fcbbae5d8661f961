"""Sealing the coordinator's state: one AES-256-GCM blob, one JSON document.

Format 1 (still read): the state under a fresh data key, sealed by the platform's
sealing key. Format 2 (written): see the section below; it adds a stable data key that
the recovery keys can unlock and a key-encryption key shared by replicas. Either way the
whole sealed state is one document, written with one atomic operation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshproxy._redact import Secret
from meshproxy.errors import StoreError

FORMAT = "meshproxy-sealed-state/1"
_AAD = b"meshproxy coordinator state v1"


class UnsealError(StoreError):
    """Sealed state exists but this platform cannot open it (moved, or another key)."""


class Sealer(Protocol):
    name: str

    def key(self) -> Secret: ...


def seal(state: bytes, sealer: Sealer) -> bytes:
    dek = AESGCM.generate_key(bit_length=256)
    n1, n2 = os.urandom(12), os.urandom(12)
    sealed_key = n1 + AESGCM(sealer.key().reveal()).encrypt(n1, dek, _AAD)
    ciphertext = AESGCM(dek).encrypt(n2, state, _AAD)
    doc = {
        "format": FORMAT,
        "sealer": sealer.name,
        "sealed_key": base64.b64encode(sealed_key).decode(),
        "nonce": base64.b64encode(n2).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    return json.dumps(doc).encode()


def unseal(blob: bytes, sealer: Sealer, where: str) -> bytes:
    try:
        doc = json.loads(blob)
        if doc.get("format") != FORMAT:
            raise StoreError(
                f"{where}: not a meshproxy sealed state (format {doc.get('format')!r})"
            )
        sealed_key = base64.b64decode(doc["sealed_key"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreError(f"{where}: sealed state is corrupt (not the expected JSON)") from None
    try:
        dek = AESGCM(sealer.key().reveal()).decrypt(sealed_key[:12], sealed_key[12:], _AAD)
    except InvalidTag:
        raise UnsealError(
            f"{where}: the sealed state was sealed on another platform ({doc.get('sealer')}) "
            "and cannot be opened here"
        ) from None
    try:
        return AESGCM(dek).decrypt(nonce, ciphertext, _AAD)
    except InvalidTag:
        raise StoreError(f"{where}: sealed state failed its integrity check") from None


# -- format 2: a stable data key, a key-encryption key per platform, recovery info -----------
#
# The state is encrypted under a data key (DEK) that lives as long as the recovery secrets
# handed out for it. The DEK is wrapped by a key-encryption key (KEK) that is shared by
# every replica; each replica's platform seals the KEK for itself (``keks``: key id ->
# sealed KEK), so the blob opens on every platform that has ever held the KEK and on no
# other. A new replica gets the KEK from an attested peer (``_replica``). The recovery
# information sits in the clear and is authenticated as associated data of the ciphertext.

FORMAT_V2 = "meshproxy-sealed-state/2"
_AAD_V2 = b"meshproxy coordinator state v2"
_DEK_AAD = b"meshproxy data key v2"


@dataclass(frozen=True)
class Envelope:
    sealer: str
    keks: dict[str, str] = field(repr=False)  # key id -> base64(nonce || sealed KEK)
    wrapped_key: bytes = field(repr=False)  # nonce || AES-GCM(KEK, DEK)
    recovery: dict[str, Any] = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


def key_id(sealer: Sealer) -> str:
    """Names a platform's sealing key without revealing it."""
    return hashlib.sha256(b"meshproxy sealing key id" + sealer.key().reveal()).hexdigest()[:32]


def parse_envelope(blob: bytes, where: str) -> Envelope | None:
    """The format-2 envelope, or None for a format-1 blob; StoreError if neither."""
    try:
        doc = json.loads(blob)
        fmt = doc.get("format")
        if fmt == FORMAT:
            return None
        if fmt != FORMAT_V2:
            raise StoreError(f"{where}: not a meshproxy sealed state (format {fmt!r})")
        return Envelope(
            sealer=str(doc["sealer"]),
            keks={str(k): str(v) for k, v in doc["keks"].items()},
            wrapped_key=base64.b64decode(doc["wrapped_key"], validate=True),
            recovery=dict(doc["recovery"]),
            nonce=base64.b64decode(doc["nonce"], validate=True),
            ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreError(f"{where}: sealed state is corrupt (not the expected JSON)") from None


def _aad(recovery: dict[str, Any]) -> bytes:
    return _AAD_V2 + hashlib.sha256(json.dumps(recovery, sort_keys=True).encode()).digest()


def encode_envelope(env: Envelope) -> bytes:
    doc = {
        "format": FORMAT_V2,
        "sealer": env.sealer,
        "keks": env.keks,
        "wrapped_key": base64.b64encode(env.wrapped_key).decode(),
        "recovery": env.recovery,
        "nonce": base64.b64encode(env.nonce).decode(),
        "ciphertext": base64.b64encode(env.ciphertext).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def seal_v2(
    state: bytes,
    *,
    dek: Secret,
    kek: Secret,
    keks: dict[str, str],
    recovery: dict[str, Any],
    sealer_name: str,
) -> bytes:
    n1, n2 = os.urandom(12), os.urandom(12)
    wrapped = n1 + AESGCM(kek.reveal()).encrypt(n1, dek.reveal(), _DEK_AAD)
    ciphertext = AESGCM(dek.reveal()).encrypt(n2, state, _aad(recovery))
    return encode_envelope(Envelope(sealer_name, keks, wrapped, recovery, n2, ciphertext))


def seal_kek(kek: Secret, sealer: Sealer) -> tuple[str, str]:
    kid = key_id(sealer)
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(sealer.key().reveal()).encrypt(nonce, kek.reveal(), kid.encode())
    return kid, base64.b64encode(sealed).decode()


def unseal_kek(env: Envelope, sealer: Sealer) -> Secret | None:
    """The KEK as this platform sealed it, or None if it never did."""
    kid = key_id(sealer)
    entry = env.keks.get(kid)
    if entry is None:
        return None
    try:
        sealed = base64.b64decode(entry, validate=True)
        return Secret(AESGCM(sealer.key().reveal()).decrypt(sealed[:12], sealed[12:], kid.encode()))
    except (ValueError, InvalidTag):
        return None


def unwrap_dek(env: Envelope, kek: Secret) -> Secret | None:
    try:
        dek = AESGCM(kek.reveal()).decrypt(env.wrapped_key[:12], env.wrapped_key[12:], _DEK_AAD)
    except (ValueError, InvalidTag):
        return None
    return Secret(dek)


def decrypt_v2(env: Envelope, dek: Secret, where: str) -> bytes:
    try:
        return AESGCM(dek.reveal()).decrypt(env.nonce, env.ciphertext, _aad(env.recovery))
    except (ValueError, InvalidTag):
        raise UnsealError(
            f"{where}: the key does not open the sealed state (or the state was tampered with)"
        ) from None
