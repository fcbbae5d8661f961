"""Does a verified quote satisfy a manifest package? MarbleRun's rules, stated precisely.

A package pins the enclave either by UniqueID, or by SignerID with ProductID and a
minimum SecurityVersion (MarbleRun refuses a package that pins neither, and so do we).
Debug must equal the enclave's debug flag. A hardware quote's TCB status must be one the
package accepts; a simulated quote is refused unless simulation is explicitly allowed, and
then has no TCB status to check. Advisories follow MarbleRun: they matter only when the
status is SWHardeningNeeded or ConfigurationAndSWHardeningNeeded (the statuses whose fix is
software hardening against the advisories listed); then, if the package lists accepted
advisories, every advisory of the quote must be among them. An empty list accepts all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from meshproxy.attestation._quote import EnclaveIdentity
from meshproxy.attestation._verify import VerifiedQuote
from meshproxy.errors import PolicyError


@dataclass(frozen=True)
class PackagePolicy:
    unique_id: bytes | None
    signer_id: bytes | None
    product_id: int | None
    security_version: int | None
    debug: bool
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate", "SWHardeningNeeded")
    accepted_advisories: tuple[str, ...] = ()


HARDENING_STATUSES = ("SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded")


class Mismatch(NamedTuple):
    field: str  # UniqueID, SignerID, ProductID or SecurityVersion
    actual: str  # hex for measurements
    required: str


class _Pins(Protocol):
    @property
    def unique_id(self) -> bytes | None: ...
    @property
    def signer_id(self) -> bytes | None: ...
    @property
    def product_id(self) -> int | None: ...
    @property
    def security_version(self) -> int | None: ...


def identity_mismatch(ident: EnclaveIdentity, pins: _Pins) -> Mismatch | None:
    """The first pinned field ``ident`` does not satisfy, in MarbleRun's order; every pin
    must equal, except SecurityVersion, a minimum. Shared by packages and coordinator
    policies (``_coordinator_policy``), which word the refusal each their own way."""
    if pins.unique_id is not None and ident.unique_id != pins.unique_id:
        return Mismatch("UniqueID", ident.unique_id.hex(), pins.unique_id.hex())
    if pins.signer_id is not None and ident.signer_id != pins.signer_id:
        return Mismatch("SignerID", ident.signer_id.hex(), pins.signer_id.hex())
    if pins.product_id is not None and ident.product_id != pins.product_id:
        return Mismatch("ProductID", str(ident.product_id), str(pins.product_id))
    if pins.security_version is not None and ident.security_version < pins.security_version:
        return Mismatch("SecurityVersion", str(ident.security_version), str(pins.security_version))
    return None


def refused_advisories(verified: VerifiedQuote, accepted: tuple[str, ...]) -> list[str]:
    """The quote's advisories outside ``accepted``, when they matter: a hardware quote with
    a *SWHardeningNeeded status and a non-empty ``accepted`` list (MarbleRun's rule)."""
    if verified.simulated or verified.tcb_status not in HARDENING_STATUSES or not accepted:
        return []
    return [a for a in verified.advisories if a not in accepted]


_PACKAGE_MISMATCH = {
    "UniqueID": "UniqueID {actual} does not match the package's {required}",
    "SignerID": "SignerID {actual} does not match the package's {required}",
    "ProductID": "ProductID {actual}, package requires {required}",
    "SecurityVersion": "SecurityVersion {actual} is below the package's minimum {required}",
}


def check_package(
    verified: VerifiedQuote, policy: PackagePolicy, *, allow_simulation: bool
) -> None:
    ident = verified.identity
    if verified.simulated and not allow_simulation:
        raise PolicyError("simulated quote, but simulation is not accepted")
    if policy.unique_id is None and (
        policy.signer_id is None or policy.product_id is None or policy.security_version is None
    ):
        raise PolicyError(
            "the package pins neither UniqueID nor SignerID with ProductID and SecurityVersion"
        )
    mismatch = identity_mismatch(ident, policy)
    if mismatch is not None:
        raise PolicyError(_PACKAGE_MISMATCH[mismatch.field].format_map(mismatch._asdict()))
    if ident.debug != policy.debug:
        kind = "debug enclave" if ident.debug else "non-debug enclave"
        raise PolicyError(f"{kind}, but the package requires Debug {str(policy.debug).lower()}")
    if not verified.simulated and verified.tcb_status not in policy.accepted_tcb_statuses:
        accepted = ", ".join(policy.accepted_tcb_statuses) or "none"
        raise PolicyError(
            f"TCB status {verified.tcb_status} is not accepted by the package "
            f"(accepted: {accepted})"
        )
    refused = refused_advisories(verified, policy.accepted_advisories)
    if refused:
        raise PolicyError(
            f"TCB status {verified.tcb_status} with advisories not accepted by the "
            f"package: {', '.join(refused)} (accepted: "
            f"{', '.join(policy.accepted_advisories)})"
        )
