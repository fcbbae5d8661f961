"""Activation nonces that any replica can check, each accepted once.

Theory of operation: a nonce is ``version || expiry (ms since the epoch, 8 bytes) ||
16 random bytes || tag``, the tag an HMAC-SHA256 (truncated to 16 bytes) over the rest
under a key derived from the cluster's root secret. Issuing one is an HMAC: no state, no
store, no core thread. Any replica that holds the shared state (and so the root secret)
recognizes the nonces of every other replica: a marble may ask one replica for its nonce
and activate at another, as behind a load balancer. A coordinator with a state of its own
(the file store) mixes a per-process random salt into the key, so nonces die with the
process that issued them.

Single use is a claim in a ``UsedNonces`` set, made after the request verified and before
anything is issued: in memory for one coordinator, in etcd (create-if-absent under a lease
that outlives the nonce) for replicas. A nonce is claimed only until it expires; after
that its tag alone refuses it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshproxy._redact import Secret
from meshproxy.errors import PolicyError

NONCE_TTL = timedelta(seconds=60)
_VERSION = 1
_TAG = 16
_BODY = struct.Struct(">BQ16s")  # version, expiry in ms, random
SIZE = _BODY.size + _TAG
MAX_LOCAL_CLAIMS = 200_000  # a bound on memory: ~60 s of nonces at over 3,000/s


class UsedNonces(Protocol):
    """Where the claims live; ``claim`` returns the ids it could claim (first claim wins)."""

    def claim(self, ids: Iterable[bytes], expires: datetime, now: datetime) -> set[bytes]: ...


class LocalUsedNonces:
    """Claims of one coordinator process (its nonce key dies with it too)."""

    def __init__(self) -> None:
        self._claims: dict[bytes, datetime] = {}
        self._next_prune: datetime | None = None

    def claim(self, ids: Iterable[bytes], expires: datetime, now: datetime) -> set[bytes]:
        if self._next_prune is None or now >= self._next_prune:
            self._claims = {k: t for k, t in self._claims.items() if t > now}
            self._next_prune = now + timedelta(seconds=1)
        out = set()
        for nonce_id in ids:
            if nonce_id in self._claims:
                continue
            if len(self._claims) >= MAX_LOCAL_CLAIMS:
                raise PolicyError("too many activations in flight; retry shortly")
            self._claims[nonce_id] = expires
            out.add(nonce_id)
        return out


class NonceBook:
    """Issues and checks nonces under one root secret (re-keyed when it changes)."""

    def __init__(self, *, shared: bool, ttl: timedelta = NONCE_TTL) -> None:
        self._salt = b"" if shared else os.urandom(16)
        self.ttl = ttl
        self._for: bytes | None = None
        self._key = b""

    def __repr__(self) -> str:
        return f"<NonceBook shared={not self._salt} ttl={self.ttl.total_seconds():g}s>"

    def _key_for(self, root_secret: Secret) -> bytes:
        material = root_secret.reveal()
        fingerprint = hashlib.sha256(material).digest()
        if fingerprint != self._for:
            self._key = HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=self._salt or None,
                info=b"meshproxy activation nonce v1",
            ).derive(material)
            self._for = fingerprint
        return self._key

    def issue(self, root_secret: Secret, now: datetime) -> bytes:
        expiry = int((now + self.ttl).timestamp() * 1000)
        body = _BODY.pack(_VERSION, expiry, os.urandom(16))
        return body + self._tag(root_secret, body)

    def _tag(self, root_secret: Secret, body: bytes) -> bytes:
        return hmac.new(self._key_for(root_secret), body, hashlib.sha256).digest()[:_TAG]

    def check(self, root_secret: Secret, nonce: bytes, now: datetime) -> datetime:
        """The nonce's expiry if this cluster issued it and it has not expired."""
        unknown = PolicyError("activation nonce is unknown, used or expired; request a new one")
        if len(nonce) != SIZE:
            raise unknown
        body, tag = nonce[: _BODY.size], nonce[_BODY.size :]
        if not hmac.compare_digest(tag, self._tag(root_secret, body)):
            raise unknown
        version, expiry_ms, _ = _BODY.unpack(body)
        expires = datetime.fromtimestamp(expiry_ms / 1000, tz=now.tzinfo)
        if version != _VERSION or not now < expires <= now + self.ttl + timedelta(seconds=5):
            raise unknown
        return expires


def nonce_id(nonce: bytes) -> bytes:
    """What a claim records: a digest, so the store never holds a usable nonce."""
    return hashlib.sha256(nonce).digest()[:16]
