"""Attestation: the SGX DCAP quote, quote providers, the one verifier, package policy,
Intel collateral (TCB levels), TDX quotes, RA-TLS certificates, library-OS templates, and
enclave descriptions with their simulated measurement and signature.

Hardware and simulation share every parser and check; only the trust anchor differs
(Intel's SGX Root CA, or a per-machine simulation root), and simulation is accepted only
where a caller passes the simulation anchor and ``allow_simulation=True``.
"""

from meshproxy.attestation._collateral import Collateral, parse_collateral
from meshproxy.attestation._coordinator_policy import (
    CoordinatorPolicy,
    check_coordinator,
    load_coordinator_policy,
    parse_coordinator_policy,
)
from meshproxy.attestation._coordinator_policy import describe as describe_coordinator_policy
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
from meshproxy.attestation._providers import (
    GramineProvider,
    Ioctl,
    OcclumProvider,
    provider_for,
)
from meshproxy.attestation._quote import EnclaveIdentity, Quote, ReportBody, parse_quote
from meshproxy.attestation._ratls import (
    RATLS_EVIDENCE_OID,
    RatlsEvidence,
    parse_ratls_extension,
    ratls_claims,
    ratls_claims_for_spki,
    ratls_extension,
    ratls_report_data,
    verify_ratls_certificate,
)
from meshproxy.attestation._tcb import PckExtension, TcbEvaluation, pck_extension
from meshproxy.attestation._tdx import (
    TdReport,
    TdxQuote,
    VerifiedTdxQuote,
    parse_tdx_quote,
    verify_tdx_quote,
)
from meshproxy.attestation._templates import (
    SEAL_KEY_NAME,
    Runtime,
    gramine_manifest,
    occlum_bom,
    occlum_config,
)
from meshproxy.attestation._verify import (
    INTEL_QE_VENDOR_ID,
    EvidenceCache,
    TrustAnchor,
    VerifiedQuote,
    intel_anchor,
    simulation_anchor,
    verify_quote,
)

__all__ = [
    "INTEL_QE_VENDOR_ID",
    "RATLS_EVIDENCE_OID",
    "SEAL_KEY_NAME",
    "SIM_VENDOR_ID",
    "Collateral",
    "CoordinatorPolicy",
    "EnclaveDescription",
    "EnclaveIdentity",
    "EvidenceCache",
    "GramineProvider",
    "Ioctl",
    "OcclumProvider",
    "PackagePolicy",
    "PckExtension",
    "Quote",
    "QuoteProvider",
    "RatlsEvidence",
    "ReportBody",
    "Runtime",
    "SignedEnclave",
    "SimulationPlatform",
    "SimulationProvider",
    "TcbEvaluation",
    "TdReport",
    "TdxQuote",
    "TrustAnchor",
    "VerifiedQuote",
    "VerifiedTdxQuote",
    "check_coordinator",
    "check_measurement",
    "check_package",
    "default_platform_dir",
    "describe_coordinator_policy",
    "gramine_manifest",
    "intel_anchor",
    "load_coordinator_policy",
    "load_description",
    "load_signed",
    "measure",
    "occlum_bom",
    "occlum_config",
    "parse_collateral",
    "parse_coordinator_policy",
    "parse_quote",
    "parse_ratls_extension",
    "parse_tdx_quote",
    "pck_extension",
    "provider_for",
    "ratls_claims",
    "ratls_claims_for_spki",
    "ratls_extension",
    "ratls_report_data",
    "sign_description",
    "signer_id_of",
    "simulation_anchor",
    "verify_quote",
    "verify_ratls_certificate",
    "verify_tdx_quote",
    "write_signed",
]
