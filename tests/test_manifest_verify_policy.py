"""The coordinator policy of ``manifest verify --policy``: its file format, and every
refusal naming its field, checked on quotes verified by the real verifier (simulated
ones, and Intel vectors with their collateral)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.attestation import (
    CoordinatorPolicy,
    EnclaveIdentity,
    SimulationPlatform,
    VerifiedQuote,
    check_coordinator,
    intel_anchor,
    load_coordinator_policy,
    parse_collateral,
    simulation_anchor,
    verify_quote,
)
from meshproxy.errors import ConfigError, PolicyError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
NOW = datetime(2026, 11, 1, tzinfo=UTC)
COLLATERAL_AT = datetime.fromtimestamp(1750400000, UTC)  # inside the collateral's windows
SIGNER = hashlib.sha256(b"coordinator signer").digest()
UNIQUE = hashlib.sha256(b"coordinator build").digest()


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return path


# -- the file -------------------------------------------------------------------------------
def test_yaml_and_json_policies_load(tmp_path: Path) -> None:
    doc = {"SignerID": SIGNER.hex(), "ProductID": 3, "SecurityVersion": 2}
    policy = load_coordinator_policy(_write(tmp_path, doc))
    assert policy == CoordinatorPolicy(
        unique_id=None, signer_id=SIGNER, product_id=3, security_version=2, debug=False
    )
    # MarbleRun's coordinator-era.json spelling (keys match case-insensitively).
    era = {"UniqueId": UNIQUE.hex(), "debug": True, "AcceptedTCBStatuses": ["UpToDate"]}
    policy = load_coordinator_policy(_write(tmp_path, era, "era.json"))
    assert policy.unique_id == UNIQUE
    assert policy.debug is True
    assert policy.accepted_tcb_statuses == ("UpToDate",)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"SignerID": SIGNER.hex(), "ProductID": 1}, "pins no coordinator: give UniqueID, or "),
        ({"ProductID": 1, "SecurityVersion": 1}, "(missing: SignerID)"),
        ({"UniqueID": "abc"}, "UniqueID: UniqueID must be 64 hex digits"),
        ({"UniqueID": UNIQUE.hex(), "SecurityVersion": -1}, "SecurityVersion:"),
        ({"UniqueID": UNIQUE.hex(), "AcceptedTCBStatuses": ["Fine"]}, "AcceptedTCBStatuses[0]"),
        ({"UniqueID": UNIQUE.hex(), "AcceptedTCBStatuses": []}, "an empty list accepts no"),
        ({"UniqueID": UNIQUE.hex(), "Debugg": True}, "unknown key 'Debugg'"),
    ],
)
def test_bad_policies_name_the_file_and_key(
    tmp_path: Path, doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_coordinator_policy(_write(tmp_path, doc))
    assert str(exc.value).startswith("policy.yaml")
    assert message in str(exc.value)


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_coordinator_policy(tmp_path / "nope.yaml")


# -- the checks on simulated quotes -----------------------------------------------------------
@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulationPlatform:
    return SimulationPlatform.load_or_create(tmp_path_factory.mktemp("p") / "plat", now=NOW)


def _simulated(platform: SimulationPlatform, **change: Any) -> VerifiedQuote:
    fields: dict[str, Any] = {
        "unique_id": UNIQUE,
        "signer_id": SIGNER,
        "product_id": 1,
        "security_version": 2,
        "debug": False,
    }
    fields.update(change)
    quote = platform.quote(bytes(64), EnclaveIdentity(**fields))
    return verify_quote(quote, [simulation_anchor(platform)], now=NOW)


def _policy(**change: Any) -> CoordinatorPolicy:
    fields: dict[str, Any] = {
        "unique_id": None,
        "signer_id": SIGNER,
        "product_id": 1,
        "security_version": 2,
        "debug": False,
    }
    fields.update(change)
    return CoordinatorPolicy(**fields)


def test_a_matching_coordinator_passes(platform: SimulationPlatform) -> None:
    check_coordinator(_simulated(platform), _policy())
    check_coordinator(_simulated(platform, security_version=5), _policy())  # a minimum
    check_coordinator(_simulated(platform), _policy(unique_id=UNIQUE, signer_id=None))
    # A simulated coordinator has no TCB status; the client accepted simulation already.
    check_coordinator(_simulated(platform), _policy(accepted_tcb_statuses=("UpToDate",)))


@pytest.mark.parametrize(
    ("quote", "policy", "field"),
    [
        ({}, {"unique_id": bytes(32)}, "UniqueID: the coordinator is "),
        ({"signer_id": bytes(32)}, {}, "SignerID: the coordinator is signed by "),
        ({"product_id": 2}, {}, "ProductID: the coordinator is product 2, the policy requires 1"),
        ({"security_version": 1}, {}, "SecurityVersion: the coordinator has 1, below the"),
        ({"debug": True}, {}, "Debug: the coordinator is a debug enclave"),
    ],
)
def test_each_refusal_names_its_field(
    platform: SimulationPlatform, quote: dict[str, Any], policy: dict[str, Any], field: str
) -> None:
    with pytest.raises(PolicyError) as exc:
        check_coordinator(_simulated(platform, **quote), _policy(**policy))
    assert str(exc.value).startswith(field)


def test_debug_passes_when_allowed(platform: SimulationPlatform) -> None:
    check_coordinator(_simulated(platform, debug=True), _policy(debug=True))


# -- the checks on Intel's vectors --------------------------------------------------------------
def _intel(name: str, *, collateral: bool = False) -> VerifiedQuote:
    quote = (VECTORS / name).read_bytes()
    if not collateral:
        return verify_quote(quote, [intel_anchor()], now=NOW)
    c = parse_collateral((VECTORS / "dcapqvl_sgx_collateral.json").read_bytes())
    return verify_quote(quote, [intel_anchor()], now=COLLATERAL_AT, collateral=c)


def _pin(verified: VerifiedQuote, **change: Any) -> CoordinatorPolicy:
    ident = verified.identity
    return _policy(
        signer_id=ident.signer_id,
        product_id=ident.product_id,
        security_version=ident.security_version,
        **change,
    )


def test_a_tcb_status_not_accepted_is_refused() -> None:
    verified = _intel("dcapqvl_sgx_quote.bin", collateral=True)
    assert verified.tcb_status == "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(PolicyError) as exc:
        check_coordinator(verified, _pin(verified))
    assert str(exc.value).startswith(
        "AcceptedTCBStatuses: the coordinator's TCB status ConfigurationAndSWHardeningNeeded"
    )
    statuses = ("ConfigurationAndSWHardeningNeeded",)
    check_coordinator(verified, _pin(verified, accepted_tcb_statuses=statuses))


def test_an_advisory_not_accepted_is_refused() -> None:
    verified = _intel("dcapqvl_sgx_quote.bin", collateral=True)
    policy = _pin(
        verified,
        accepted_tcb_statuses=("ConfigurationAndSWHardeningNeeded",),
        accepted_advisories=("INTEL-SA-00289",),
    )
    with pytest.raises(PolicyError) as exc:
        check_coordinator(verified, policy)
    assert str(exc.value).startswith("AcceptedAdvisories:")
    assert "INTEL-SA-00615" in str(exc.value)


def test_without_collateral_the_status_is_not_evaluated_and_says_so() -> None:
    verified = _intel("dcapqvl_sgx_quote.bin")
    with pytest.raises(PolicyError, match=r"NotEvaluated .* pass --collateral FILE"):
        check_coordinator(verified, _pin(verified))
    check_coordinator(verified, _pin(verified, accepted_tcb_statuses=("NotEvaluated",)))


def test_a_hardware_debug_enclave_is_refused_unless_allowed() -> None:
    verified = _intel("oe_sgx_quote.bin")  # a DEBUG enclave
    assert verified.identity.debug
    policy = _pin(verified, accepted_tcb_statuses=("NotEvaluated",))
    with pytest.raises(PolicyError, match=r"^Debug: "):
        check_coordinator(verified, policy)
    check_coordinator(verified, _pin(verified, accepted_tcb_statuses=("NotEvaluated",), debug=True))


# -- fuzzing: any document is a policy or a ConfigError ------------------------------------------
_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=70)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_KEYS = st.sampled_from(
    ["UniqueID", "SignerID", "ProductID", "SecurityVersion", "Debug", "AcceptedTCBStatuses",
     "AcceptedAdvisories", "signerid", "Other"]
)  # fmt: skip


def _outcome(doc: Any) -> CoordinatorPolicy | str:
    from meshproxy.attestation import parse_coordinator_policy
    from meshproxy.config import Node

    try:
        return parse_coordinator_policy(Node(doc, "policy.yaml", ""))
    except ConfigError as exc:  # anything else fails the test
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_KEYS, _VALUES | st.just(SIGNER.hex()) | st.just(UNIQUE.hex()), max_size=6)
    | _VALUES
)
def test_any_document_is_a_policy_or_a_config_error(doc: Any) -> None:
    outcome = _outcome(doc)
    if isinstance(outcome, str):
        assert outcome.startswith("policy.yaml")
    else:
        assert outcome.unique_id is not None or outcome.signer_id is not None
