"""A coordinator process on the hardware quote path (``--attestation gramine|occlum``).

This machine has no SGX. Gramine's ``/dev/attestation`` is a directory under
``--device-dir``; its ``quote`` is a FIFO, and a test thread plays Gramine: it answers each
read with a real Intel quote from the vectors and records the report data the coordinator
wrote to ``user_report_data`` just before. The users' side (``meshproxy status``,
``meshproxy manifest verify``), trusting only Intel, verifies that quote to Intel's root
and then refuses it because its report data does not bind the coordinator's root and the
client's nonce: proof the quote went end to end through the hardware path. Two such
replicas on etcd run the attested key exchange through their devices, and the peer refuses
the newcomer because its quote does not bind the exchange. Occlum's
``/dev/sgx`` needs the DCAP ioctls, which a file cannot answer: the coordinator makes its
start-up quote through them and stops with the driver's refusal.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from integration.harness import Cluster, wait_for
from integration.test_lifecycle_env import etcd_server
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator._server import IDENTITY_PROBE
from meshproxy.coordinator.client import Connection
from meshproxy.pki import SIMULATION_MARK, certs_from_pem

VECTORS = Path(__file__).parent.parent / "tests" / "vectors" / "attestation"
INTEL_QUOTE = (VECTORS / "dcapqvl_sgx_quote.bin").read_bytes()
REFUSAL = "quote does not bind the root certificate it sent and our nonce"


def _gramine_dev(base: Path) -> Path:
    att = base / "dev" / "attestation"
    (att / "keys").mkdir(parents=True)
    (att / "attestation_type").write_bytes(b"dcap")
    (att / "user_report_data").write_bytes(b"")
    for name in ("_sgx_mrenclave", "_sgx_mrsigner"):
        (att / "keys" / name).write_bytes(os.urandom(16))
    return base / "dev"


@contextlib.contextmanager
def _gramine_quotes(att: Path, quote: bytes) -> Iterator[list[bytes]]:
    """Make ``att/quote`` a FIFO that gives ``quote`` once per write of the report data;
    yields the report data of every quote served, in order."""
    fifo, report_data = att / "quote", att / "user_report_data"
    os.mkfifo(fifo)
    stop = threading.Event()
    served: list[bytes] = []

    def written() -> tuple[int, bytes]:
        return report_data.stat().st_mtime_ns, report_data.read_bytes()

    def serve() -> None:
        last = written()
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                stop.wait(0.01)
                continue
            try:
                now = written()
                if now == last:  # the last reader has not closed yet
                    stop.wait(0.01)
                    continue
                last = now
                os.set_blocking(fd, True)
                view = memoryview(quote)
                with contextlib.suppress(BrokenPipeError):
                    while view:
                        view = view[os.write(fd, view) :]
                    served.append(now[1])
            finally:
                os.close(fd)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        stop.set()
        thread.join(5)


def _padded(data: bytes) -> bytes:
    return data.ljust(64, b"\0")


def test_gramine_coordinator_serves_device_quotes_that_clients_check_with_intel(
    tmp_path: Path,
) -> None:
    dev = _gramine_dev(tmp_path)
    with _gramine_quotes(dev / "attestation", INTEL_QUOTE) as served, Cluster(tmp_path / "c") as c:
        proc = c.start_coordinator(extra=("--attestation", "gramine", "--device-dir", str(dev)))
        # The start-up quote: the coordinator learns its own identity from the device.
        assert served == [_padded(IDENTITY_PROBE)]

        nonce = os.urandom(32)
        q = base64.urlsafe_b64encode(nonce).decode().rstrip("=")
        data = Connection(c.client_addr, None, 10).request(
            "GET", f"{wire.CLIENT_PATHS['quote']}?nonce={q}"
        )
        assert data["simulation"] is False
        assert wire.b64d(data["quote"], "quote") == INTEL_QUOTE
        intermediate, root = certs_from_pem(data["cert"].encode(), "chain")
        for cert in (intermediate, root):
            assert SIMULATION_MARK not in cert.subject.rfc4514_string()
        # What the coordinator asked the device to bind: its root and our nonce.
        expected = hashlib.sha256(root.public_bytes(Encoding.DER) + nonce).digest()
        assert served[-1] == _padded(expected)

        for argv in (
            ("status", "--coordinator", c.client_addr),
            ("manifest", "verify", str(tmp_path / "manifest.json"), "--coordinator",
             c.client_addr),
        ):  # fmt: skip
            (tmp_path / "manifest.json").write_text("{}")
            before = len(served)
            res = c.cli(*argv, check=False)
            assert res.returncode != 0
            # Intel's root verified the chain, QE report and signatures; the binding failed.
            assert res.stderr == f"meshproxy: error: coordinator {c.client_addr}: {REFUSAL}\n"
            assert len(served) == before + 1
        assert not (c.base / "client-config" / "roots").exists()  # nothing was saved

        assert proc.stop() == 0
        log = proc.log.read_text()
        assert "hardware attestation: quotes come from the enclave's device" in log
        assert "SIMULATION" not in log


def test_occlum_coordinator_quotes_through_the_sgx_device_ioctls(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "sgx").write_bytes(b"")  # a file, not Occlum's device: the ioctls fail
    with Cluster(tmp_path / "c") as c:
        res = c.cli(
            "coordinator", "--state-dir", str(tmp_path / "state"), "--attestation", "occlum",
            "--seal", "none", "--device-dir", str(dev), "--client-addr", "127.0.0.1:0",
            "--mesh-addr", "127.0.0.1:0", check=False,
        )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.startswith(
        f"meshproxy: error: --attestation occlum: provider: {dev / 'sgx'}: DCAP quote ioctl "
        "failed (Inappropriate ioctl for device)"
    ), res.stderr
    assert res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_gramine_replicas_exchange_device_quotes_and_refuse_an_unbound_one(
    tmp_path: Path,
) -> None:
    """Two machines (each its own sealing keys): the second cannot open the state and asks
    the first for the key with a quote from its device; the first verifies it to Intel's
    root, finds it does not bind the key exchange, and never quotes an answer."""
    devs = [_gramine_dev(tmp_path / f"machine-{n}") for n in range(2)]
    with (
        etcd_server(tmp_path) as etcd,
        _gramine_quotes(devs[0] / "attestation", INTEL_QUOTE) as served0,
        _gramine_quotes(devs[1] / "attestation", INTEL_QUOTE) as served1,
        Cluster(tmp_path / "c") as c,
    ):
        replicas = []
        for n, dev in enumerate(devs):  # one after the other: the first creates the state
            extra = ("--attestation", "gramine", "--device-dir", str(dev),
                     "--store", "etcd", "--etcd-endpoints", etcd.url)  # fmt: skip
            replicas.append(
                c.start_coordinator(name=f"replica-{n}", state_dir=c.base / f"r{n}", extra=extra)
            )
        peer = replicas[0].info["mesh"]
        refusal = f"coordinator {peer} refused: the requesting replica's quote does not bind"
        wait_for(lambda: refusal in replicas[1].log.read_text(), 60, "the peer's refusal")
        assert "received the state key" not in replicas[1].log.read_text()
        status = Connection(replicas[1].info["client"], None, 10).request(
            "GET", wire.CLIENT_PATHS["status"]
        )
        assert status["code"] == 1  # recovery: locked out of the shared state
        assert status["simulation"] is False
        assert served0 == [_padded(IDENTITY_PROBE)]  # the peer never quoted an answer
        assert served1[0] == _padded(IDENTITY_PROBE)
        assert len(served1) >= 2  # the key request's quote came from the device
        assert _padded(IDENTITY_PROBE) not in served1[1:]
