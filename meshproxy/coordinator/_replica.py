"""Handing the state key (the KEK of ``_vault``) to a new replica, attested both ways.

Protocol (``POST /api/v2/replica/key`` on a peer's mesh API):

1. The new replica makes an ephemeral X25519 key and a quote whose report data is
   SHA-256("meshproxy replica key request v1" || its public key); it sends both.
2. The peer verifies the quote and requires the same coordinator identity as its own
   (SignerID, ProductID and Debug equal, SecurityVersion at least its own: MarbleRun's
   product-key rule; a simulated quote only if the peer itself is simulated). It makes its
   own ephemeral key, encrypts the KEK with AES-256-GCM under HKDF(X25519 shared secret),
   and quotes SHA-256("meshproxy replica key response v1" || both public keys).
3. The new replica verifies that quote with the same rule before it uses the key.

The TLS connection is not trusted for anything (the new replica knows no root yet): the
key is bound to the requester's ephemeral key, and the answer to the peer's quote, so a
man in the middle learns nothing and cannot substitute a key of its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshproxy._redact import Secret
from meshproxy.attestation import (
    EnclaveIdentity,
    QuoteProvider,
    TrustAnchor,
    VerifiedQuote,
    verify_quote,
)
from meshproxy.coordinator import _wire as wire
from meshproxy.errors import AttestationError, MeshError, PolicyError

log = logging.getLogger("meshproxy.coordinator.replica")
_REQUEST = b"meshproxy replica key request v1"
_RESPONSE = b"meshproxy replica key response v1"


def check_peer(verified: VerifiedQuote, own: EnclaveIdentity, simulation: bool) -> None:
    """A peer replica must run the same coordinator (product-key rule)."""
    ident = verified.identity
    if verified.simulated and not simulation:
        raise PolicyError("a simulated replica cannot join a coordinator on hardware")
    if ident.signer_id != own.signer_id or ident.product_id != own.product_id:
        raise PolicyError("the peer is not this coordinator (SignerID or ProductID differ)")
    if ident.debug != own.debug:
        raise PolicyError("the peer's debug flag differs from this coordinator's")
    if ident.security_version < own.security_version:
        raise PolicyError(
            f"the peer runs SecurityVersion {ident.security_version}, below this "
            f"coordinator's {own.security_version}"
        )


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _session_key(shared: bytes, client: bytes, server: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_RESPONSE + client + server).derive(shared)


def _verify(
    quote: bytes, anchors: Sequence[TrustAnchor], expected: bytes, now: datetime, who: str
) -> VerifiedQuote:
    try:
        verified = verify_quote(quote, anchors, now=now)
    except AttestationError as exc:
        raise PolicyError(f"{who}'s quote does not verify ({exc.check}): {exc}") from None
    if verified.report_data[:32] != expected:
        raise PolicyError(f"{who}'s quote does not bind this key exchange")
    return verified


class KeyServer:
    """The peer side: ``api.key_server``; called on the core's worker thread."""

    def __init__(
        self,
        export_key: Callable[[], Secret],
        *,
        provider: QuoteProvider,
        anchors: Sequence[TrustAnchor],
        identity: EnclaveIdentity,
        simulation: bool,
        can_share: Callable[[], None],
    ) -> None:
        self._export = export_key
        self._provider = provider
        self._anchors = tuple(anchors)
        self._identity = identity
        self._simulation = simulation
        self._can_share = can_share

    def __call__(self, body: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
        self._can_share()
        try:
            client = wire.b64d(body.get("publicKey"), "field 'publicKey'")
            quote = wire.b64d(body.get("quote"), "field 'quote'")
            client_key = X25519PublicKey.from_public_bytes(client)
        except ValueError as exc:
            raise PolicyError(f"malformed key request: {exc}") from None
        now = now or datetime.now(UTC)
        expected = hashlib.sha256(_REQUEST + client).digest()
        verified = _verify(quote, self._anchors, expected, now, "the requesting replica")
        check_peer(verified, self._identity, self._simulation)
        ephemeral = X25519PrivateKey.generate()
        server = _raw(ephemeral.public_key())
        session = _session_key(ephemeral.exchange(client_key), client, server)
        nonce = os.urandom(12)
        wrapped = nonce + AESGCM(session).encrypt(nonce, self._export().reveal(), client + server)
        answer = self._provider.get_quote(hashlib.sha256(_RESPONSE + client + server).digest())
        return {
            "publicKey": wire.b64e(server),
            "quote": wire.b64e(answer),
            "wrappedKey": wire.b64e(wrapped),
        }


def key_request(provider: QuoteProvider) -> tuple[X25519PrivateKey, dict[str, str]]:
    """The new replica's request body, and the ephemeral key that opens the answer."""
    ephemeral = X25519PrivateKey.generate()
    client = _raw(ephemeral.public_key())
    quote = provider.get_quote(hashlib.sha256(_REQUEST + client).digest())
    return ephemeral, {"publicKey": wire.b64e(client), "quote": wire.b64e(quote)}


def open_answer(
    ephemeral: X25519PrivateKey,
    data: Any,
    *,
    anchors: Sequence[TrustAnchor],
    identity: EnclaveIdentity,
    simulation: bool,
    now: datetime,
    who: str,
) -> Secret:
    """The KEK from a peer's answer, after verifying the peer's quote over the exchange."""
    client = _raw(ephemeral.public_key())
    try:
        server = wire.b64d(data["publicKey"], "publicKey")
        answer = wire.b64d(data["quote"], "quote")
        wrapped = wire.b64d(data["wrappedKey"], "wrappedKey")
        server_key = X25519PublicKey.from_public_bytes(server)
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyError(f"{who} sent a malformed key answer: {exc}") from None
    expected = hashlib.sha256(_RESPONSE + client + server).digest()
    verified = _verify(answer, anchors, expected, now, who)
    check_peer(verified, identity, simulation)
    session = _session_key(ephemeral.exchange(server_key), client, server)
    try:
        return Secret(AESGCM(session).decrypt(wrapped[:12], wrapped[12:], client + server))
    except (InvalidTag, ValueError):
        raise PolicyError(f"{who}: the wrapped key does not decrypt") from None


def fetch_key(
    address: str,
    *,
    provider: QuoteProvider,
    anchors: Sequence[TrustAnchor],
    identity: EnclaveIdentity,
    simulation: bool,
    timeout: float = 5.0,
) -> Secret:
    """The new replica's side: ask the peer at ``address`` (its mesh API) for the KEK."""
    from meshproxy.coordinator.client import Connection

    ephemeral, body = key_request(provider)
    data = Connection(address, None, timeout).request("POST", wire.MESH_PATHS["replica_key"], body)
    return open_answer(
        ephemeral,
        data,
        anchors=anchors,
        identity=identity,
        simulation=simulation,
        now=datetime.now(UTC),
        who=f"peer {address}",
    )


def fetch_from_any(
    addresses: Sequence[str],
    **kwargs: Any,
) -> tuple[Secret, str] | None:
    """The KEK from the first peer that gives it, or None; every failure is logged."""
    for address in addresses:
        try:
            return fetch_key(address, **kwargs), address
        except MeshError as exc:
            log.info(
                "peer did not share the state key", extra={"peer": address, "reason": str(exc)}
            )
    return None
