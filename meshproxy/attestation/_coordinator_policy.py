"""Which coordinator a client trusts: the policy file of ``manifest verify --policy``.

The format is MarbleRun's ``coordinator-era.json`` (its ``VerifyOptions``), in YAML or
JSON, keys matched case-insensitively::

    UniqueID: <64 hex>           # the exact enclave (MRENCLAVE), or
    SignerID: <64 hex>           # who signed it (MRSIGNER), with
    ProductID: 1                 #   its product, and
    SecurityVersion: 3           #   the minimum security version (ISVSVN)
    Debug: false                 # whether a debug enclave is acceptable (default false)
    AcceptedTCBStatuses: [UpToDate, SWHardeningNeeded]   # the default
    AcceptedAdvisories: []       # with a *SWHardeningNeeded status: all must be listed

A policy pins UniqueID, or SignerID with ProductID and SecurityVersion (or both). Every
refusal names the field that failed. A simulated coordinator has no TCB status (the
client accepted simulation explicitly); a hardware quote verified without collateral has
the status ``NotEvaluated``, which is accepted only if listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshproxy.attestation._policy import identity_mismatch, refused_advisories
from meshproxy.attestation._tcb import STATUSES
from meshproxy.attestation._verify import VerifiedQuote
from meshproxy.config import Node, load_file
from meshproxy.errors import PolicyError

_KEYS = (
    "UniqueID",
    "SignerID",
    "ProductID",
    "SecurityVersion",
    "Debug",
    "AcceptedTCBStatuses",
    "AcceptedAdvisories",
)
_EXTRA_STATUSES = ("NotEvaluated",)  # a hardware quote without collateral


@dataclass(frozen=True)
class CoordinatorPolicy:
    unique_id: bytes | None
    signer_id: bytes | None
    product_id: int | None
    security_version: int | None  # the minimum
    debug: bool  # a debug enclave is acceptable
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate", "SWHardeningNeeded")
    accepted_advisories: tuple[str, ...] = ()


def load_coordinator_policy(path: Path) -> CoordinatorPolicy:
    """Read and check a policy file; a bad one is a ``ConfigError`` naming file and key."""
    return parse_coordinator_policy(load_file(path))


def parse_coordinator_policy(root: Node) -> CoordinatorPolicy:
    m = root.mapping(_KEYS, case_insensitive=True)

    def given(key: str) -> Node | None:
        node = m.get(key)
        return node if node is not None and node.value is not None else None

    def measurement(key: str) -> bytes | None:
        node = given(key)
        if node is None:
            return None
        text = node.str()
        try:
            value = bytes.fromhex(text)
        except ValueError:
            value = b""
        if len(value) != 32:
            node.fail(f"{key} must be 64 hex digits (32 bytes), got {text!r}")
        return value

    def uint16(key: str) -> int | None:
        node = given(key)
        return None if node is None else node.int(minimum=0, maximum=0xFFFF)

    unique_id, signer_id = measurement("UniqueID"), measurement("SignerID")
    product_id, svn = uint16("ProductID"), uint16("SecurityVersion")
    if unique_id is None:
        missing = [
            k
            for k, v in (
                ("SignerID", signer_id),
                ("ProductID", product_id),
                ("SecurityVersion", svn),
            )
            if v is None
        ]
        if missing:
            root.fail(
                "the policy pins no coordinator: give UniqueID, or SignerID with ProductID and "
                f"SecurityVersion (missing: {', '.join(missing)})"
            )
    debug_node = given("Debug")
    statuses_node = given("AcceptedTCBStatuses")
    statuses: tuple[str, ...] = ("UpToDate", "SWHardeningNeeded")
    if statuses_node is not None:
        items = statuses_node.list()
        if not items:
            statuses_node.fail(
                "an empty list accepts no hardware coordinator; omit it for the default"
            )
        statuses = tuple(dict.fromkeys(n.choice((*STATUSES, *_EXTRA_STATUSES)) for n in items))
    advisories_node = given("AcceptedAdvisories")
    advisories = advisories_node.str_list() if advisories_node is not None else ()
    return CoordinatorPolicy(
        unique_id=unique_id,
        signer_id=signer_id,
        product_id=product_id,
        security_version=svn,
        debug=debug_node.bool() if debug_node is not None else False,
        accepted_tcb_statuses=statuses,
        accepted_advisories=tuple(advisories),
    )


_MISMATCH = {
    "UniqueID": "UniqueID: the coordinator is {actual}, the policy requires {required}",
    "SignerID": "SignerID: the coordinator is signed by {actual}, the policy requires {required}",
    "ProductID": "ProductID: the coordinator is product {actual}, the policy requires {required}",
    "SecurityVersion": "SecurityVersion: the coordinator has {actual}, below the policy's minimum "
    "{required}",
}


def check_coordinator(verified: VerifiedQuote, policy: CoordinatorPolicy) -> None:
    """Refuse (``PolicyError`` naming the field) a coordinator the policy does not pin."""
    ident = verified.identity
    mismatch = identity_mismatch(ident, policy)
    if mismatch is not None:
        raise PolicyError(_MISMATCH[mismatch.field].format_map(mismatch._asdict()))
    if ident.debug and not policy.debug:
        raise PolicyError(
            "Debug: the coordinator is a debug enclave (its memory can be read by the host), "
            "and the policy does not allow debug"
        )
    if verified.simulated:
        return  # no TCB: simulation was accepted explicitly (--accept-simulation)
    if verified.tcb_status not in policy.accepted_tcb_statuses:
        hint = (
            " (no collateral was given: pass --collateral FILE to rate the platform)"
            if verified.tcb_status == "NotEvaluated"
            else ""
        )
        raise PolicyError(
            f"AcceptedTCBStatuses: the coordinator's TCB status {verified.tcb_status} is not "
            f"accepted (accepted: {', '.join(policy.accepted_tcb_statuses)}){hint}"
        )
    refused = refused_advisories(verified, policy.accepted_advisories)
    if refused:
        raise PolicyError(
            f"AcceptedAdvisories: the coordinator's platform has advisories not accepted: "
            f"{', '.join(refused)} (accepted: {', '.join(policy.accepted_advisories)})"
        )


def describe(policy: CoordinatorPolicy) -> str:
    """One line saying what the policy pins (for the CLI's success message)."""
    parts = []
    if policy.unique_id is not None:
        parts.append(f"UniqueID {policy.unique_id.hex()}")
    if policy.signer_id is not None:
        parts.append(f"SignerID {policy.signer_id.hex()}")
    if policy.product_id is not None:
        parts.append(f"ProductID {policy.product_id}")
    if policy.security_version is not None:
        parts.append(f"SecurityVersion >= {policy.security_version}")
    parts.append("debug allowed" if policy.debug else "no debug")
    return ", ".join(parts)
