"""The coordinator's quote provider: ``--attestation simulation|gramine|occlum``.

This machine has no SGX: Gramine's ``/dev/attestation`` is a directory the test lays out
(``quote`` holds a real Intel quote from the vectors), Occlum's ``/dev/sgx`` ioctls are
answered by a test double of the driver. The coordinator is the real one (``build``, its
core and its replica key server); every quote it makes goes through the hardware provider,
and Intel's root is the only anchor it trusts.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from meshproxy._redact import Secret
from meshproxy.attestation import (
    EnclaveIdentity,
    GramineProvider,
    OcclumProvider,
    SimulationPlatform,
    intel_anchor,
    parse_quote,
    simulation_anchor,
    verify_quote,
)
from meshproxy.cli import main
from meshproxy.coordinator import _replica
from meshproxy.coordinator._core import coordinator_report_data
from meshproxy.coordinator._server import (
    IDENTITY_PROBE,
    Built,
    Options,
    attester_for,
    build,
    coordinator_identity,
)
from meshproxy.errors import ConfigError, PolicyError
from meshproxy.pki import SIMULATION_MARK

VECTORS = Path(__file__).parent / "vectors" / "attestation"
INTEL_QUOTE = (VECTORS / "dcapqvl_sgx_quote.bin").read_bytes()
INTEL_IDENTITY = EnclaveIdentity.from_body(parse_quote(INTEL_QUOTE).body)
NOW = datetime.now(UTC)


def gramine_dev(base: Path, quote: bytes = INTEL_QUOTE) -> Path:
    """A stand-in for /dev with Gramine's attestation files and sealing keys."""
    att = base / "dev" / "attestation"
    (att / "keys").mkdir(parents=True)
    (att / "attestation_type").write_bytes(b"dcap")
    (att / "user_report_data").write_bytes(b"")
    (att / "quote").write_bytes(quote)
    for name in ("_sgx_mrenclave", "_sgx_mrsigner"):
        (att / "keys" / name).write_bytes(os.urandom(16))
    return base / "dev"


def options(tmp_path: Path, attestation: str, seal: str, device_dir: Path) -> Options:
    return Options(
        state_dir=tmp_path / "state",
        client_addr=("127.0.0.1", 0),
        mesh_addr=("127.0.0.1", 0),
        dns_names=("localhost",),
        simulation=False,
        platform_dir=None,
        seal=seal,
        device_dir=device_dir,
        attestation=attestation,
    )


def padded(report_data: bytes) -> bytes:
    return report_data.ljust(64, b"\0")


class FakeOcclumDriver:
    """Answers GET_DCAP_QUOTE_SIZE and GEN_DCAP_QUOTE like Occlum's /dev/sgx."""

    def __init__(self, quote: bytes) -> None:
        self.quote = quote
        self.report_data: list[bytes] = []

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        if isinstance(arg, ctypes.c_uint32):
            arg.value = len(self.quote)
            return 0
        self.report_data.append(bytes(arg.report_data[:64]))
        ctypes.memmove(arg.quote_buf, self.quote, len(self.quote))
        arg.quote_len.contents.value = len(self.quote)
        return 0


def check_hardware_coordinator(built: Built, last_report_data: Any) -> None:
    """No simulation anywhere; GET /api/v2/quote's binding goes to the device; the quote
    verifies to Intel's root (and would then be refused for not binding root and nonce)."""
    core = built.core
    assert core.simulation is False
    _, message = core.status()
    assert "SIMULATION" not in message
    for cert in (core.root.cert, core.intermediate.cert):
        assert SIMULATION_MARK not in cert.subject.rfc4514_string()
    nonce = os.urandom(32)
    quote = core.quote(nonce)
    assert quote == INTEL_QUOTE
    root_der = core.root.cert.public_bytes(Encoding.DER)
    assert last_report_data() == padded(hashlib.sha256(root_der + nonce).digest())
    assert last_report_data() == padded(coordinator_report_data(root_der, nonce))
    verified = verify_quote(quote, [intel_anchor()], now=NOW)
    assert not verified.simulated
    assert verified.report_data[:32] != coordinator_report_data(root_der, nonce)


def test_gramine_coordinator_quotes_through_dev_attestation(tmp_path: Path) -> None:
    dev = gramine_dev(tmp_path)
    report_data = dev / "attestation" / "user_report_data"
    built = build(options(tmp_path, "gramine", "gramine", dev), NOW)
    try:
        # The start-up quote: the device works and tells the coordinator who it is.
        assert report_data.read_bytes() == padded(IDENTITY_PROBE)
        check_hardware_coordinator(built, report_data.read_bytes)
        # Sealed with Gramine's keys: the state file exists and holds no simulation.
        assert any((tmp_path / "state").iterdir())
    finally:
        built.store.close()


def test_occlum_coordinator_quotes_through_dev_sgx(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "sgx").write_bytes(b"")
    driver = FakeOcclumDriver(INTEL_QUOTE)
    device = OcclumProvider(dev / "sgx", ioctl=driver)
    built = build(options(tmp_path, "occlum", "none", dev), NOW, device=device)
    try:
        assert driver.report_data[0] == padded(IDENTITY_PROBE)
        check_hardware_coordinator(built, lambda: driver.report_data[-1])
    finally:
        built.store.close()


def test_hardware_coordinator_takes_its_identity_from_its_quote_and_trusts_only_intel(
    tmp_path: Path,
) -> None:
    dev = gramine_dev(tmp_path)
    attester = attester_for(options(tmp_path, "gramine", "gramine", dev), NOW)
    assert isinstance(attester.provider, GramineProvider)
    assert attester.provider.attestation_dir == dev / "attestation"
    assert attester.identity == INTEL_IDENTITY
    assert attester.identity != coordinator_identity()
    assert attester.platform is None
    assert [a.name for a in attester.anchors] == [intel_anchor().name]
    assert not any(a.simulated for a in attester.anchors)


def test_a_device_without_a_quote_or_with_a_simulated_quote_stops_the_start(
    tmp_path: Path,
) -> None:
    dev = gramine_dev(tmp_path / "missing")
    (dev / "attestation" / "quote").unlink()
    with pytest.raises(ConfigError) as exc:
        build(options(tmp_path, "gramine", "gramine", dev), NOW)
    assert str(exc.value).startswith("--attestation gramine: provider: ")
    assert "quote is missing" in str(exc.value)
    assert not (tmp_path / "state").exists()

    platform = SimulationPlatform.load_or_create(tmp_path / "sim", now=NOW)
    simulated = platform.quote(b"x" * 64, coordinator_identity())
    dev = gramine_dev(tmp_path / "simulated", quote=simulated)
    with pytest.raises(ConfigError, match="not from Intel's quoting enclave"):
        build(options(tmp_path, "gramine", "gramine", dev), NOW)


def test_replica_key_exchange_quotes_through_the_device_and_checks_intel_trust(
    tmp_path: Path,
) -> None:
    att = gramine_dev(tmp_path) / "attestation"
    provider = GramineProvider(att)
    ephemeral, body = _replica.key_request(provider)
    client = _replica._raw(ephemeral.public_key())
    written = (att / "user_report_data").read_bytes()
    assert written == padded(hashlib.sha256(b"meshproxy replica key request v1" + client).digest())
    server = _replica.KeyServer(
        lambda: Secret(b"k" * 32),
        provider=provider,
        anchors=(intel_anchor(),),
        identity=INTEL_IDENTITY,
        simulation=False,
        can_share=lambda: None,
    )
    # Intel's quote verifies (chain, QE report, signatures), then fails the binding.
    with pytest.raises(PolicyError) as exc:
        server(body, now=NOW)
    assert str(exc.value) == "the requesting replica's quote does not bind this key exchange"


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    status = main(["coordinator", *argv])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("meshproxy: error: "), err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no quote provider chosen: inside an SGX enclave pass --attestation gramine or "
             "--attestation occlum; to run without SGX (simulated quotes) pass --simulation"),
        (["--simulation", "--attestation", "occlum"], "--simulation contradicts --attestation "
                                                      "occlum"),
        (["--simulation", "--attestation", "gramine"], "--simulation contradicts --attestation "
                                                       "gramine"),
        (["--attestation", "gramine", "--platform-dir", "p"], "--platform-dir is only for "
                                                              "--simulation"),
        (["--attestation", "gramine", "--trust-sim-platform", "p"], "--trust-sim-platform is "
                                                                    "only for --simulation"),
        (["--attestation", "gramine", "--seal", "simulation"], "--seal simulation needs "
                                                               "--simulation"),
        (["--attestation", "occlum"], "--attestation occlum: meshproxy has no Occlum sealer; "
                                      "pass --seal none"),
        (["--attestation", "occlum", "--seal", "gramine"], "with --attestation occlum pass "
                                                           "--seal none"),
    ],
)  # fmt: skip
def test_bad_attestation_choices_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(["--state-dir", str(tmp_path / "state"), *argv], capsys)
    assert message in err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("attestation", "seal", "device"),
    [("gramine", "gramine", "attestation"), ("occlum", "none", "sgx")],
)
def test_a_missing_device_is_a_one_line_error(
    attestation: str, seal: str, device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    argv = ["--state-dir", str(tmp_path / "state"), "--attestation", attestation,
            "--seal", seal, "--device-dir", str(dev)]  # fmt: skip
    err = one_line_error(argv, capsys)
    assert f"--attestation {attestation}: {dev / device} does not exist" in err
    assert "pass --simulation to run without SGX" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--simulation"], ("simulation", "simulation")),
        (["--attestation", "simulation"], ("simulation", "simulation")),
        (["--simulation", "--attestation", "simulation"], ("simulation", "simulation")),
        (["--simulation", "--seal", "gramine", "--device-dir", "{dev}"], ("simulation", "gramine")),
        (["--attestation", "gramine", "--device-dir", "{dev}"], ("gramine", "gramine")),
        (["--attestation", "gramine", "--seal", "none", "--device-dir", "{dev}"],
         ("gramine", "none")),
        (["--attestation", "occlum", "--seal", "none", "--device-dir", "{dev}"],
         ("occlum", "none")),
    ],
)  # fmt: skip
def test_good_attestation_choices_and_their_sealers(
    argv: list[str], expected: tuple[str, str], tmp_path: Path
) -> None:
    from meshproxy.cli import build_parser
    from meshproxy.cli.coordinator import _attestation

    dev = gramine_dev(tmp_path)
    (dev / "sgx").write_bytes(b"")
    args = build_parser().parse_args(
        ["coordinator", "--state-dir", str(tmp_path / "state")] + [a.format(dev=dev) for a in argv]
    )
    assert _attestation(args) == expected


def test_simulation_is_unchanged_its_platform_quotes_and_marks_everything(tmp_path: Path) -> None:
    opts = Options(
        state_dir=tmp_path / "state",
        client_addr=("127.0.0.1", 0),
        mesh_addr=("127.0.0.1", 0),
        dns_names=("localhost",),
        simulation=True,
        platform_dir=tmp_path / "sim",
        seal="simulation",
    )
    built = build(opts, NOW)
    try:
        core = built.core
        assert core.simulation is True
        assert SIMULATION_MARK in core.root.cert.subject.rfc4514_string()
        nonce = os.urandom(16)
        platform = SimulationPlatform.load(tmp_path / "sim")
        verified = verify_quote(core.quote(nonce), [simulation_anchor(platform)], now=NOW)
        assert verified.simulated
        assert verified.identity == coordinator_identity()
        root_der = core.root.cert.public_bytes(Encoding.DER)
        assert verified.report_data[:32] == coordinator_report_data(root_der, nonce)
    finally:
        built.store.close()
