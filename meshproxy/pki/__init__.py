"""PKI: the coordinator's CA, marble CSRs and leaves, identities, verification.

Names are loaded on first use (PEP 562): the identity checks and names do not need
``cryptography`` until a certificate is parsed, and the long-lived proxy should not carry
its 10 MB before it has to.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshproxy.pki._ca import (
        Authority,
        create_intermediate,
        create_root,
        csr_dns_names,
        issue_leaf,
        load_csr,
        load_csr_key,
        make_csr,
        verify_issued_by,
    )
    from meshproxy.pki._identity import (
        SIMULATION_MARK,
        CertNames,
        PeerIdentity,
        check_marble_type,
        check_peer,
        check_trust_domain,
        identity_of,
        spiffe_id,
    )
    from meshproxy.pki._keys import (
        cert_from_pem,
        cert_to_pem,
        certs_from_pem,
        certs_to_pem,
        generate_key,
        key_from_pem,
        key_to_pem,
        public_der,
    )

__all__ = [
    "SIMULATION_MARK",
    "Authority",
    "CertNames",
    "PeerIdentity",
    "cert_from_pem",
    "cert_to_pem",
    "certs_from_pem",
    "certs_to_pem",
    "check_marble_type",
    "check_peer",
    "check_trust_domain",
    "create_intermediate",
    "create_root",
    "csr_dns_names",
    "generate_key",
    "identity_of",
    "issue_leaf",
    "key_from_pem",
    "key_to_pem",
    "load_csr",
    "load_csr_key",
    "make_csr",
    "public_der",
    "spiffe_id",
    "verify_issued_by",
]

_HOME = {
    "Authority": "_ca",
    "create_intermediate": "_ca",
    "create_root": "_ca",
    "csr_dns_names": "_ca",
    "issue_leaf": "_ca",
    "load_csr": "_ca",
    "load_csr_key": "_ca",
    "make_csr": "_ca",
    "verify_issued_by": "_ca",
    "SIMULATION_MARK": "_identity",
    "CertNames": "_identity",
    "PeerIdentity": "_identity",
    "check_marble_type": "_identity",
    "check_peer": "_identity",
    "check_trust_domain": "_identity",
    "identity_of": "_identity",
    "spiffe_id": "_identity",
    "cert_from_pem": "_keys",
    "cert_to_pem": "_keys",
    "certs_from_pem": "_keys",
    "certs_to_pem": "_keys",
    "generate_key": "_keys",
    "key_from_pem": "_keys",
    "key_to_pem": "_keys",
    "public_der": "_keys",
}


def __getattr__(name: str) -> Any:
    try:
        module = _HOME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
