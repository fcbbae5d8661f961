"""Sealing the coordinator's state: one AES-256-GCM blob under a fresh data key.

The data key is itself sealed by the platform's sealing key (the simulated platform's here;
SGX's product key under Gramine in a later step). The whole sealed state is one JSON
document, so it is written with one atomic rename.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Protocol

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
