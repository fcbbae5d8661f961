"""The SGX quote layout and the simulated platform that makes quotes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from meshproxy._redact import Secret
from meshproxy.attestation import (
    INTEL_QE_VENDOR_ID,
    SIM_VENDOR_ID,
    EnclaveIdentity,
    ReportBody,
    SimulationPlatform,
    SimulationProvider,
    default_platform_dir,
    intel_anchor,
    parse_quote,
    verify_quote,
)
from meshproxy.errors import AttestationError, ConfigError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
SGX_VECTORS = [
    "dcapqvl_sgx_quote.bin",
    "oe_sgx_quote.bin",
    "mc_hw_quote.dat",
    "cosmian_quote.dat",
    "azure_release_quote.bin",
]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
IDENTITY = EnclaveIdentity(
    unique_id=bytes(range(32)),
    signer_id=bytes(range(32, 64)),
    product_id=3,
    security_version=7,
    debug=False,
)


def raw_quote(data: bytes) -> bytes:
    """Strip an Open Enclave header (version 1, type 2 = SGX remote, u64 size) if present."""
    if len(data) >= 16:
        version, kind, size = struct.unpack_from("<IIQ", data)
        if version == 1 and kind == 2 and size == len(data) - 16:
            return data[16:]
    return data


def vector(name: str) -> bytes:
    return raw_quote((VECTORS / name).read_bytes())


@pytest.fixture
def platform(tmp_path: Path) -> SimulationPlatform:
    return SimulationPlatform.load_or_create(tmp_path / "platform", now=NOW)


# -- real hardware quotes --------------------------------------------------------------
@pytest.mark.parametrize("name", SGX_VECTORS)
def test_hardware_vector_parses_as_v3_with_intel_pck_chain(name: str) -> None:
    data = vector(name)
    q = parse_quote(data)
    assert q.version == 3
    assert q.att_key_type == 2
    assert q.vendor_id == INTEL_QE_VENDOR_ID
    assert q.cert_type == 5
    assert q.cert_data.startswith(b"-----BEGIN CERTIFICATE-----")
    assert q.signed_region == data[:432]
    assert q.body.to_bytes() == data[48:432]
    assert q.qe_report.to_bytes() == data[564:948]
    assert q.qe_auth_data == bytes(range(32))


def test_azure_vector_fields_match_the_published_expectations() -> None:
    expected = json.loads((VECTORS / "az.json").read_text())
    q = parse_quote(vector("azure_release_quote.bin"))
    assert q.body.mr_enclave.hex().upper() == expected["MrEnclaveHex"]
    assert q.body.mr_signer.hex().upper() == expected["MrSignerHex"]
    assert q.body.isv_prod_id == int.from_bytes(bytes.fromhex(expected["ProductIdHex"]), "little")
    assert q.body.isv_svn == expected["SecurityVersion"]
    held = bytes.fromhex(expected["EnclaveHeldDataHex"])
    assert q.body.report_data[:32] == hashlib.sha256(held).digest()
    assert bytes.fromhex(expected["QuoteHex"]) == vector("azure_release_quote.bin")


@pytest.mark.parametrize(
    ("name", "debug"),
    [("oe_sgx_quote.bin", True), ("mc_hw_quote.dat", True), ("dcapqvl_sgx_quote.bin", False)],
)
def test_debug_flag_is_attribute_bit_1(name: str, debug: bool) -> None:
    q = parse_quote(vector(name))
    assert q.body.debug is debug
    assert q.qe_report.debug is False


def test_oe_header_is_stripped_by_the_vector_loader() -> None:
    data = vector("oe_sgx_quote.bin")
    wrapped = struct.pack("<IIQ", 1, 2, len(data)) + data
    assert raw_quote(wrapped) == data


def test_tdx_quote_is_refused_as_a_format_error() -> None:
    with pytest.raises(AttestationError, match="TDX") as info:
        parse_quote(vector("gotdx_v4.dat"))
    assert info.value.check == "format"


def relayout(v3: bytes, version: int) -> bytes:
    """The same quote in the v4 or v5 layout (QE report inside certification data type 6)."""
    q = parse_quote(v3)
    qe = b"".join(
        (
            q.qe_report.to_bytes(),
            q.qe_report_signature,
            struct.pack("<H", len(q.qe_auth_data)),
            q.qe_auth_data,
            struct.pack("<HI", q.cert_type, len(q.cert_data)),
            q.cert_data,
        )
    )
    sig_data = q.signature + q.attestation_key + struct.pack("<HI", 6, len(qe)) + qe
    header = struct.pack("<H", version) + v3[2:48]
    if version == 5:
        header += struct.pack("<HI", 1, 384)
    return header + v3[48:432] + struct.pack("<I", len(sig_data)) + sig_data


@pytest.mark.parametrize("version", [4, 5])
def test_v4_and_v5_sgx_layouts_parse_to_the_same_fields(version: int) -> None:
    v3 = vector("dcapqvl_sgx_quote.bin")
    q3, q = parse_quote(v3), parse_quote(relayout(v3, version))
    assert q.version == version
    assert q.signed_region == relayout(v3, version)[: 432 + (6 if version == 5 else 0)]
    fields = ("body", "signature", "attestation_key", "qe_report", "qe_auth_data", "cert_data")
    for name in fields:
        assert getattr(q, name) == getattr(q3, name), name


@pytest.mark.parametrize("version", [4, 5])
def test_v4_v5_layouts_pass_every_check_up_to_the_quote_signature(version: int) -> None:
    # The version is signed, so re-laying out a v3 quote breaks only the quote signature:
    # the chain, the QE report and the key binding are found and checked in the new layout.
    relaid = relayout(vector("cosmian_quote.dat"), version)
    with pytest.raises(AttestationError) as info:
        verify_quote(relaid, [intel_anchor()], now=datetime(2024, 6, 1, tzinfo=UTC))
    assert info.value.check == "quote-signature"


def test_v5_with_a_td_body_is_refused() -> None:
    data = bytearray(relayout(vector("dcapqvl_sgx_quote.bin"), 5))
    struct.pack_into("<H", data, 48, 2)
    with pytest.raises(AttestationError, match="not an SGX report body"):
        parse_quote(bytes(data))


# -- malformed input -------------------------------------------------------------------
def test_truncated_quote_names_the_field_and_offset() -> None:
    data = vector("dcapqvl_sgx_quote.bin")
    with pytest.raises(
        AttestationError, match=r"vendor id at offset 12 needs 16 .* only 8"
    ) as info:
        parse_quote(data[:20])
    assert info.value.check == "format"
    cut = bytearray(data[:600])
    struct.pack_into("<I", cut, 432, 600 - 436)  # a consistent size, so the QE report is short
    with pytest.raises(AttestationError, match=r"QE report at offset 564 needs 384 .* only 36"):
        parse_quote(bytes(cut))


def test_signature_data_size_larger_than_the_quote_is_refused() -> None:
    data = bytearray(vector("dcapqvl_sgx_quote.bin"))
    struct.pack_into("<I", data, 432, len(data))
    with pytest.raises(AttestationError, match=r"signature data size .* at offset 432"):
        parse_quote(bytes(data))


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(AttestationError, match="unexpected bytes at offset 4600"):
        parse_quote(vector("dcapqvl_sgx_quote.bin") + b"\0\0")


def test_unknown_version_and_key_type_are_refused() -> None:
    data = bytearray(vector("dcapqvl_sgx_quote.bin"))
    data[0] = 9
    with pytest.raises(AttestationError, match="unsupported quote version 9"):
        parse_quote(bytes(data))
    data[0], data[2] = 3, 3
    with pytest.raises(AttestationError, match="attestation key type 3"):
        parse_quote(bytes(data))


def test_non_zero_reserved_report_bytes_are_refused() -> None:
    data = bytearray(vector("dcapqvl_sgx_quote.bin"))
    data[48 + 100] = 1  # reserved2 of the report body
    with pytest.raises(AttestationError, match=r"reserved bytes .* offset 144"):
        parse_quote(bytes(data))


def test_not_bytes_is_a_format_error() -> None:
    with pytest.raises(AttestationError) as info:
        parse_quote("03000200")  # type: ignore[arg-type]
    assert info.value.check == "format"


def test_report_body_round_trips_including_kss_fields() -> None:
    body = ReportBody(
        cpu_svn=b"\x01" * 16,
        misc_select=5,
        attributes=b"\x07" + bytes(15),
        mr_enclave=b"\x02" * 32,
        mr_signer=b"\x03" * 32,
        isv_prod_id=0xFFFF,
        isv_svn=2,
        report_data=b"\x04" * 64,
        isv_ext_prod_id=b"\x05" * 16,
        config_id=b"\x06" * 64,
        config_svn=9,
        isv_family_id=b"\x08" * 16,
    )
    raw = body.to_bytes()
    assert len(raw) == 384
    assert ReportBody.parse(raw) == body
    assert body.debug is True


# -- the simulated platform ------------------------------------------------------------
def test_simulated_quote_is_a_v3_quote_carrying_the_identity(
    platform: SimulationPlatform,
) -> None:
    q = parse_quote(platform.quote(b"nonce", IDENTITY))
    assert (q.version, q.att_key_type, q.cert_type) == (3, 2, 5)
    assert q.vendor_id == SIM_VENDOR_ID
    assert q.body.mr_enclave == IDENTITY.unique_id
    assert q.body.mr_signer == IDENTITY.signer_id
    assert (q.body.isv_prod_id, q.body.isv_svn, q.body.debug) == (3, 7, False)
    assert q.body.report_data == b"nonce" + bytes(59)
    assert q.qe_report.report_data == (
        hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    )
    assert b"meshproxy SIMULATION PCK" not in q.cert_data  # PEM: names are base64
    assert q.cert_data.count(b"BEGIN CERTIFICATE") == 2


def test_simulated_debug_identity_sets_the_debug_attribute(platform: SimulationPlatform) -> None:
    debug = EnclaveIdentity(IDENTITY.unique_id, IDENTITY.signer_id, 3, 7, True)
    assert parse_quote(platform.quote(b"", debug)).body.debug is True


def test_report_data_longer_than_64_bytes_is_refused(platform: SimulationPlatform) -> None:
    with pytest.raises(AttestationError, match="65 bytes of report data"):
        platform.quote(bytes(65), IDENTITY)


def test_provider_quotes_for_its_identity(platform: SimulationPlatform) -> None:
    provider = SimulationProvider(platform, IDENTITY)
    assert (provider.name, provider.simulated) == ("simulation", True)
    assert parse_quote(provider.get_quote(b"x" * 64)).body.report_data == b"x" * 64


def test_platform_files_are_private_and_reloaded(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "platform"
    first = SimulationPlatform.load_or_create(directory, now=NOW)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "pck-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "secret").stat().st_mode) == 0o600
    subject = first.root_certificate.subject.rfc4514_string()
    assert "meshproxy SIMULATION Root" in subject
    again = SimulationPlatform.load_or_create(directory, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert again.root_certificate == first.root_certificate
    assert again.sealing_key(b"a") == first.sealing_key(b"a")
    assert sorted(p.name for p in tmp_path.joinpath("deep").iterdir()) == ["platform"]


def test_empty_existing_directory_becomes_a_platform(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    assert (platform.directory / "root.pem").is_file()


def test_concurrent_creators_agree_on_one_platform(tmp_path: Path) -> None:
    directory = tmp_path / "platform"
    roots: list[bytes] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            p = SimulationPlatform.load_or_create(directory, now=NOW)
            roots.append(p.root_certificate.fingerprint(hashes.SHA256()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(roots) == 8
    assert len(set(roots)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["platform"]


def test_too_open_key_file_is_refused(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    os.chmod(platform.directory / "pck-key.pem", 0o644)
    with pytest.raises(ConfigError, match="too open"):
        SimulationPlatform.load(platform.directory)


def test_incomplete_platform_is_a_config_error(tmp_path: Path) -> None:
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=NOW)
    (platform.directory / "secret").unlink()
    with pytest.raises(ConfigError, match="secret: missing"):
        SimulationPlatform.load_or_create(platform.directory, now=NOW)


def test_missing_platform_is_not_created_by_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no simulation platform"):
        SimulationPlatform.load(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_sealing_keys_depend_on_label_and_platform(tmp_path: Path) -> None:
    a = SimulationPlatform.load_or_create(tmp_path / "a", now=NOW)
    b = SimulationPlatform.load_or_create(tmp_path / "b", now=NOW)
    key = a.sealing_key(b"coordinator")
    assert isinstance(key, Secret)
    assert len(key.reveal()) == 32
    assert key == a.sealing_key(b"coordinator")
    assert key != a.sealing_key(b"other")
    assert key != b.sealing_key(b"coordinator")
    assert key.reveal().hex() not in repr(key)


def test_default_platform_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MESHPROXY_SIM_PLATFORM", str(tmp_path / "explicit"))
    assert default_platform_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MESHPROXY_SIM_PLATFORM")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_platform_dir() == tmp_path / "xdg" / "meshproxy" / "sim-platform"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "meshproxy" / "sim-platform"
    assert default_platform_dir() == expected
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_platform_dir() == expected
