"""Quote providers behind device paths: Gramine's /dev/attestation files and Occlum's
/dev/sgx ioctls, stood in for by a temporary directory and an ioctl that answers like
Occlum's driver, both handing out a real hardware quote."""

from __future__ import annotations

import ctypes
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshproxy.attestation import (
    EnclaveIdentity,
    GramineProvider,
    OcclumProvider,
    SimulationPlatform,
    SimulationProvider,
    intel_anchor,
    provider_for,
    simulation_anchor,
    verify_quote,
)
from meshproxy.attestation._providers import GEN_DCAP_QUOTE, GET_DCAP_QUOTE_SIZE
from meshproxy.errors import AttestationError, ConfigError

VECTORS = Path(__file__).parent / "vectors" / "attestation"
HW_QUOTE = (VECTORS / "dcapqvl_sgx_quote.bin").read_bytes()
HW_NOW = datetime(2024, 6, 1, tzinfo=UTC)
REPORT_DATA = bytes(range(40))


@pytest.fixture
def gramine_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dev" / "attestation"
    d.mkdir(parents=True)
    (d / "attestation_type").write_bytes(b"dcap")
    (d / "user_report_data").write_bytes(bytes(64))
    (d / "quote").write_bytes(HW_QUOTE)
    return d


def test_gramine_provider_writes_the_report_data_and_reads_the_quote(gramine_dir: Path) -> None:
    provider = GramineProvider(gramine_dir)
    assert (provider.name, provider.simulated) == ("gramine", False)
    quote = provider.get_quote(REPORT_DATA)
    assert (gramine_dir / "user_report_data").read_bytes() == REPORT_DATA + bytes(24)
    assert quote == HW_QUOTE
    v = verify_quote(quote, [intel_anchor()], now=HW_NOW)
    assert (v.anchor, v.simulated) == ("intel", False)


def test_gramine_provider_outside_gramine(tmp_path: Path) -> None:
    with pytest.raises(
        AttestationError, match=r"not running under Gramine SGX \(no .*attestation\)"
    ):
        GramineProvider(tmp_path / "attestation").get_quote(b"")


def test_gramine_provider_without_dcap(gramine_dir: Path) -> None:
    (gramine_dir / "attestation_type").write_bytes(b"none")
    with pytest.raises(AttestationError, match='remote_attestation = "dcap"'):
        GramineProvider(gramine_dir).get_quote(b"")
    (gramine_dir / "attestation_type").unlink()
    (gramine_dir / "quote").unlink()
    with pytest.raises(AttestationError, match="quote is missing"):
        GramineProvider(gramine_dir).get_quote(b"")


@pytest.mark.parametrize("cls", [GramineProvider, OcclumProvider])
def test_report_data_longer_than_64_bytes_is_refused(cls: type, tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="65 bytes of report data") as info:
        cls(tmp_path).get_quote(bytes(65))
    assert info.value.check == "report-data"


class FakeOcclumDriver:
    """Answers /dev/sgx's DCAP ioctls the way Occlum's LibOS does, following the pointers
    in ``sgxioc_gen_dcap_quote_arg_t``."""

    def __init__(self, quote: bytes) -> None:
        self.quote = quote
        self.calls: list[int] = []
        self.report_data = b""

    def __call__(self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint32) -> int:
        assert fd >= 0
        self.calls.append(request)
        if request == GET_DCAP_QUOTE_SIZE:
            assert isinstance(arg, ctypes.c_uint32)
            arg.value = len(self.quote)
        elif request == GEN_DCAP_QUOTE:
            report = arg.report_data
            length = arg.quote_len
            buf = arg.quote_buf
            self.report_data = ctypes.string_at(report, 64)
            assert length.contents.value >= len(self.quote)
            ctypes.memmove(buf, self.quote, len(self.quote))
            length.contents.value = len(self.quote)
        else:
            raise OSError(22, "Invalid argument")
        return 0


def test_ioctl_numbers_are_occlums() -> None:
    assert GET_DCAP_QUOTE_SIZE == 2147775239  # _IOR('s', 7, u32)
    assert GEN_DCAP_QUOTE == 3222827784  # _IOWR('s', 8, three pointers)


def test_occlum_provider_asks_the_size_then_generates(tmp_path: Path) -> None:
    device = tmp_path / "sgx"
    device.write_bytes(b"")
    driver = FakeOcclumDriver(HW_QUOTE)
    provider = OcclumProvider(device, ioctl=driver)
    assert (provider.name, provider.simulated) == ("occlum", False)
    quote = provider.get_quote(REPORT_DATA)
    assert driver.calls == [GET_DCAP_QUOTE_SIZE, GEN_DCAP_QUOTE]
    assert driver.report_data == REPORT_DATA + bytes(24)
    assert quote == HW_QUOTE
    assert verify_quote(quote, [intel_anchor()], now=HW_NOW).anchor == "intel"


def test_occlum_provider_outside_occlum(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match=r"not running under Occlum \(no .*sgx\)"):
        OcclumProvider(tmp_path / "sgx", ioctl=FakeOcclumDriver(HW_QUOTE)).get_quote(b"")


def test_occlum_driver_errors_are_attestation_errors(tmp_path: Path) -> None:
    device = tmp_path / "sgx"
    device.write_bytes(b"")

    def broken(fd: int, request: int, arg: object) -> int:
        raise OSError(5, "Input/output error")

    with pytest.raises(AttestationError, match="DCAP quote ioctl failed") as info:
        OcclumProvider(device, ioctl=broken).get_quote(b"")
    assert info.value.check == "provider"
    with pytest.raises(AttestationError, match="quote size of 0 bytes"):
        OcclumProvider(device, ioctl=FakeOcclumDriver(b"")).get_quote(b"")


def test_the_default_ioctl_reaches_the_kernel(tmp_path: Path) -> None:
    """Without Occlum, a regular file answers ENOTTY: the default really calls ioctl."""
    device = tmp_path / "sgx"
    device.write_bytes(b"")
    with pytest.raises(AttestationError, match="ioctl failed"):
        OcclumProvider(device).get_quote(b"")


def test_provider_for_selects_by_name(tmp_path: Path, gramine_dir: Path) -> None:
    identity = EnclaveIdentity(bytes(32), bytes(range(32)), 1, 1, False)
    platform = SimulationPlatform.load_or_create(tmp_path / "p", now=HW_NOW)
    sim = provider_for("simulation", platform=platform, identity=identity)
    assert isinstance(sim, SimulationProvider)
    v = verify_quote(sim.get_quote(b"x"), [simulation_anchor(platform)], now=HW_NOW)
    assert v.identity == identity
    gramine = provider_for("gramine", device_root=gramine_dir.parent)
    assert isinstance(gramine, GramineProvider)
    assert gramine.get_quote(b"") == HW_QUOTE
    occlum = provider_for("occlum", device_root=tmp_path)
    assert isinstance(occlum, OcclumProvider)
    assert occlum.device == tmp_path / "sgx"
    assert isinstance(provider_for("gramine"), GramineProvider)


def test_provider_for_refuses_unknown_names_and_missing_parts() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown quote provider 'gramin' .*did you mean 'gramine'"
    ):
        provider_for("gramin")
    with pytest.raises(ConfigError, match="needs a platform"):
        provider_for("simulation")
