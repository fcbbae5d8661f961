"""PKI: the coordinator's CA, marble CSRs and leaves, identities, verification."""

from meshproxy.pki._ca import (
    Authority,
    create_intermediate,
    create_root,
    csr_dns_names,
    issue_leaf,
    load_csr,
    make_csr,
    verify_issued_by,
)
from meshproxy.pki._identity import (
    SIMULATION_MARK,
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
    "make_csr",
    "public_der",
    "spiffe_id",
    "verify_issued_by",
]
