"""Replicas on an etcd that speaks TLS only and wants client certificates; a marble that
asks one replica for its nonce and activates at another; wrong etcd TLS settings refused.

The etcd is real (Debian's etcd-server) with certificates this test makes: its own CA, a
server certificate for 127.0.0.1, a client certificate for the coordinators.
"""

from __future__ import annotations

import contextlib
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from integration.harness import Cluster, Proc, wait_for
from integration.test_lifecycle_env import (
    Marble,
    etcd_server,
    make_etcd_tls,
    package,
    write_manifest,
)
from meshproxy.attestation import SimulationPlatform
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator import client
from meshproxy.coordinator._core import report_data_for
from meshproxy.errors import CoordinatorError
from meshproxy.pki import make_csr, public_der


def _replica(c: Cluster, n: int, etcd_url: str, machines: list[Path], tls: list[str]) -> Proc:
    extra = ["--simulation", "--store", "etcd", "--etcd-endpoints", etcd_url,
             "--platform-dir", str(machines[n]), *tls]  # fmt: skip
    for i, m in enumerate(machines):
        if i != n:
            extra += ["--trust-sim-platform", str(m)]
    return c.start_coordinator(name=f"replica-{n}", state_dir=c.base / f"replica-{n}", extra=extra)


def _attested_body(marble: Marble, nonce: bytes) -> dict[str, str]:
    from cryptography.hazmat.primitives.serialization import Encoding

    quote = marble.provider.get_quote(report_data_for(public_der(marble.key), nonce))
    csr = make_csr(marble.key, marble.marble_type, ["marble.test"])
    return {
        "marbleType": marble.marble_type,
        "uuid": str(marble.instance),
        "csr": csr.public_bytes(Encoding.PEM).decode(),
        "quote": wire.b64e(quote),
        "nonce": wire.b64e(nonce),
    }


def test_replicas_on_tls_etcd_accept_each_others_nonces_once(tmp_path: Path) -> None:
    machines = [tmp_path / f"machine-{i}" for i in range(2)]
    for m in machines:
        SimulationPlatform.load_or_create(m, now=datetime.now(UTC))
    tls = make_etcd_tls(tmp_path / "etcd-tls")
    with etcd_server(tmp_path, tls=tls) as etcd, Cluster(tmp_path) as c:
        assert etcd.url.startswith("https://")
        a, b = (_replica(c, n, etcd.url, machines, tls.coordinator_args()) for n in range(2))
        assert "received the state key from a peer replica" in b.log.read_text()
        path = write_manifest(
            tmp_path / "m.json",
            {
                "Packages": {"app": package()},
                "Marbles": {"web": {"Package": "app", "MaxActivations": 5}},
            },
        )
        c.cli("manifest", "set", str(path), "--coordinator", a.info["client"],
              "--accept-simulation", "--platform-dir", str(machines[0]))  # fmt: skip
        root = client.fetch_evidence(
            a.info["client"], accept_simulation=True, platform_dir=machines[0]
        ).root
        at_a = client.Connection(a.info["mesh"], root)
        at_b = client.Connection(b.info["mesh"], root)

        # The nonce from replica A, the activation at replica B (as behind a balancer).
        marble = Marble(machines[0], "web")
        nonce = wire.b64d(at_a.request("POST", wire.MESH_PATHS["nonce"], {})["nonce"], "nonce")
        body = _attested_body(marble, nonce)
        answer = at_b.request("POST", wire.MESH_PATHS["activate"], body)
        assert "BEGIN CERTIFICATE" in answer["certificate"]
        # The same nonce again, at either replica: refused, and not counted.
        for conn in (at_a, at_b):
            with pytest.raises(CoordinatorError, match="nonce is unknown, used or expired"):
                conn.request("POST", wire.MESH_PATHS["activate"], body)
        # Renewal too takes a nonce from one replica to another.
        nonce = wire.b64d(at_b.request("POST", wire.MESH_PATHS["nonce"], {})["nonce"], "nonce")
        renewed = at_a.request("POST", wire.MESH_PATHS["renew"], _attested_body(marble, nonce))
        assert "BEGIN CERTIFICATE" in renewed["certificate"]
        # Both replicas see the one counted activation (the state is in the TLS etcd).
        for conn in (client.Connection(a.info["client"], root),
                     client.Connection(b.info["client"], root)):  # fmt: skip
            assert conn.request("GET", "/api/v2/status")["activations"] == {"web": 1}
        # And the ordinary client still activates through one replica.
        Marble(machines[0], "web").activate(b.info["mesh"], root)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no client certificate", "TLS failed"),
        ("wrong CA", "TLS failed (CERTIFICATE_VERIFY_FAILED)"),
        ("plain http", "must then be https://"),
        ("missing key", "--etcd-cert and --etcd-key go together"),
    ],
)
def test_wrong_etcd_tls_settings_are_refused_clearly(
    tmp_path: Path, case: str, message: str
) -> None:
    tls = make_etcd_tls(tmp_path / "etcd-tls")
    other = make_etcd_tls(tmp_path / "other-ca")
    with etcd_server(tmp_path, tls=tls) as etcd, Cluster(tmp_path) as c:
        url = etcd.url
        args = tls.coordinator_args()
        if case == "no client certificate":
            args = tls.coordinator_args(client_cert=False)
        elif case == "wrong CA":
            args = ["--etcd-ca", str(other.ca), *tls.coordinator_args()[2:]]
        elif case == "plain http":
            url = url.replace("https://", "http://")
        elif case == "missing key":
            args = ["--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.client_cert)]
        res = subprocess.run(
            [*c.meshproxy(), "coordinator", "--simulation", "--state-dir",
             str(tmp_path / "state"), "--client-addr", "127.0.0.1:0", "--mesh-addr",
             "127.0.0.1:0", "--store", "etcd", "--etcd-endpoints", url, *args],
            env=c.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert res.returncode != 0
        assert message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_etcd_nonce_claims_are_first_come_and_expire_with_their_lease(tmp_path: Path) -> None:
    from datetime import timedelta

    from meshproxy.coordinator._etcd import EtcdStore, EtcdTLS

    tls = make_etcd_tls(tmp_path / "etcd-tls")
    with etcd_server(tmp_path, tls=tls) as etcd, contextlib.ExitStack() as stores:
        files = EtcdTLS(tls.ca, tls.client_cert, tls.client_key)
        store = stores.enter_context(contextlib.closing(EtcdStore([etcd.url], tls=files)))
        other = stores.enter_context(contextlib.closing(EtcdStore([etcd.url], tls=files)))
        now = datetime.now(UTC)
        ids = [bytes([i]) * 16 for i in range(100)]  # more than one transaction's worth
        assert store.claim(ids[:70], now + timedelta(seconds=2), now) == set(ids[:70])
        # Another replica: the ones already claimed are refused, the new ones are its own.
        assert other.claim(ids[60:], now + timedelta(seconds=2), now) == set(ids[70:])
        assert store.claim([ids[0]], now + timedelta(seconds=2), now) == set()
        # The lease (at least twice the nonce's life) outlives the nonce, then frees the key.
        wait_for(
            lambda: bool(store.claim([ids[0]], now + timedelta(seconds=60), now)),
            20,
            "the nonce claim's lease to expire",
        )


class _AnswerDropper:
    """A TCP relay in front of etcd that passes requests on and drops etcd's answers."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket
        import threading

        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.relayed = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, socket.create_connection(self.target) as upstream:
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += conn.recv(65536)
                upstream.sendall(head + b"\r\n\r\n" + body)
                upstream.recv(65536)  # etcd answered (and applied it); the client never knows
                self.relayed += 1

    def close(self) -> None:
        import contextlib
        import socket

        with contextlib.suppress(OSError):  # wakes the accept() blocked in the thread
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def test_a_transaction_whose_answer_is_lost_is_not_sent_again(tmp_path: Path) -> None:
    from urllib.parse import urlsplit

    from meshproxy.coordinator._etcd import EtcdStore
    from meshproxy.errors import StoreError

    with etcd_server(tmp_path) as etcd, contextlib.ExitStack() as stores:
        parts = urlsplit(etcd.url)
        dropper = _AnswerDropper((parts.hostname or "", parts.port or 0))
        try:
            # The relay first, etcd itself second: failing over would send the CAS again.
            relayed = EtcdStore([f"http://127.0.0.1:{dropper.port}", etcd.url], timeout=2)
            store = stores.enter_context(contextlib.closing(relayed))
            with pytest.raises(StoreError, match="outcome is unknown"):
                store.save_versioned(b"state one", 0)
            assert dropper.relayed == 1
            # It was applied: etcd holds it, exactly once (revision of one write).
            direct = stores.enter_context(contextlib.closing(EtcdStore([etcd.url])))
            blob, revision = direct.load_versioned()
            assert blob == b"state one"
            assert direct.save_versioned(b"state two", revision) > revision
            # A relay that cannot be reached at all is skipped: nothing was sent.
            dropper.close()
            assert store.save_versioned(b"state three", revision + 1) > revision + 1
        finally:
            dropper.close()
