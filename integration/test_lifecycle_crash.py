"""Crash safety: the coordinator is SIGKILLed at random moments while it commits state,
at least 30 times; every restart finds the old or the new state, never a broken one."""

from __future__ import annotations

import base64
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from integration.harness import Cluster
from integration.test_lifecycle_env import Marble, make_user, package, write_manifest
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator import client
from meshproxy.errors import MeshError

KILLS = 30


def test_sigkill_during_state_writes_never_leaves_a_broken_state(tmp_path: Path) -> None:
    alice = make_user(tmp_path / "users", "alice")
    doc = {
        "Packages": {"app": package()},
        "Marbles": {"app": {"Package": "app"}},
        "Secrets": {"counter": {"Type": "plain", "UserDefined": True}},
        "Users": {"alice": {"Certificate": alice.pem, "Roles": ["rw"]}},
        "Roles": {
            "rw": {
                "ResourceType": "Secrets",
                "ResourceNames": ["counter"],
                "Actions": ["ReadSecret", "WriteSecret"],
            }
        },
    }
    identity = client.ClientIdentity(alice.cert, alice.key)
    rng = random.Random(20261101)
    attempted = acked = 0
    in_flight_kills = 0
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        path = write_manifest(tmp_path / "m.json", doc)
        c.cli("manifest", "set", str(path), "--coordinator", c.client_addr, "--accept-simulation")
        root_pem = c.cli("certificate", "root", "--coordinator", c.client_addr,
                         "--accept-simulation").stdout  # fmt: skip
        root = x509.load_pem_x509_certificate(root_pem.encode())

        def conn() -> client.Connection:
            return client.Connection(c.client_addr, root, timeout=5, identity=identity)

        for kill in range(KILLS + 1):
            proc = c.start_coordinator(name=f"coordinator-{kill}") if kill else c.procs[0]
            # The state opened, and holds the last acknowledged write or the one in flight.
            status = conn().request("GET", wire.CLIENT_PATHS["status"])
            assert status["code"] == 3, status
            if attempted:
                got = conn().request("GET", f"{wire.CLIENT_PATHS['secrets']}?s=counter")
                stored = int(base64.b64decode(got["secrets"]["counter"]["Public"]).decode())
                assert acked <= stored <= attempted, (kill, acked, stored, attempted)
            if kill == KILLS:
                break
            stop = threading.Event()

            def writer(stop: threading.Event = stop) -> None:
                nonlocal attempted, acked
                while not stop.is_set():
                    attempted += 1
                    body = {"secrets": {"counter": {"Key": wire.b64e(str(attempted).encode())}}}
                    try:
                        conn().request("POST", wire.CLIENT_PATHS["secrets"], body)
                    except MeshError:
                        return
                    acked = attempted

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(rng.uniform(0.02, 0.3))
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(10)
            in_flight_kills += attempted != acked
            stop.set()
            thread.join(10)
        assert not list((c.base / "coordinator-state").glob(".state.sealed.*.tmp"))
    assert kill == KILLS
    assert acked > KILLS  # writes really happened between the kills
    print(f"{KILLS} kills, {in_flight_kills} with a write in flight, {acked} writes acknowledged")


GROUP_KILLS = 6
GROUP_MAX = 400


# The kill lands while eight clients are mid-handshake: CPython's ssl.wrap_socket can raise
# from getpeername() on a reset socket before the caller holds it, and that socket is then
# closed only by the garbage collector. Not ours to close; every outcome is still asserted.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sigkill_during_group_commits_never_loses_or_double_counts_an_activation(
    tmp_path: Path,
) -> None:
    """Eight marbles activate at once (their counted activations share group commits);
    the coordinator is killed between and during commits. After every restart the count
    is at least the answered activations and at most those plus the ones in flight."""
    doc = {
        "Packages": {"app": package()},
        "Marbles": {"web": {"Package": "app", "MaxActivations": GROUP_MAX}},
    }
    rng = random.Random(20261127)
    answered: list[str] = []
    lost: list[str] = []  # activations whose answer the kill cut off
    lock = threading.Lock()
    platform_dir = tmp_path / "sim-platform"
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        path = write_manifest(tmp_path / "m.json", doc)
        c.cli("manifest", "set", str(path), "--coordinator", c.client_addr, "--accept-simulation")
        root = client.fetch_evidence(
            c.client_addr, accept_simulation=True, platform_dir=platform_dir
        ).root
        for kill in range(GROUP_KILLS + 1):
            proc = c.start_coordinator(name=f"coordinator-{kill}") if kill else c.procs[0]
            status = client.Connection(c.client_addr, root).request("GET", "/api/v2/status")
            counted = status["activations"].get("web", 0)
            assert len(answered) <= counted <= len(answered) + len(lost), (kill, counted)
            if kill == GROUP_KILLS:
                break
            stop = threading.Event()
            mesh = c.mesh_addr

            def marble(stop: threading.Event = stop, mesh: str = mesh) -> None:
                while not stop.is_set():
                    m = Marble(platform_dir, "web")
                    try:
                        m.activate(mesh, root)
                    except MeshError:
                        with lock:
                            lost.append(str(m.instance))
                        return
                    with lock:
                        answered.append(str(m.instance))

            threads = [threading.Thread(target=marble) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 0.6))
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(10)
            stop.set()
            for t in threads:
                t.join(15)
        assert len(set(answered)) == len(answered)
        assert len(answered) > 2 * GROUP_KILLS  # activations really happened between kills
    print(f"{GROUP_KILLS} kills, {len(answered)} answered, {len(lost)} cut off")
