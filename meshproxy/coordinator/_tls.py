"""TLS server contexts for the coordinator's listeners, built from keys held in memory.

Both listeners present the root certificate and key: what clients pin is exactly what they
are shown. The client API also asks for a client certificate (optional: the public
endpoints need none) and trusts exactly the manifest users' certificates, and the owner's
before the first manifest; the handshake proves the user holds the key, ``_auth`` then
matches the certificate to a user.

The root (after a recovery, or when a replica adopts the shared state) and the users (after
a manifest update) change while the listeners run. A listener keeps one context whose SNI
callback, which OpenSSL calls for every ClientHello, with or without a server name, swaps
in the context built for the current root and users.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Sequence

from meshproxy.pki import Authority, cert_to_pem, key_to_pem
from meshproxy.tls import TLSIdentity
from meshproxy.tls import server_context as tls_server_context


def server_context(identity: Authority) -> ssl.SSLContext:
    """The root certificate and key: what clients pin is exactly what they are shown."""
    pem = cert_to_pem(identity.cert)
    return tls_server_context(
        TLSIdentity(chain_pem=pem, key_pem=key_to_pem(identity.key), trust_pem=pem),
        client_auth=False,
    )


def _client_api_context(identity: Authority, trusted_pem: Sequence[bytes]) -> ssl.SSLContext:
    ctx = server_context(identity)
    # Users' certificates are the trust anchors themselves (self-signed, or issued by a CA
    # the coordinator does not know): a partial chain ending at one of them verifies.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if trusted_pem:
        ctx.load_verify_locations(cadata=b"".join(trusted_pem).decode("ascii"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class SwitchingContext:
    """One listener's TLS context, following the coordinator's current root and users."""

    def __init__(
        self,
        identity: Callable[[], Authority],
        trusted: Callable[[], Sequence[bytes]] | None = None,
    ) -> None:
        self._identity = identity
        self._trusted = trusted
        self._cache: dict[bytes, ssl.SSLContext] = {}
        self._last: tuple[Authority, tuple[bytes, ...], ssl.SSLContext] | None = None
        self.base = self._build()
        self.base.sni_callback = self._switch

    def _key(self) -> tuple[bytes, Authority, list[bytes]]:
        identity = self._identity()
        trusted = list(self._trusted()) if self._trusted is not None else []
        h = hashlib.sha256(cert_to_pem(identity.cert))
        for pem in trusted:
            h.update(hashlib.sha256(pem).digest())
        return h.digest(), identity, trusted

    def _build(self) -> ssl.SSLContext:
        # Every handshake asks: the same root and users as last time is the same context.
        identity = self._identity()
        trusted = tuple(self._trusted()) if self._trusted is not None else ()
        last = self._last
        if last is not None and last[0] is identity and last[1] == trusted:
            return last[2]
        ctx = self._build_for()
        self._last = (identity, trusted, ctx)
        return ctx

    def _build_for(self) -> ssl.SSLContext:
        key, identity, trusted = self._key()
        ctx = self._cache.get(key)
        if ctx is None:
            if self._trusted is None:
                ctx = server_context(identity)
            else:
                ctx = _client_api_context(identity, trusted)
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = ctx
        return ctx

    def current(self) -> ssl.SSLContext:
        return self._build()

    def _switch(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        current = self._build()
        if current is not ctx:
            conn.context = current
