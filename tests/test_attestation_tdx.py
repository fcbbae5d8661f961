"""TDX quotes (v4 and v5): parse, verify to the Intel root, refuse tampering; the SGX path
still refuses them, and ``meshproxy quote verify`` shows the TD's measurements."""

from __future__ import annotations

import struct
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

import meshproxy.cli
from meshproxy.attestation import (
    SimulationPlatform,
    TrustAnchor,
    intel_anchor,
    parse_quote,
    parse_tdx_quote,
    simulation_anchor,
    verify_tdx_quote,
)
from meshproxy.cli import enclave as enclave_cli
from meshproxy.errors import AttestationError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
NOW = datetime(2026, 6, 1, tzinfo=UTC)  # inside every TDX vector's PCK chain validity
GOTDX_V4_LEN = 4935  # the quote proper; the file appends test bytes


def vector(name: str) -> bytes:
    data = (VECTORS / name).read_bytes()
    return data[:GOTDX_V4_LEN] if name == "gotdx_v4.dat" else data


# (file, version, length of the signed region)
TDX = [
    ("gotdx_v4.dat", 4, 632),
    ("dcapqvl_tdx_quote.bin", 4, 632),
    ("gotdx_v5.dat", 5, 702),
    ("oe_tdx_v5.bin", 5, 702),
]


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def check_of(data: bytes, anchors: list[TrustAnchor]) -> str:
    with pytest.raises(AttestationError) as info:
        verify_tdx_quote(data, anchors, now=NOW)
    assert str(info.value).startswith(info.value.check + ": ")
    return info.value.check


@pytest.mark.parametrize(("name", "version", "signed"), TDX)
def test_tdx_quote_parses_with_its_layout(name: str, version: int, signed: int) -> None:
    q = parse_tdx_quote(vector(name))
    assert q.version == version
    assert len(q.signed_region) == signed
    body = q.body
    assert len(body.mr_td) == 48
    assert all(len(r) == 48 for r in body.rtmrs)
    assert len(body.report_data) == 64
    assert (body.tee_tcb_svn2 is not None) == (version == 5)
    # The offsets of sgx_report2_body_t: MRTD at 136, RTMR0 at 328, REPORTDATA at 520.
    base = 48 + (6 if version == 5 else 0)
    raw = vector(name)
    assert body.mr_td == raw[base + 136 : base + 184]
    assert body.rtmrs[0] == raw[base + 328 : base + 376]
    assert body.report_data == raw[base + 520 : base + 584]


@pytest.mark.parametrize(("name", "version", "signed"), TDX)
def test_tdx_quote_verifies_to_the_intel_root(name: str, version: int, signed: int) -> None:
    v = verify_tdx_quote(vector(name), [intel_anchor()], now=NOW)
    q = parse_tdx_quote(vector(name))
    assert (v.version, v.anchor, v.tcb_status, v.debug) == (version, "intel", "NotEvaluated", False)
    assert (v.mr_td, v.rtmrs, v.report_data) == (q.body.mr_td, q.body.rtmrs, q.body.report_data)


def test_known_measurements_of_the_oe_v5_vector() -> None:
    v = verify_tdx_quote(vector("oe_tdx_v5.bin"), [intel_anchor()], now=NOW)
    assert v.mr_td.hex().startswith("aa083a82f5c83462")
    assert v.rtmrs[1] == bytes(48)
    assert v.report_data.hex().startswith("18327130a1894f44")


@pytest.mark.parametrize(("name", "version", "signed"), TDX)
def test_tampering_is_detected(name: str, version: int, signed: int) -> None:
    data, anchors = vector(name), [intel_anchor()]
    base = 48 + (6 if version == 5 else 0)
    assert check_of(flip(data, base + 136), anchors) == "quote-signature"  # MRTD
    assert check_of(flip(data, signed - 1), anchors) == "quote-signature"  # last signed byte
    qe_report = signed + 4 + 64 + 64 + 6  # after sig size, signature, key, type 6 header
    assert check_of(flip(data, qe_report + 64), anchors) == "qe-report-signature"  # QE MRENCLAVE


def test_tdx_quote_needs_the_intel_anchor(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    assert check_of(vector("oe_tdx_v5.bin"), [simulation_anchor(platform)]) == "vendor"


def test_tdx_quote_outside_its_pck_validity_fails() -> None:
    with pytest.raises(AttestationError, match="not valid at") as info:
        verify_tdx_quote(
            vector("gotdx_v5.dat"), [intel_anchor()], now=datetime(2025, 1, 1, tzinfo=UTC)
        )
    assert info.value.check == "pck-chain"


def test_zero_padding_is_accepted_other_trailing_bytes_are_not() -> None:
    padded = vector("oe_tdx_v5.bin") + bytes(100)
    assert parse_tdx_quote(padded) == parse_tdx_quote(vector("oe_tdx_v5.bin"))
    with pytest.raises(AttestationError, match="39 bytes after the signature data") as info:
        parse_tdx_quote((VECTORS / "gotdx_v4.dat").read_bytes())
    assert info.value.check == "format"


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("gotdx_v4.dat", lambda q: q[:600], "TD report at offset 48 needs 584"),
        ("oe_tdx_v5.bin", lambda q: struct.pack("<H", 3) + q[2:], "TDX quote version 3"),
        ("oe_tdx_v5.bin", lambda q: q[:4] + struct.pack("<I", 0) + q[8:], "not TDX"),
        ("oe_tdx_v5.bin", lambda q: q[:48] + struct.pack("<H", 1) + q[50:], "not a TD report"),
        ("oe_tdx_v5.bin", lambda q: q[:-1], "signature data size 4300 at offset 702 exceeds"),
    ],
)
def test_malformed_tdx_quote_is_a_format_error(
    name: str, mutate: Callable[[bytes], bytes], message: str
) -> None:
    with pytest.raises(AttestationError, match=message) as info:
        parse_tdx_quote(mutate(vector(name)))
    assert info.value.check == "format"


def test_the_sgx_parser_still_refuses_tdx_and_the_tdx_parser_sgx() -> None:
    with pytest.raises(AttestationError, match="parse_tdx_quote"):
        parse_quote(vector("oe_tdx_v5.bin"))
    with pytest.raises(AttestationError, match="not TDX"):
        parse_tdx_quote((VECTORS / "dcapqvl_sgx_quote.bin").read_bytes())


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this group's commands; other groups are other engineers' work in progress."""
    quote_group = types.ModuleType("_test_quote_group")
    quote_group.register = enclave_cli.register_quote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_test_quote_group", quote_group)
    monkeypatch.setattr(meshproxy.cli, "_GROUPS", ("meshproxy.cli.enclave", "_test_quote_group"))


@pytest.mark.usefixtures("cli")
def test_cli_shows_the_td_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(VECTORS / "oe_tdx_v5.bin")
    assert meshproxy.cli.main(["quote", "verify", path, "--at", "2026-06-01"]) == 0
    out = capsys.readouterr().out
    v = verify_tdx_quote(vector("oe_tdx_v5.bin"), [intel_anchor()], now=NOW)
    assert "Verified TDX quote (v5) against the intel trust anchor\n" in out
    assert f"MRTD: {v.mr_td.hex()}\n" in out
    assert f"RTMR3: {v.rtmrs[3].hex()}\n" in out
    assert f"ReportData: {v.report_data.hex()}\n" in out
