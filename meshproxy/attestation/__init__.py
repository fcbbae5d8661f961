"""Attestation: the SGX DCAP quote, quote providers, the one verifier, package policy,
Intel collateral (TCB levels), TDX quotes, RA-TLS certificates, library-OS templates, and
enclave descriptions with their simulated measurement and signature.

Hardware and simulation share every parser and check; only the trust anchor differs
(Intel's SGX Root CA, or a per-machine simulation root), and simulation is accepted only
where a caller passes the simulation anchor and ``allow_simulation=True``.

Names are loaded on first use (PEP 562): the attestation agent of ``meshproxy run`` needs
the quote, the simulated platform, the measurement and the verifier, not the collateral,
TDX, policy or template modules, and each module loaded is startup time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshproxy._lazy import lazy_getattr

if TYPE_CHECKING:
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

_HOME: dict[str, tuple[str, str]] = {
    "Collateral": ("_collateral", "Collateral"),
    "CoordinatorPolicy": ("_coordinator_policy", "CoordinatorPolicy"),
    "EnclaveDescription": ("_enclave", "EnclaveDescription"),
    "EnclaveIdentity": ("_quote", "EnclaveIdentity"),
    "EvidenceCache": ("_verify", "EvidenceCache"),
    "GramineProvider": ("_providers", "GramineProvider"),
    "INTEL_QE_VENDOR_ID": ("_verify", "INTEL_QE_VENDOR_ID"),
    "Ioctl": ("_providers", "Ioctl"),
    "OcclumProvider": ("_providers", "OcclumProvider"),
    "PackagePolicy": ("_policy", "PackagePolicy"),
    "PckExtension": ("_tcb", "PckExtension"),
    "Quote": ("_quote", "Quote"),
    "QuoteProvider": ("_platform", "QuoteProvider"),
    "RATLS_EVIDENCE_OID": ("_ratls", "RATLS_EVIDENCE_OID"),
    "RatlsEvidence": ("_ratls", "RatlsEvidence"),
    "ReportBody": ("_quote", "ReportBody"),
    "Runtime": ("_templates", "Runtime"),
    "SEAL_KEY_NAME": ("_templates", "SEAL_KEY_NAME"),
    "SIM_VENDOR_ID": ("_platform", "SIM_VENDOR_ID"),
    "SignedEnclave": ("_enclave", "SignedEnclave"),
    "SimulationPlatform": ("_platform", "SimulationPlatform"),
    "SimulationProvider": ("_platform", "SimulationProvider"),
    "TcbEvaluation": ("_tcb", "TcbEvaluation"),
    "TdReport": ("_tdx", "TdReport"),
    "TdxQuote": ("_tdx", "TdxQuote"),
    "TrustAnchor": ("_verify", "TrustAnchor"),
    "VerifiedQuote": ("_verify", "VerifiedQuote"),
    "VerifiedTdxQuote": ("_tdx", "VerifiedTdxQuote"),
    "check_coordinator": ("_coordinator_policy", "check_coordinator"),
    "check_measurement": ("_enclave", "check_measurement"),
    "check_package": ("_policy", "check_package"),
    "default_platform_dir": ("_platform", "default_platform_dir"),
    "describe_coordinator_policy": ("_coordinator_policy", "describe"),
    "gramine_manifest": ("_templates", "gramine_manifest"),
    "intel_anchor": ("_verify", "intel_anchor"),
    "load_coordinator_policy": ("_coordinator_policy", "load_coordinator_policy"),
    "load_description": ("_enclave", "load_description"),
    "load_signed": ("_enclave", "load_signed"),
    "measure": ("_enclave", "measure"),
    "occlum_bom": ("_templates", "occlum_bom"),
    "occlum_config": ("_templates", "occlum_config"),
    "parse_collateral": ("_collateral", "parse_collateral"),
    "parse_coordinator_policy": ("_coordinator_policy", "parse_coordinator_policy"),
    "parse_quote": ("_quote", "parse_quote"),
    "parse_ratls_extension": ("_ratls", "parse_ratls_extension"),
    "parse_tdx_quote": ("_tdx", "parse_tdx_quote"),
    "pck_extension": ("_tcb", "pck_extension"),
    "provider_for": ("_providers", "provider_for"),
    "ratls_claims": ("_ratls", "ratls_claims"),
    "ratls_claims_for_spki": ("_ratls", "ratls_claims_for_spki"),
    "ratls_extension": ("_ratls", "ratls_extension"),
    "ratls_report_data": ("_ratls", "ratls_report_data"),
    "sign_description": ("_enclave", "sign_description"),
    "signer_id_of": ("_enclave", "signer_id_of"),
    "simulation_anchor": ("_verify", "simulation_anchor"),
    "verify_quote": ("_verify", "verify_quote"),
    "verify_ratls_certificate": ("_ratls", "verify_ratls_certificate"),
    "verify_tdx_quote": ("_tdx", "verify_tdx_quote"),
    "write_signed": ("_enclave", "write_signed"),
}


__getattr__ = lazy_getattr(__name__, _HOME)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
