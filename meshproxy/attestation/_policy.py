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


_HARDENING_STATUSES = ("SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded")


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
    if policy.unique_id is not None and ident.unique_id != policy.unique_id:
        raise PolicyError(
            f"UniqueID {ident.unique_id.hex()} does not match the package's "
            f"{policy.unique_id.hex()}"
        )
    if policy.signer_id is not None and ident.signer_id != policy.signer_id:
        raise PolicyError(
            f"SignerID {ident.signer_id.hex()} does not match the package's "
            f"{policy.signer_id.hex()}"
        )
    if policy.product_id is not None and ident.product_id != policy.product_id:
        raise PolicyError(f"ProductID {ident.product_id}, package requires {policy.product_id}")
    if policy.security_version is not None and ident.security_version < policy.security_version:
        raise PolicyError(
            f"SecurityVersion {ident.security_version} is below the package's minimum "
            f"{policy.security_version}"
        )
    if ident.debug != policy.debug:
        kind = "debug enclave" if ident.debug else "non-debug enclave"
        raise PolicyError(f"{kind}, but the package requires Debug {str(policy.debug).lower()}")
    if not verified.simulated and verified.tcb_status not in policy.accepted_tcb_statuses:
        accepted = ", ".join(policy.accepted_tcb_statuses) or "none"
        raise PolicyError(
            f"TCB status {verified.tcb_status} is not accepted by the package "
            f"(accepted: {accepted})"
        )
    if (
        not verified.simulated
        and verified.tcb_status in _HARDENING_STATUSES
        and policy.accepted_advisories
    ):
        refused = [a for a in verified.advisories if a not in policy.accepted_advisories]
        if refused:
            raise PolicyError(
                f"TCB status {verified.tcb_status} with advisories not accepted by the "
                f"package: {', '.join(refused)} (accepted: "
                f"{', '.join(policy.accepted_advisories)})"
            )
