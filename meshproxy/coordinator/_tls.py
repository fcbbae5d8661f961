"""TLS server contexts for the coordinator's listeners, built from keys held in memory."""

from __future__ import annotations

import ssl

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
