"""Attestation: the SGX DCAP quote, quote providers, the one verifier, package policy,
and enclave descriptions with their simulated measurement and signature.

Hardware and simulation share every parser and check; only the trust anchor differs
(Intel's SGX Root CA, or a per-machine simulation root), and simulation is accepted only
where a caller passes the simulation anchor and ``allow_simulation=True``.
"""

from meshproxy.attestation._enclave import (
    EnclaveDescription,
    SignedEnclave,
    check_measurement,
    load_description,
    load_signed,
    measure,
    sign_description,
    signer_id_of,
    write_signed,
)
from meshproxy.attestation._platform import (
    SIM_VENDOR_ID,
    QuoteProvider,
    SimulationPlatform,
    SimulationProvider,
    default_platform_dir,
)
from meshproxy.attestation._policy import PackagePolicy, check_package
from meshproxy.attestation._quote import EnclaveIdentity, Quote, ReportBody, parse_quote
from meshproxy.attestation._verify import (
    INTEL_QE_VENDOR_ID,
    TrustAnchor,
    VerifiedQuote,
    intel_anchor,
    simulation_anchor,
    verify_quote,
)

__all__ = [
    "INTEL_QE_VENDOR_ID",
    "SIM_VENDOR_ID",
    "EnclaveDescription",
    "EnclaveIdentity",
    "PackagePolicy",
    "Quote",
    "QuoteProvider",
    "ReportBody",
    "SignedEnclave",
    "SimulationPlatform",
    "SimulationProvider",
    "TrustAnchor",
    "VerifiedQuote",
    "check_measurement",
    "check_package",
    "default_platform_dir",
    "intel_anchor",
    "load_description",
    "load_signed",
    "measure",
    "parse_quote",
    "sign_description",
    "signer_id_of",
    "simulation_anchor",
    "verify_quote",
    "write_signed",
]
