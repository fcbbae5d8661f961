"""Hardware providers and RA-TLS end to end, against a real (simulated) coordinator.

This machine has no SGX, so the devices are stand-ins laid out by the test:

* Gramine's ``/dev/attestation`` as a directory (``device_dir`` in the marble config). With
  a real Intel quote from the vectors in ``quote``, the quote travels through the proxy's
  provider and HTTPS to the coordinator, which verifies it to Intel's root and refuses it
  for not binding the marble's key: proof it went end to end. With ``quote`` a FIFO, a
  thread plays Gramine: it answers each read with a quote over what the proxy wrote to
  ``user_report_data``, made by this cluster's simulated platform; activation then
  succeeds and the proxy writes the marble's sealing key to ``keys/meshproxy_sealing``.
* Occlum's ``/dev/sgx`` ioctls, answered by a test double of the driver.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.conftest import Mesh, package
from meshproxy.attestation import (
    SEAL_KEY_NAME,
    EnclaveIdentity,
    GramineProvider,
    OcclumProvider,
    SimulationPlatform,
    intel_anchor,
    simulation_anchor,
    verify_quote,
    verify_ratls_certificate,
)
from meshproxy.config import load_marble_config
from meshproxy.errors import CoordinatorError, PolicyError
from meshproxy.pki import generate_key
from meshproxy.runtime._activate import activate, activate_with_retry, quote_provider

VECTORS = Path(__file__).parent.parent / "tests" / "vectors" / "attestation"
INTEL_QUOTE = (VECTORS / "dcapqvl_sgx_quote.bin").read_bytes()
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def _manifest(mesh: Mesh) -> dict[str, Any]:
    return {
        "Packages": {"app": package(mesh.signer, 1)},
        "Marbles": {"web": {"Package": "app"}},
    }


def _hw_config(mesh: Mesh, name: str, provider: str, dev: Path, timeout: str = "2s") -> Path:
    d = mesh.dir / name
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "coordinator": {"address": mesh.c.mesh_addr, "activation_timeout": timeout},
        "marble": {"type": "web", "uuid_file": "uuid"},
        "attestation": {
            "provider": provider,
            "device_dir": str(dev),
            "accept_simulation": True,  # the coordinator is simulated; the marble is not
            "platform_dir": str(mesh.c.base / "sim-platform"),
        },
        "workdir": "run",
        "log": {"level": "info", "format": "json"},
    }
    (d / "marble.yaml").write_text(yaml.safe_dump(config))
    return d / "marble.yaml"


def _gramine_dir(base: Path) -> Path:
    att = base / "attestation"
    (att / "keys").mkdir(parents=True)
    (att / "attestation_type").write_bytes(b"dcap")
    (att / "user_report_data").write_bytes(b"")
    return att


def test_gramine_provider_sends_the_device_quote_to_the_coordinator(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.set_manifest(_manifest(mesh))
    att = _gramine_dir(tmp_path / "dev")
    (att / "quote").write_bytes(INTEL_QUOTE)
    cfg = load_marble_config(_hw_config(mesh, "gramine-intel", "gramine", tmp_path / "dev"))
    provider = quote_provider(cfg)
    assert isinstance(provider, GramineProvider)
    assert provider.attestation_dir == att
    with pytest.raises(CoordinatorError) as exc:
        activate(cfg, generate_key(), provider)
    # The coordinator verified Intel's quote (chain, QE, signatures) and then refused it:
    # it was made for another enclave's report data, not this marble's key and nonce.
    assert "quote does not bind this CSR's key and the coordinator's nonce" in str(exc.value)
    written = (att / "user_report_data").read_bytes()
    assert len(written) == 64
    assert written[32:] == bytes(32)
    assert written[:32] != bytes(32)
    # The same quote verifies to Intel's root outside the mesh too (no simulation trusted).
    assert not verify_quote(INTEL_QUOTE, [intel_anchor()], now=datetime.now(UTC)).simulated


class _FakeOcclumDriver:
    """Answers GET_DCAP_QUOTE_SIZE and GEN_DCAP_QUOTE like Occlum's /dev/sgx."""

    def __init__(self, quote: bytes) -> None:
        self.quote = quote
        self.report_data = b""

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        if isinstance(arg, ctypes.c_uint32):
            arg.value = len(self.quote)
            return 0
        self.report_data = bytes(arg.report_data[:64])
        ctypes.memmove(arg.quote_buf, self.quote, len(self.quote))
        arg.quote_len.contents.value = len(self.quote)
        return 0


def test_occlum_provider_sends_the_driver_quote_to_the_coordinator(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.set_manifest(_manifest(mesh))
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "sgx").write_bytes(b"")
    cfg = load_marble_config(_hw_config(mesh, "occlum-intel", "occlum", dev))
    provider = quote_provider(cfg)
    assert isinstance(provider, OcclumProvider)
    assert provider.device == dev / "sgx"
    driver = _FakeOcclumDriver(INTEL_QUOTE)
    with pytest.raises(CoordinatorError) as exc:
        activate(cfg, generate_key(), OcclumProvider(provider.device, ioctl=driver))
    assert "quote does not bind this CSR's key and the coordinator's nonce" in str(exc.value)
    assert len(driver.report_data) == 64
    assert driver.report_data[32:] == bytes(32)


@contextlib.contextmanager
def _gramine_emulator(
    att: Path, platform: SimulationPlatform, ident: EnclaveIdentity
) -> Iterator[list[int]]:
    """Make ``att/quote`` a FIFO and answer a read with a fresh simulated quote over the
    report data just written to ``att/user_report_data`` (Gramine's contract: write the
    report data, then read the quote). One quote per write of the report data."""
    fifo = att / "quote"
    report_data = att / "user_report_data"
    os.mkfifo(fifo)
    stop = threading.Event()
    served: list[int] = []

    def serve() -> None:
        last = report_data.stat().st_mtime_ns
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                stop.wait(0.01)
                continue
            try:
                written_at = report_data.stat().st_mtime_ns
                if written_at == last:  # the last reader has not closed yet
                    stop.wait(0.01)
                    continue
                last = written_at
                os.set_blocking(fd, True)
                quote = platform.quote(report_data.read_bytes(), ident)
                view = memoryview(quote)
                with contextlib.suppress(BrokenPipeError):
                    while view:
                        view = view[os.write(fd, view) :]
                    served.append(len(quote))
            finally:
                os.close(fd)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        stop.set()
        thread.join(5)


def test_gramine_marble_activates_and_gets_its_sealing_key(mesh: Mesh, tmp_path: Path) -> None:
    mesh.set_manifest(_manifest(mesh))
    att = _gramine_dir(tmp_path / "dev")
    platform = SimulationPlatform.load(mesh.c.base / "sim-platform")
    ident = EnclaveIdentity(
        unique_id=hashlib.sha256(b"gramine enclave").digest(),
        signer_id=bytes.fromhex(mesh.signer.signer_id),
        product_id=1,
        security_version=1,
        debug=False,
    )
    config = _hw_config(mesh, "gramine-sim", "gramine", tmp_path / "dev", timeout="20s")
    key_file = att / "keys" / SEAL_KEY_NAME
    with _gramine_emulator(att, platform, ident) as served:
        proc = mesh.start("gramine-sim", config, SLEEP)
        assert served, "the proxy never read /dev/attestation/quote"
        key = key_file.read_bytes()
        assert len(key) == 16
        assert key_file.stat().st_mode & 0o777 == 0o600
        proc.stop()
        log = proc.log.read_text()
        assert "sealing key installed" in log
        coordinator_log = mesh.c.procs[0].log.read_text()
        for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode()):
            assert form not in log
            assert form not in coordinator_log

        # Restarted (same uuid_file): the same key, so its encrypted mount opens again.
        key_file.unlink()
        proc = mesh.start("gramine-sim-again", config, SLEEP)
        assert key_file.read_bytes() == key
        proc.stop()

        # Another instance (another UUID) gets another key.
        other = _hw_config(mesh, "gramine-other", "gramine", tmp_path / "dev", timeout="20s")
        proc = mesh.start("gramine-other", other, SLEEP)
        assert key_file.read_bytes() != key
        proc.stop()


DEMO_POLICY = Path(__file__).parent.parent / "configs" / "demo" / "coordinator-policy.yaml"


def _policy_config(mesh: Mesh, name: str, policy: Path) -> Path:
    """A simulated marble whose config (measured, so set before signing) has a policy."""
    coordinator = {"address": mesh.c.mesh_addr, "activation_timeout": "20s", "policy": str(policy)}
    return mesh.marble_config(name, "web", app=SLEEP, extra={"coordinator": coordinator})


def test_an_activated_marble_leaf_is_an_ra_tls_certificate(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mesh.set_manifest(_manifest(mesh))
    monkeypatch.setenv("MESHPROXY_SIM_PLATFORM", str(mesh.c.base / "sim-platform"))
    config = _policy_config(mesh, "ratls", DEMO_POLICY)
    cfg = load_marble_config(config)
    activation = activate(cfg, generate_key(), quote_provider(cfg))
    assert "not pinned" not in caplog.text  # the coordinator passed the demo's policy
    platform = SimulationPlatform.load(mesh.c.base / "sim-platform")
    now = datetime.now(UTC)
    verified = verify_ratls_certificate(activation.leaf, [simulation_anchor(platform)], now=now)
    assert verified.identity.signer_id.hex() == mesh.signer.signer_id
    assert verified.identity.product_id == 1


def test_a_marble_refuses_a_coordinator_its_policy_does_not_pin(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh.set_manifest(_manifest(mesh))
    monkeypatch.setenv("MESHPROXY_SIM_PLATFORM", str(mesh.c.base / "sim-platform"))
    policy = mesh.c.base / "strict-policy.yaml"
    policy.write_text(DEMO_POLICY.read_text().replace("SecurityVersion: 1", "SecurityVersion: 4"))
    config = _policy_config(mesh, "strict", policy)
    cfg = load_marble_config(config)
    calls: list[float] = []
    with pytest.raises(PolicyError) as exc:
        activate_with_retry(
            "coordinator",
            lambda t: activate(cfg, generate_key(), quote_provider(cfg)),
            timeout=30,
            sleep=calls.append,
        )
    assert "refused by policy: SecurityVersion: the coordinator has 1" in str(exc.value)
    assert calls == []  # a trust failure is not retried
